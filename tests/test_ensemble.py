import re
import shutil

import numpy as np
import pytest

from benchmarks import ensemble, gpu_recipe
from stages import inference, models, prepared, preprocess
from stages.common import BrainsegError


def _unet(seed: int, input_norm: str = "slice"):
    import keras

    keras.utils.set_random_seed(seed)
    return models.build_model("unet", (64, 64, 3), filters=4, input_norm=input_norm)


def test_the_average_model_outputs_the_mean_of_its_members():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (3, 64, 64, 3), dtype=np.uint8)
    a, b = _unet(1), _unet(2)
    pa, pb = (inference.predict_probs(m, images, engine="keras") for m in (a, b))
    assert not np.allclose(pa, pb)
    both = ensemble.average([a, b])
    assert both.name == "unet" and inference.model_kind(both) == "segmenter" and preprocess.input_size(both) == 64
    np.testing.assert_allclose(inference.predict_probs(both, images, engine="keras"), (pa + pb) / 2, atol=1e-6)


def test_an_average_of_volume_normalised_members_gets_each_patient_standardised():
    # the members' VolumeDecode layers sit inside nested models: missing them would feed the ensemble raw pixels
    rng = np.random.default_rng(1)
    images = rng.integers(0, 255, (4, 64, 64, 3), dtype=np.uint8)
    patients = ["A", "A", "B", "B"]
    a, b = _unet(1, "volume"), _unet(2, "volume")
    both = ensemble.average([a, b])
    assert preprocess.volume_normalised(both)
    pa, pb = (inference.predict_probs(m, images, engine="keras", patients=patients) for m in (a, b))
    np.testing.assert_allclose(inference.predict_probs(both, images, engine="keras", patients=patients),
                               (pa + pb) / 2, atol=1e-6)


# scored on Keras: these tests are about grouping and scoring runs, where a LiteRT conversion would cost seconds per run
# and ensemble (averaged models run on LiteRT in the members' test of tests/test_train.py and the CLI's of test_predict)
SYNTHETIC = ["data.source=synthetic", "data.synthetic.patients=6", "data.synthetic.slices=8", "profile=demo",
             "evaluate.engine=keras"]


@pytest.fixture(scope="module")
def prepared_run(tmp_path_factory):
    """A run folder holding the data stages' outputs for SYNTHETIC, made once: the stages are deterministic, so a
    copy is what running them again in another folder gives."""
    run = tmp_path_factory.mktemp("prepared") / "run"
    gpu_recipe.run_stages(run, SYNTHETIC, names=["download", "index", "split", "balance"])
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory, prepared_run):
    """Two run folders of one synthetic split, each with its own (untrained) model."""
    root = tmp_path_factory.mktemp("runs")
    result = []
    for seed in (1, 2):
        run = shutil.copytree(prepared_run, root / f"r{seed}", symlinks=True)
        (run / "models").mkdir()
        _unet(seed).save(run / "models/model.keras")
        result.append(run)
    return result


def test_the_ensemble_is_scored_on_validation_then_test(runs):
    scores = ensemble.evaluate_ensemble(runs)
    test_patients = prepared.originals(runs[0] / "data", "test")[2]["patient"].unique()
    assert scores["worst_test_patient"]["patient"] in test_patients
    assert scores["validation"]["chosen"] in ("threshold", "min_component", "largest_3d", "tta_flip", "tta_affine")
    assert 0.0 <= scores["test"]["dice_volume_mean"] <= 1.0


def test_one_member_scores_as_the_evaluate_stage_scores_it(runs):
    import yaml

    from stages import evaluate

    alone = ensemble.evaluate_ensemble(runs[:1])
    stage = evaluate.run_stage(yaml.safe_load((runs[0] / "params.yaml").read_text()), runs[0]).metrics
    assert alone["validation"]["chosen"] == stage["postprocess"]["chosen_on_validation"]
    assert alone["validation"]["dice_volume_mean"] == pytest.approx(stage["validation"]["dice_volume_mean"])
    for key in ("dice_volume_mean", "dice_volume_median", "dice_pixel", "tversky"):
        assert alone["test"][key] == pytest.approx(stage[key], abs=1e-6), key


def test_runs_of_different_splits_are_refused(runs, tmp_path):
    other = tmp_path / "other"
    (other / "data").mkdir(parents=True)
    (other / "data/split.csv").write_text("patient,split\nA,test\n")
    with pytest.raises(BrainsegError, match="split.csv differ"):
        ensemble.check_same_split([runs[0], other])


def test_member_figures_come_from_the_members_own_evaluation(tmp_path):
    import json

    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics/eval.json").write_text(json.dumps(
        {"dice_volume_mean": 0.74, "dice_volume_median": 0.85, "postprocess": {"chosen_on_validation": "tta_flip"},
         "validation": {"dice_volume_mean": 0.77, "postprocess_compare": {"tta_flip": {"dice_volume_mean": 0.82}}}}))
    assert ensemble.member_figures(tmp_path) == {
        "test_dice_volume_mean": 0.74, "test_dice_volume_median": 0.85, "validation_dice_volume_mean": 0.77,
        "postprocess_chosen": "tta_flip", "validation_chosen_dice_volume_mean": 0.82}


@pytest.fixture(scope="module")
def fold_runs(tmp_path_factory):
    """The two runs of a 2-fold synthetic split, evaluated, both holding the same (untrained) model."""
    import yaml

    from stages import evaluate

    root = tmp_path_factory.mktemp("folds")
    result = []
    for fold in (0, 1):
        run = root / f"f{fold}"
        overrides = ["data.source=synthetic", "data.synthetic.patients=8", "data.synthetic.slices=8",
                     "profile=demo", "evaluate.engine=keras", "split.folds=2", f"split.fold={fold}"]
        gpu_recipe.run_stages(run, overrides, names=["download", "index", "split", "balance"])
        (run / "models").mkdir()
        _unet(3, "volume").save(run / "models/model.keras")
        evaluate.run_stage(yaml.safe_load((run / "params.yaml").read_text()), run)
        result.append(run)
    return result


def test_a_fold_ensemble_chooses_post_processing_on_the_pooled_folds_then_scores_test(fold_runs):
    import pandas as pd
    import yaml

    from stages import evaluate

    pooled = pd.concat([pd.read_csv(run / "metrics/per_patient_validation.csv") for run in fold_runs])
    splits = [pd.read_csv(run / "data/split.csv").set_index("patient")["split"] for run in fold_runs]
    assert set(pooled.patient) == set(splits[0].index[splits[0] != "test"])  # every non-test patient, once
    assert len(pooled) == pooled.patient.nunique()
    scores = ensemble.evaluate_fold_ensemble(fold_runs)
    means = {name: pooled[name].mean() for name in ("threshold", "min_component", "largest_3d", "tta_flip",
                                                    "tta_affine")}
    assert scores["validation"]["patients"] == len(pooled)
    assert scores["validation"]["pooled_out_of_fold_dice_volume_mean"] == pytest.approx(means)
    assert means[scores["validation"]["chosen"]] == max(means.values())
    # both members hold one model, so the average is that model under the chosen post-processing
    params = yaml.safe_load((fold_runs[0] / "params.yaml").read_text())["evaluate"]
    chosen = evaluate.compare_settings(params)[scores["validation"]["chosen"]]
    alone = evaluate.evaluate_model(inference.load_model(fold_runs[0] / "models/model.keras"),
                                    *prepared.originals(fold_runs[0] / "data", "test"), chosen).metrics
    for key in ("dice_volume_mean", "dice_volume_median", "dice_pixel", "tversky"):
        assert scores["test"][key] == pytest.approx(alone[key], abs=1e-6), key


def test_a_fold_ensemble_needs_every_fold_of_one_split(fold_runs, runs):
    with pytest.raises(SystemExit, match=r"folds \[1\] of 2"):
        ensemble.evaluate_fold_ensemble(fold_runs[:1])
    with pytest.raises(BrainsegError, match="test patients differ"):
        ensemble.pooled_validation([fold_runs[0], runs[0]])


def test_runs_are_cut_in_order_into_ensembles_with_no_member_shared():
    runs = [f"r{i}" for i in range(6)]
    assert ensemble.groups_of(runs, 3) == [["r0", "r1", "r2"], ["r3", "r4", "r5"]]
    assert ensemble.groups_of(runs, 2) == [["r0", "r1"], ["r2", "r3"], ["r4", "r5"]]
    for size in (4, 0):  # 6 runs make no whole groups of 4; 0 members is no ensemble
        with pytest.raises(BrainsegError, match="multiple"):
            ensemble.groups_of(runs, size)
    with pytest.raises(BrainsegError, match="two or more ensembles"):
        ensemble.groups_of(runs[:3], 3)  # one ensemble has no spread


@pytest.fixture(scope="module")
def evaluated_runs(tmp_path_factory, prepared_run):
    """Four run folders of one synthetic split, each with its own (untrained) model, evaluated by the stage."""
    import yaml

    from stages import evaluate

    root = tmp_path_factory.mktemp("seeds")
    result = []
    for seed in (1, 2, 3, 4):
        run = shutil.copytree(prepared_run, root / f"r{seed}", symlinks=True)
        (run / "models").mkdir()
        _unet(seed, "volume").save(run / "models/model.keras")
        evaluate.run_stage(yaml.safe_load((run / "params.yaml").read_text()), run)
        result.append(run)
    return result


def test_one_member_groups_spread_as_the_runs_alone(evaluated_runs):
    summary = ensemble.evaluate_groups(evaluated_runs[:2], 1)
    assert [s["members"] for s in summary["ensembles"]] == [[str(r)] for r in evaluated_runs[:2]]
    for key in ("mean", "sd", "range"):
        assert summary["ensemble_spread"][key] == pytest.approx(summary["alone_spread"][key], abs=1e-6), key
        assert summary["ensemble_validation_spread"][key] == pytest.approx(
            summary["alone_validation_spread"][key], abs=1e-6), key


def test_two_member_ensembles_are_scored_and_their_spread_printed_beside_the_runs_alone(evaluated_runs):
    summary = ensemble.evaluate_groups(evaluated_runs, 2)
    assert summary["ensemble_spread"]["runs"] == 2 and summary["alone_spread"]["runs"] == 4
    first = ensemble.evaluate_ensemble(evaluated_runs[:2])
    assert summary["ensembles"][0]["test"]["dice_volume_mean"] == pytest.approx(first["test"]["dice_volume_mean"])
    text = ensemble.groups_table(summary)
    assert text.count(f"{evaluated_runs[0]}, {evaluated_runs[1]}") == 1
    assert "test per-volume Dice over 2 ensembles" in text and "2 ensembles within" not in text
    assert "of 1 pair of ensembles within 0.02" in text
    assert "the same runs alone: test per-volume Dice over 4 seeds" in text
    assert "validation per-volume Dice, chosen post-processing over 2 ensembles" in text
    assert "the same runs alone: validation per-volume Dice, chosen post-processing over 4 seeds" in text
    assert len(re.findall(r": (not )?met$", text, re.M)) == 2  # issue 6's verdict on the two test lines only


def test_groups_refuse_runs_without_a_choice_on_validation(evaluated_runs, tmp_path):
    import json

    old = tmp_path / "old"
    shutil.copytree(evaluated_runs[1], old, symlinks=True)
    metrics = json.loads((old / "metrics/eval.json").read_text())
    metrics["postprocess"].pop("chosen_on_validation")
    (old / "metrics/eval.json").write_text(json.dumps(metrics))
    with pytest.raises(BrainsegError, match="old: metrics/eval.json has no post-processing chosen"):
        ensemble.evaluate_groups([evaluated_runs[0], old], 1)
