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
