import json
import shutil
import zipfile

import cv2
import keras
import numpy as np
import pandas as pd
import pytest

from stages import evaluate, prepared
from stages.common import BrainsegError
from tests.conftest import write_data

SIZE = 32
EVALUATE = {"threshold": 0.5, "min_component": 0, "largest_3d": False, "tta_flip": False,
            "detection_min_area": 10, "batch_size": 4}
SEGMENTER_KEYS = {"dice_volume_mean", "dice_volume_median", "dice_volume_worst", "dice_volume_worst_patient",
                  "dice_volume_ci95_low", "dice_volume_ci95_high", "dice_slice_mean", "dice_slice_tumour_mean",
                  "dice_pixel", "iou", "precision", "recall", "tversky", "detection", "postprocess",
                  "postprocess_compare", "model", "data", "data_source", "validation"}
HEADLINE = ["dice_volume_mean", "dice_volume_median", "dice_slice_mean", "dice_slice_tumour_mean", "dice_pixel",
            "iou", "precision", "recall", "tversky"]


def flair_model(name="unet"):
    """A perfect 'segmenter' for the data below: tumour where the FLAIR (middle) channel is 255."""
    inputs = keras.Input((None, None, 3))
    conv = keras.layers.Conv2D(1, 1, activation="sigmoid")
    model = keras.Model(inputs, conv(inputs), name=name)
    conv.set_weights([np.array([0.0, 40.0, 0.0]).reshape(1, 1, 3, 1), np.array([-20.0])])
    return model


def untrained_model(name="unet"):
    """Random weights, the same ones whichever tests ran before (seeded initialisers)."""
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu",
                            kernel_initializer=keras.initializers.GlorotUniform(0))(inputs)
    out = keras.layers.Conv2D(1, 1, activation="sigmoid", kernel_initializer=keras.initializers.GlorotUniform(1))(x)
    return keras.Model(inputs, out, name=name)


def classifier_model():
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.GlobalMaxPooling2D()(inputs)
    return keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(x), name="cnn")


def make_root(tmp_path, model):
    """A repository-like folder: models/model.keras and a prepared test split of 3 patients x 4 slices.

    Each patient's tumour is a 10x10 square on its slices 1 and 2; slices 0 and 3 are empty. A last row,
    an augmented copy with a wrong mask, must be left out of the scores.
    """
    rng = np.random.default_rng(0)
    images = rng.integers(0, 100, (13, SIZE, SIZE, 3), dtype=np.uint8)
    masks = np.zeros((13, SIZE, SIZE), np.uint8)
    rows = []
    for p in range(3):
        for s in range(4):
            i = 4 * p + s
            if s in (1, 2):
                masks[i, 4 + 6 * p:14 + 6 * p, 10:20] = 1
            images[i, ..., 1][masks[i] == 1] = 255
            rows.append({"patient": f"TCGA_CS_{4941 + p}", "case": f"TCGA_CS_{4941 + p}_19960909", "slice": s + 1,
                         "image": "x.tif", "augmentation": "", "tumour": int(s in (1, 2)),
                         "area": int(masks[i].sum())})
    for i, row in enumerate(rows):  # two unrelated slices first in data/slices: tables point past them
        row.update(row=i + 2, copy=-1)
    rows.append({**rows[0], "augmentation": "rotate 10", "copy": 0})
    copy_masks = np.ones((1, SIZE, SIZE), np.uint8)
    junk = np.full((2, SIZE, SIZE, 3), 255, np.uint8), np.zeros((2, SIZE, SIZE), np.uint8)
    write_data(tmp_path / "data", np.concatenate([junk[0], images[:12]]), np.concatenate([junk[1], masks[:12]]),
               {split: pd.DataFrame(rows) for split in ("val", "test")},  # the same slices: scores must agree
               {split: (images[12:], copy_masks) for split in ("val", "test")})
    (tmp_path / "models").mkdir()
    model.save(tmp_path / "models/model.keras")
    (tmp_path / "data/raw").mkdir()
    (tmp_path / "data/raw/SOURCE.json").write_text(json.dumps({"source": "synthetic"}))
    return tmp_path


def run(tmp_path, model, name="unet", **evaluate_params):
    root = make_root(tmp_path, model)
    evaluate.run_stage({"model": name, "evaluate": {**EVALUATE, **evaluate_params}}, root)
    return root, json.loads((root / "metrics/eval.json").read_text())


def test_perfect_model_scores_one_everywhere(tmp_path):
    root, result = run(tmp_path, flair_model(), largest_3d=True)
    assert set(result) == SEGMENTER_KEYS
    assert all(result[k] == pytest.approx(1.0) for k in HEADLINE)
    detection = result["detection"]
    assert [detection[k] for k in ("accuracy", "sensitivity", "specificity", "roc_auc")] == [1, 1, 1, 1]
    assert (detection["tp"], detection["tn"]) == (6, 6)
    assert set(result["postprocess_compare"]) == {"threshold", "min_component", "largest_3d", "tta_flip", "tta_affine"}
    assert all(v["dice_volume_mean"] == pytest.approx(1.0) for v in result["postprocess_compare"].values())
    assert result["postprocess"]["largest_3d"] is True and result["postprocess"]["compare_min_component"] == 64
    assert result["data"] == {"patients": 3, "slices": 12, "tumour_slices": 6}
    assert result["data_source"] == "synthetic"
    # every patient scores 1: the worst is the first by name, and no interval is defined
    assert (result["dice_volume_worst"], result["dice_volume_worst_patient"]) == (1.0, "TCGA_CS_4941")
    assert result["dice_volume_ci95_low"] is None and result["dice_volume_ci95_high"] is None
    assert result["model"]["name"] == "unet" and result["model"]["parameters"] == 4
    assert result["model"]["slices_per_second"] > 0

    per_patient = pd.read_csv(root / "metrics/per_patient.csv")
    assert per_patient.columns.tolist() == ["patient", "slices", "dice", "true_volume", "predicted_volume"]
    assert per_patient.slices.tolist() == [4, 4, 4] and (per_patient.true_volume == 200).all()
    roc = pd.read_csv(root / "plots/roc.csv")
    assert roc.columns.tolist() == ["fpr", "tpr"] and len(roc) >= 2
    confusion = pd.read_csv(root / "plots/confusion.csv")
    assert len(confusion) == 12 and (confusion.actual == confusion.predicted).all()
    for name in ("best", "median", "worst"):
        image = cv2.imread(str(root / f"plots/overlays/{name}.png"))
        assert image is not None and image.shape[1] == 2 * SIZE
        # the true outline is green; the red prediction is drawn on top of it, on the same pixels
        assert ((image[..., 2] == 255) & (image[..., 1] == 0)).any()


def test_engine_is_recorded_and_a_model_litert_cannot_convert_is_scored_by_keras(tmp_path, monkeypatch, int8_cpu):
    from stages import engines

    _, lite = run(tmp_path / "a", flair_model())
    assert lite["model"]["engine"] == "litert_int8"  # the default for a float32 unet on a CPU with int8 dots

    def refuse(model, int8=False):
        raise RuntimeError("unsupported op")

    monkeypatch.setattr(engines, "LiteRTRunner", refuse)
    with pytest.warns(UserWarning, match="LiteRT cannot run"):
        _, fallback = run(tmp_path / "b", flair_model())
    assert fallback["model"]["engine"] == "keras"
    assert all(fallback[k] == pytest.approx(lite[k]) for k in HEADLINE)


def test_every_segmenter_writes_the_same_keys(tmp_path):
    _, perfect = run(tmp_path / "a", flair_model())
    _, untrained = run(tmp_path / "b", untrained_model(), tta_flip=True, min_component=5)

    def keys(d, prefix=""):
        return {k for key, v in d.items() for k in (keys(v, f"{prefix}{key}.") if isinstance(v, dict)
                                                     else [prefix + key])}
    assert keys(perfect) == keys(untrained)
    assert untrained["postprocess_compare"]["min_component"] is not None
    assert untrained["postprocess"]["compare_min_component"] == 5


def test_headline_matches_inference_segment(tmp_path):
    """Evaluation's streamed, de-duplicated post-processing is the same as the one inference.segment."""
    from stages import inference, metrics
    model = untrained_model()
    params = {**EVALUATE, "tta_flip": True, "largest_3d": True, "threshold": 0.45}
    root, result = run(tmp_path, model, **params)
    images, masks, table = prepared.originals(root / "data", "test")
    masks_pred, _ = inference.segment(model, images[table.index], params, table.patient.to_numpy())
    counts = metrics.slice_counts(masks[table.index], masks_pred, table.patient)
    assert result["dice_volume_mean"] == pytest.approx(metrics.segmentation_scores(counts)["dice_volume_mean"])


def test_classifier_writes_classifier_keys(tmp_path):
    root, result = run(tmp_path, classifier_model(), name="cnn", tta_flip=True)
    assert {"classifier_accuracy", "classifier_sensitivity", "classifier_specificity", "classifier_roc_auc",
            "classifier_confusion", "model", "data", "data_source", "postprocess", "validation"} == set(result)
    assert result["validation"]["classifier_accuracy"] == result["classifier_accuracy"]
    assert result["model"]["kind"] == "classifier"
    assert pd.read_csv(root / "metrics/per_patient.csv").columns[2] == "accuracy"
    assert pd.read_csv(root / "metrics/per_patient_validation.csv").columns[2] == "accuracy"
    assert len(list((root / "plots/overlays").glob("*.png"))) == 3


def test_a_seed_ensemble_of_classifiers_is_evaluated_as_a_classifier(tmp_path):
    # the default's train.members apply to every model, so `dvc exp run -S model=cnn` averages three classifiers
    from stages.models import average

    root, result = run(tmp_path, average([classifier_model(), classifier_model()]), name="cnn")
    assert result["model"]["kind"] == "classifier" and result["model"]["name"] == "cnn"
    assert 0 <= result["classifier_accuracy"] <= 1


def test_a_cascade_records_how_many_slices_every_member_ran_on(tmp_path):
    # evaluate.cascade: the first member screens; the perfect members call tumour on the 6 tumour slices of 12
    # (slices 2 and 3 of each patient's 4), and every slice lies beside one
    from stages.models import average

    root, result = run(tmp_path / "a", average([flair_model(), flair_model(), flair_model()]), cascade=0.5)
    assert result["model"]["cascade"] == {"gate": 0.5, "slices_every_member_ran_on": 12, "share": 1.0}
    assert result["model"]["engine"] == "litert"
    _, whole = run(tmp_path / "b", average([flair_model(), flair_model(), flair_model()]))
    assert "cascade" not in whole["model"]
    assert all(result[k] == pytest.approx(whole[k]) for k in HEADLINE)


def test_validation_scores_sit_beside_test_scores(tmp_path):
    _, result = run(tmp_path, untrained_model(), tta_flip=True)
    assert result["validation"]["patients"] == 3
    assert result["validation"]["dice_volume_mean"] == pytest.approx(result["dice_volume_mean"])
    assert result["validation"]["postprocess_compare"] == result["postprocess_compare"]
    assert result["postprocess"]["chosen_on_validation"] is None
    for key in ("dice_volume_worst", "dice_volume_worst_patient", "dice_volume_ci95_low", "dice_volume_ci95_high"):
        assert result["validation"][key] == result[key]


def test_the_headline_has_its_worst_patient_and_interval(tmp_path):
    root, result = run(tmp_path, untrained_model())
    per_patient = pd.read_csv(root / "metrics/per_patient.csv")
    assert result["dice_volume_worst_patient"] == per_patient.patient[0]
    assert result["dice_volume_worst"] == pytest.approx(per_patient.dice[0])
    assert per_patient.dice.nunique() > 1  # the untrained model's patients differ, so an interval exists
    assert result["dice_volume_ci95_low"] < result["dice_volume_mean"] < result["dice_volume_ci95_high"]


def test_validation_patients_are_scored_one_by_one_under_every_post_processing(tmp_path):
    root, result = run(tmp_path, untrained_model(), threshold=0.3)
    table = pd.read_csv(root / "metrics/per_patient_validation.csv")
    compare = result["validation"]["postprocess_compare"]
    assert table.columns.tolist() == ["patient", "slices", "true_volume", "threshold", "min_component",
                                     "largest_3d", "tta_flip", "tta_affine"] and set(table.columns[3:]) == set(compare)
    assert table.patient.tolist() == ["TCGA_CS_4941", "TCGA_CS_4942", "TCGA_CS_4943"]
    assert (table.true_volume == 200).all()
    for name, scores in compare.items():  # the k-fold pooling (benchmarks.crossval) relies on this agreement
        assert table[name].mean() == pytest.approx(scores["dice_volume_mean"])
    # the untrained model scores something other than 0 or 1, so the check above is not trivially met
    assert 0 < table["threshold"].mean() < 1


def fake_validation(scores: dict) -> evaluate.Evaluation:
    compare = {name: {"dice_volume_mean": v, "dice_slice_mean": v} for name, v in scores.items()}
    return evaluate.Evaluation({"postprocess_compare": compare}, pd.DataFrame(), pd.DataFrame(), pd.DataFrame())


def test_choose_postprocess_takes_the_best_validation_setting():
    steps = ["threshold", "min_component", "largest_3d", "tta_flip", "tta_affine"]
    chosen = lambda p: (p["min_component"], p["largest_3d"], p["tta_flip"], p["tta_affine"])  # noqa: E731
    name, params = evaluate.choose_postprocess(fake_validation(dict(zip(steps, [0.6, 0.6, 0.7, 0.65, 0.69]))),
                                               EVALUATE)
    assert name == "largest_3d" and chosen(params) == (64, True, False, False)
    name, params = evaluate.choose_postprocess(fake_validation(dict(zip(steps, [0.6, 0.6, 0.7, 0.65, 0.71]))),
                                               EVALUATE)
    assert name == "tta_affine" and chosen(params) == (64, True, True, True)
    name, params = evaluate.choose_postprocess(fake_validation(dict.fromkeys(steps, 0.5)), EVALUATE)
    assert name == "threshold"  # a tie keeps the fewest steps
    assert chosen(params) == (0, False, False, False)
    no_patients = dict(zip(steps, [None] * 5))
    assert evaluate.choose_postprocess(fake_validation(no_patients), EVALUATE)[0] == "threshold"


def test_choose_on_validation_applies_the_choice_to_test(tmp_path):
    _, result = run(tmp_path, untrained_model(), choose_on_validation=True)
    chosen = result["postprocess"]["chosen_on_validation"]
    best = max(v["dice_volume_mean"] for v in result["validation"]["postprocess_compare"].values())
    assert result["validation"]["postprocess_compare"][chosen]["dice_volume_mean"] == best
    # val and test hold the same slices here, so the test headline is the chosen setting's test score
    assert result["dice_volume_mean"] == pytest.approx(result["postprocess_compare"][chosen]["dice_volume_mean"])


def test_after_a_refit_validation_is_scored_with_the_model_that_chose_the_epochs(tmp_path):
    """models/selection.keras (the first run's best epoch) scores the validation patients and chooses the
    post-processing; models/model.keras, the refit trained on those patients too, scores test."""
    root = make_root(tmp_path, flair_model())
    everywhere = flair_model()  # tumour on every pixel: a Dice between 0 and 1 whatever the random state
    everywhere.layers[-1].set_weights([np.zeros((1, 1, 3, 1)), np.array([20.0])])
    everywhere.save(root / "models/selection.keras")
    evaluate.run_stage({"model": "unet", "evaluate": {**EVALUATE, "choose_on_validation": True}}, root)
    result = json.loads((root / "metrics/eval.json").read_text())
    assert result["model"]["refit"] is True
    assert result["dice_volume_mean"] == 1.0 > result["validation"]["dice_volume_mean"]  # val and test: same slices
    validation = pd.read_csv(root / "metrics/per_patient_validation.csv")
    assert 0 < validation["threshold"].mean() < 1  # the selection model's, not the refit's


def test_without_a_refit_one_model_scores_validation_and_test(tmp_path):
    root = make_root(tmp_path, flair_model())
    shutil.copyfile(root / "models/model.keras", root / "models/selection.keras")  # what train writes without refit
    model, chooser = evaluate.stage_models({"model": "unet"}, root)
    assert model is chooser
    (root / "models/selection.keras").unlink()  # a run from before the refit
    model, chooser = evaluate.stage_models({"model": "unet"}, root)
    assert model is chooser
    evaluate.run_stage({"model": "unet", "evaluate": EVALUATE}, root)
    result = json.loads((root / "metrics/eval.json").read_text())
    assert result["model"]["refit"] is False and result["validation"]["dice_volume_mean"] == 1.0


def test_a_selection_model_of_another_architecture_is_refused(tmp_path):
    root = make_root(tmp_path, flair_model())
    flair_model("resunet").save(root / "models/selection.keras")
    with pytest.raises(BrainsegError, match="selection.keras.*resunet.*dvc repro"):
        evaluate.stage_models({"model": "unet"}, root)


def test_model_name_must_match_params(tmp_path):
    root = make_root(tmp_path, flair_model("resunet"))
    with pytest.raises(BrainsegError, match="resunet.*dvc repro"):
        evaluate.run_stage({"model": "unet", "evaluate": EVALUATE}, root)


def test_missing_prepared_data_says_run_dvc_repro(tmp_path):
    (tmp_path / "models").mkdir()
    flair_model().save(tmp_path / "models/model.keras")
    with pytest.raises(BrainsegError, match="test.csv: missing.*dvc repro balance"):
        evaluate.run_stage({"model": "unet", "evaluate": EVALUATE}, tmp_path)


def test_cli_needs_model_data_and_out_together(tmp_path):
    with pytest.raises(SystemExit):
        evaluate.main(["--model", str(tmp_path / "m.keras")])


@pytest.mark.parametrize("packed", [False, True], ids=["folder", "zip"])
def test_cli_scores_a_kaggle_layout_folder_or_zip(tmp_path, monkeypatch, packed):
    synthetic = pytest.importorskip("stages.synthetic")
    data = synthetic.write_dataset(tmp_path / "kaggle_3m", patients=2, slices=6, seed=1)
    if packed:  # read in place, as the download stage keeps a zip
        with zipfile.ZipFile(tmp_path / "dev.zip", "w") as zf:
            for file in sorted(data.rglob("*")):
                zf.write(file, "kaggle_3m/" + file.relative_to(data).as_posix())
        shutil.rmtree(data)
        data = tmp_path / "dev.zip"
    flair_model().save(tmp_path / "model.keras")
    monkeypatch.setattr(evaluate, "load_params", lambda: {"model": "unet", "evaluate": EVALUATE,
                                                         "index": {"on_bad": "fail"}})
    out = tmp_path / "out/dev.json"
    evaluate.main(["--model", str(tmp_path / "model.keras"), "--data", str(data), "--out", str(out),
                   "--per-patient", str(tmp_path / "out/per_patient.csv")])
    result = json.loads(out.read_text())
    assert set(result) == SEGMENTER_KEYS - {"validation"} and result["data"]["slices"] == 12  # no split here
    assert result["data_source"] == str(data)
    assert len(pd.read_csv(tmp_path / "out/per_patient.csv")) == 2
