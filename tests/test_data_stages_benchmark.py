import ast
import sys

import pytest

from benchmarks import data_stages
from tests.test_download import kaggle_zip


def run(monkeypatch, capsys, *argv):
    monkeypatch.setattr(sys, "argv", ["data_stages", *argv])
    data_stages.main()
    return capsys.readouterr().out


def test_prints_each_stage_and_the_ratio_to_a_decode_with_a_setting_changed(project, synthetic_root, monkeypatch,
                                                                            capsys):
    archive = kaggle_zip(project / "archive.zip", synthetic_root)
    out = run(monkeypatch, capsys, "--archive", str(archive), "-S", "balance.total=2x", "--repeats", "2")
    assert "balance.total: 2x; -S balance.total=2x; medians of 2 run(s), alternated" in out
    # the training split grown two-fold, as the stage summary printed it
    grown = [line for line in out.splitlines() if line.startswith("{'train': {'slices'")]
    assert grown and "'augmented'" in grown[0]
    train = ast.literal_eval(grown[0])["train"]
    assert train["slices"] == 2 * (train["slices"] - train["augmented"])
    assert len(grown) == 2  # the stages ran once per repeat, each in a fresh folder
    lines = {line.strip().split("  ")[0]: line for line in out.splitlines() if "  " in line.strip()}
    for name in ("download", "index", "split", "balance", "data stages total", "decode every TIFF"):
        assert name in lines and "(runs: " in lines[name], name  # the median, then each run's figure
    assert "each run's own: " in lines["ratio"]


def test_one_run_prints_no_list_and_no_run_is_refused(project, synthetic_root, monkeypatch, capsys):
    archive = kaggle_zip(project / "archive.zip", synthetic_root)
    out = run(monkeypatch, capsys, "--archive", str(archive), "--repeats", "1")
    assert "medians of 1 run(s)" in out and "(runs: " not in out and "each run's own" not in out
    with pytest.raises(SystemExit):
        run(monkeypatch, capsys, "--archive", str(archive), "--repeats", "0")
    assert "--repeats 0: give 1 or more" in capsys.readouterr().err


def test_an_unknown_setting_is_named(project, synthetic_root, monkeypatch, capsys):
    archive = kaggle_zip(project / "archive.zip", synthetic_root)
    with pytest.raises(SystemExit, match="balance.totl"):
        run(monkeypatch, capsys, "--archive", str(archive), "-S", "balance.totl=2x")
