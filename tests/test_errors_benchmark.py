import numpy as np
import pandas as pd
import pytest

from benchmarks import errors


def volume():
    """Four 4x4 slices: a tumour-free slice with a false positive, a tumour slice found in part, a tumour slice
    missed outright, a clean tumour-free slice."""
    truth = np.zeros((4, 4, 4), bool)
    pred = np.zeros_like(truth)
    pred[0, 0, :2] = True                      # 2 false positives where there is no tumour
    truth[1, :2, :2] = True                    # 4 tumour pixels ...
    pred[1, 0, :3] = True                      # ... 2 found, 2 missed, 1 false positive beside them
    truth[2, 3, :3] = True                     # 3 tumour pixels, none found
    return truth, pred


def test_wrong_pixels_are_split_by_kind():
    slices = errors.slice_table(*volume())
    assert slices["position"].tolist() == pytest.approx([0, 1 / 3, 2 / 3, 1])
    assert errors.patient_errors(slices) == {"true": 7, "tp": 2, "fn_missed_slices": 3, "fn_found_slices": 2,
                                             "fp_tumour_free": 2, "fp_tumour_slices": 1}


def test_ceilings_count_a_removed_kind_as_right():
    row = pd.DataFrame([errors.patient_errors(errors.slice_table(*volume()))])
    assert errors.volume_dice(row)[0] == pytest.approx(4 / 12)  # 2TP / (2TP + 3 + 2 + 2 + 1)
    assert errors.volume_dice(row, ("fp_tumour_free",))[0] == pytest.approx(4 / 10)
    assert errors.volume_dice(row, ("fn_missed_slices",))[0] == pytest.approx(10 / 15)  # 3 more true positives
    table = errors.ceilings(row).set_index("error")
    assert table.loc["fp_tumour_free", "share"] == "25%"
    assert table.loc["all false positives", "mean per-volume Dice"] == pytest.approx(4 / 9)
    assert table.loc["all missed tumour", "mean per-volume Dice"] == pytest.approx(1.0 - 3 / 17)
    empty = pd.DataFrame([{"true": 0, "tp": 0, **dict.fromkeys(errors.KINDS, 0)}])
    assert errors.volume_dice(empty)[0] == 1.0  # nothing to find, nothing predicted


def test_false_positives_are_placed_by_tenth_of_the_volume():
    table = errors.by_position(errors.slice_table(*volume()), bins=2).set_index("tenth")
    assert table.loc[0].tolist() == [1, 1, 2, 1, 4]  # slices 0-1: one tumour-free with 2 FP pixels, one tumour
    assert table.loc[1].tolist() == [1, 0, 0, 1, 3]


def test_the_model_comes_from_the_dvc_cache_by_the_locks_hash(tmp_path):
    md5 = "a182944097733f98d8ea8117c918689c"
    lock = {"stages": {"index": {"outs": [{"path": "data/index.csv", "md5": "x"}]},
                       "train": {"outs": [{"path": "models/model.keras", "md5": md5}]}}}
    assert errors.model_hash(lock) == md5
    with pytest.raises(SystemExit, match="not in the DVC cache"):
        errors.cached_model(tmp_path, md5, tmp_path)
    cached = tmp_path / ".dvc/cache/files/md5/a1" / md5[2:]
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"model")
    assert errors.cached_model(tmp_path, md5, tmp_path).name == f"{md5}.keras"
    with pytest.raises(SystemExit, match="pass --data"):
        errors.data_path({"data": {"source": "kaggle"}}, None, "run")
