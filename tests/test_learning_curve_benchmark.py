import json

import numpy as np
import pandas as pd
import pytest

from benchmarks import learning_curve
from tests.conftest import set_params, write_prepared


def training_table():
    rows = [{"patient": f"P{p}", "row": 3 * p + s, "copy": -1} for p in range(5) for s in range(3)]
    rows += [{"patient": f"P{p}", "row": 3 * p, "copy": p} for p in (1, 3)]  # augmented copies follow their patient
    return pd.DataFrame(rows)


def test_a_subset_keeps_whole_patients_with_their_copies_in_order():
    train = training_table()
    table = learning_curve.subset_table(train, 2, subset=1)
    assert table["patient"].nunique() == 2
    for patient, rows in train.groupby("patient"):
        assert len(table[table.patient == patient]) in (0, len(rows))  # a patient whole, or not at all
    assert (np.diff(table.index) > 0).all() and (table["copy"].to_numpy()[:-1] <= table["copy"].to_numpy()[1:]).all()
    assert learning_curve.subset_table(train, 2, subset=1).equals(table)  # the same draw for the same subset
    with pytest.raises(SystemExit, match="5 patients"):
        learning_curve.subset_table(train, 6, subset=1)


def test_epochs_scale_so_the_optimizer_steps_stay_those_of_the_full_set():
    assert learning_curve.scaled_epochs(20, 2043, 1027) == 40
    assert learning_curve.scaled_epochs(20, 2043, 2043) == 20
    assert learning_curve.scaled_epochs(1, 100, 1000) == 1


def test_a_small_curve_is_trained_scored_and_read_back(project, tmp_path, capsys):
    """Two patients' tiny prepared split: one of them kept, trained two epochs of the demo profile, evaluated."""
    data = write_prepared(project / "data", (("train", 8), ("val", 4), ("test", 4)))
    train = pd.read_csv(data / "prepared/train.csv")
    train.loc[train.index[:3], "patient"] = "TCGA_XX_0002"  # two patients, so one can be left out
    train.to_csv(data / "prepared/train.csv", index=False)
    (data / "raw").mkdir(exist_ok=True)
    (data / "raw/SOURCE.json").write_text('{"source": "synthetic"}')
    set_params(project, profile="demo", **{"profiles.demo.epochs": 1, "profiles.demo.filters": 4})
    learning_curve.main(["--workdir", str(tmp_path / "lc"), "--patients", "1"])
    root = tmp_path / "lc/p1-1"
    kept = pd.read_csv(root / "data/prepared/train.csv")
    assert kept["patient"].nunique() == 1 and len(kept) < len(train)
    assert json.loads((root / "metrics/train.json").read_text())["epochs"] == round(len(train) / len(kept))
    assert "dice_volume_mean" in json.loads((root / "metrics/eval.json").read_text())
    (root / "models/model.keras").unlink()  # a finished run is read back, not trained again
    learning_curve.main(["--workdir", str(tmp_path / "lc"), "--patients", "1"])
    assert "per-volume Dice against the number of training patients (of 2)" in capsys.readouterr().out


def test_refit_trains_each_run_again_on_all_training_patients_and_scores_it_on_validation(project, tmp_path,
                                                                                        capsys):
    data = write_prepared(project / "data", (("train", 8), ("val", 4), ("test", 4)))
    train = pd.read_csv(data / "prepared/train.csv")
    train.loc[train.index[:3], "patient"] = "TCGA_XX_0002"
    train.to_csv(data / "prepared/train.csv", index=False)
    (data / "raw").mkdir(exist_ok=True)
    (data / "raw/SOURCE.json").write_text('{"source": "synthetic"}')
    set_params(project, profile="demo", **{"profiles.demo.epochs": 1, "profiles.demo.filters": 4})
    learning_curve.main(["--workdir", str(tmp_path / "lc"), "--patients", "1", "--refit"])

    first = json.loads((tmp_path / "lc/p1-1/metrics/train.json").read_text())
    again = tmp_path / "lc/p1-1-refit"
    refit = json.loads((again / "metrics/train.json").read_text())
    assert refit["epochs"] == first["best_epoch"] and refit["train_slices"] == len(train)  # every training slice
    kept = set(pd.read_csv(tmp_path / "lc/p1-1/data/prepared/train.csv")["patient"])
    added = pd.read_csv(again / "data/prepared/refit.csv")
    assert set(added["patient"]) == {"TCGA_XX_0001", "TCGA_XX_0002"} - kept
    left_out = train[~train["patient"].isin(kept)].reset_index(drop=True)  # the patient left out, copies too
    pd.testing.assert_frame_equal(added, left_out, check_dtype=False)
    result = json.loads((again / "metrics/eval.json").read_text())
    assert result["model"]["refit"] is False  # no selection model here: the refit itself is scored on validation
    assert "refit on all" in capsys.readouterr().out
