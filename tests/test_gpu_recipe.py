import json

import pytest
import yaml

from benchmarks import gpu_recipe
from stages.common import ROOT


def test_override_sets_dotted_keys_as_dvc_exp_run_does():
    params = {"profile": "cpu", "train": {"augment": {"flip": False}, "max_minutes": None}}
    for assignment in ("profile=gpu", "train.augment.flip=true", "train.max_minutes=6.5"):
        gpu_recipe.override(params, assignment)
    assert params == {"profile": "gpu", "train": {"augment": {"flip": True}, "max_minutes": 6.5}}
    with pytest.raises(SystemExit, match="no key train.epochs"):
        gpu_recipe.override(params, "train.epochs=3")


def test_stages_run_in_a_scratch_folder_with_the_overrides(tmp_path):
    before = (ROOT / "params.yaml").read_text()
    seconds = gpu_recipe.run_stages(tmp_path, ["data.source=synthetic", "data.synthetic.patients=6",
                                               "data.synthetic.slices=8"], names=["download", "index", "split"])
    assert list(seconds) == ["download", "index", "split"]
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    assert params["data"]["source"] == "synthetic" and params["data"]["synthetic"]["patients"] == 6
    assert (tmp_path / "data/split.csv").is_file() and not (tmp_path / "data/prepared").exists()
    assert (ROOT / "params.yaml").read_text() == before  # the project's own params are left alone


def test_report_gives_the_test_headline_and_the_worst_patient(tmp_path, capsys):
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics/train.json").write_text(json.dumps({"train_slices_per_s": 361.0}))
    (tmp_path / "metrics/eval.json").write_text(json.dumps(
        {"dice_volume_mean": 0.76, "dice_volume_median": 0.82, "validation": {"dice_volume_mean": 0.83}}))
    (tmp_path / "metrics/per_patient.csv").write_text("patient,slices,dice\nA,20,0.9\nB,24,0.2\nC,22,0.8\n")
    summary = gpu_recipe.report(tmp_path, {"train": 1.0, "evaluate": 2.0})
    assert summary["worst_test_patient"]["patient"] == "B" and summary["total_seconds"] == 3.0
    assert summary["test"]["dice_volume_median"] == 0.82 and summary["validation"] == {"dice_volume_mean": 0.83}
    assert json.loads(capsys.readouterr().out)["train"] == {"train_slices_per_s": 361.0}


def test_runs_side_by_side_share_the_gpu_memory_and_one_compilation_cache(tmp_path, monkeypatch):
    for name in ("JAX_COMPILATION_CACHE_DIR", "XLA_PYTHON_CLIENT_MEM_FRACTION"):
        monkeypatch.delenv(name, raising=False)
    assert gpu_recipe.child_env(tmp_path, 1) == {"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax-cache")}
    assert gpu_recipe.child_env(tmp_path, 3)["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.30"
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.2")  # the caller's choice wins
    assert "XLA_PYTHON_CLIENT_MEM_FRACTION" not in gpu_recipe.child_env(tmp_path, 3)


# evaluate on Keras, as the recipe does on a GPU (engine auto picks Keras there and on JAX), so these tests
# do not spend their time converting each run's model for LiteRT, a CPU-only machine's engine
SMALL = ["profile=demo", "data.source=synthetic", "data.synthetic.patients=8", "data.synthetic.slices=8",
         "evaluate.engine=keras"]


def test_the_folds_of_a_split_run_side_by_side_then_pool_and_ensemble(tmp_path, capsys, monkeypatch):
    seconds = gpu_recipe.run_folds(tmp_path, SMALL, k=2, parallel=2)
    assert sorted(seconds) == [0, 1] and all("evaluate" in s for s in seconds.values())
    for fold in (0, 1):
        params = yaml.safe_load((tmp_path / f"fold{fold}/params.yaml").read_text())
        assert params["split"] == {**params["split"], "folds": 2, "fold": fold}
        assert "--- evaluate" in (tmp_path / f"fold{fold}/run.log").read_text()
    summary = gpu_recipe.report_folds(tmp_path, seconds)
    out = capsys.readouterr().out
    assert "2-fold cross-validation over the non-test patients" in out and "| tta_flip |" in out
    assert sorted(summary["folds"]) == [0, 1]
    validated = sum(len(open(tmp_path / f"fold{f}/metrics/per_patient_validation.csv").readlines()) - 1
                    for f in (0, 1))
    assert summary["fold_ensemble"]["validation"]["patients"] == validated
    assert 0.0 <= summary["fold_ensemble"]["test"]["dice_volume_mean"] <= 1.0
    # a later call with --resume keeps what an earlier one finished and runs the rest (its stages recorded here,
    # not run again: the first call ran them)
    (tmp_path / "fold1/metrics/eval.json").unlink()
    kept = (tmp_path / "fold0/run.log").stat().st_mtime_ns
    ran = []
    monkeypatch.setattr(gpu_recipe, "run_stages", lambda run, assignments, log=None, env=None: ran.append(
        (run.name, assignments)) or {"evaluate": 0.0})
    again = gpu_recipe.run_folds(tmp_path, SMALL, k=2, parallel=2, resume=True)
    assert again == {0: {}, 1: {"evaluate": 0.0}} and ran == [("fold1", SMALL + ["split.folds=2", "split.fold=1"])]
    assert (tmp_path / "fold0/run.log").stat().st_mtime_ns == kept


def test_resume_keeps_only_a_fold_evaluated_with_the_same_params(tmp_path):
    assignments = SMALL + ["split.folds=2", "split.fold=0"]
    assert not gpu_recipe.evaluated_with(tmp_path, assignments)  # nothing there
    (tmp_path / "params.yaml").write_text(gpu_recipe.params_text(assignments))
    assert not gpu_recipe.evaluated_with(tmp_path, assignments)  # not evaluated (a run cut short)
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics/eval.json").write_text("{}")
    assert gpu_recipe.evaluated_with(tmp_path, assignments)
    assert not gpu_recipe.evaluated_with(tmp_path, assignments + ["train.seed=7"])  # other params: run again


def test_a_fold_that_fails_is_named_with_its_log(tmp_path):
    with pytest.raises(SystemExit, match=r"fold0, fold1 failed: see .*fold0/run.log"):
        gpu_recipe.run_folds(tmp_path, SMALL + ["train.no_such_key=1"], k=2, parallel=1)


def test_seeds_train_on_one_split_then_give_their_spread_and_ensemble(tmp_path, capsys):
    """--seeds changes train.seed only, so every run has the same split (the top-level seed would draw another)."""
    seconds = gpu_recipe.run_seeds(tmp_path, SMALL, [3, 4], parallel=2)
    assert sorted(seconds) == [3, 4] and all("evaluate" in s for s in seconds.values())
    for seed in (3, 4):
        params = yaml.safe_load((tmp_path / f"seed{seed}/params.yaml").read_text())
        assert params["train"]["seed"] == seed and params["seed"] == 42
    assert (tmp_path / "seed3/data/split.csv").read_text() == (tmp_path / "seed4/data/split.csv").read_text()
    summary = gpu_recipe.report_seeds(tmp_path, seconds)
    tests = [json.loads((tmp_path / f"seed{seed}/metrics/eval.json").read_text())["dice_volume_mean"]
             for seed in (3, 4)]
    assert summary["spread"]["seeds"] == [3, 4]
    assert summary["spread"]["mean"] == pytest.approx(sum(tests) / 2, abs=1e-4)
    assert summary["spread"]["range"] == pytest.approx(abs(tests[0] - tests[1]), abs=1e-4)
    assert 0.0 <= summary["seed_ensemble"]["test"]["dice_volume_mean"] <= 1.0
    assert "seed spread on test:" in capsys.readouterr().out
