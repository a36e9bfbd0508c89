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


def test_a_cut_below_a_position_removes_the_low_slices_predictions_and_rescores():
    slices = errors.slice_table(*volume()).assign(run="r", patient="p")
    table = errors.below_cut(slices, cuts=(0.2, 0.5)).set_index("below position")
    assert table.loc[0.0, "mean per-volume Dice"] == pytest.approx(4 / 12)  # nothing removed: as segmented
    # slice 0 (position 0) holds the 2 false positives on a tumour-free slice: 2TP / (7 true + 3 predicted)
    assert table.loc[0.2, "predicted pixels removed"] == 2 and table.loc[0.2, "of them tumour"] == 0
    assert table.loc[0.2, "mean per-volume Dice"] == pytest.approx(4 / 10)
    # below 0.5 also takes slice 1, whose 3 predicted pixels hold 2 of the true positives
    assert table.loc[0.5, "predicted pixels removed"] == 5 and table.loc[0.5, "of them tumour"] == 2
    assert table.loc[0.5, "mean per-volume Dice"] == 0.0


def test_the_model_comes_from_the_dvc_cache_by_the_locks_hash(tmp_path):
    md5 = "a182944097733f98d8ea8117c918689c"
    lock = {"stages": {"index": {"outs": [{"path": "data/index.csv", "md5": "x"}]},
                       "train": {"outs": [{"path": "models/model.keras", "md5": md5}]}}}
    assert errors.model_hash(lock) == md5
    assert errors.validation_model_hash(lock) == md5  # a run from before train.refit: one model
    lock["stages"]["train"]["outs"].append({"path": "models/selection.keras", "md5": "c" * 32})
    assert errors.validation_model_hash(lock) == "c" * 32  # the model that saw no validation patient
    with pytest.raises(SystemExit, match="not in the DVC cache"):
        errors.cached_model(tmp_path, md5, tmp_path)
    cached = tmp_path / ".dvc/cache/files/md5/a1" / md5[2:]
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"model")
    assert errors.cached_model(tmp_path, md5, tmp_path).name == f"{md5}.keras"
    with pytest.raises(SystemExit, match="pass --data"):
        errors.data_path({"data": {"source": "kaggle"}}, None, "run")


def test_patients_are_read_from_the_source_and_every_pixel_is_accounted_for(synthetic_root, tmp_path):
    """The real path on the synthetic data set: slices in volume order, every true pixel either found or missed,
    every predicted pixel either right or a false positive."""
    import keras

    from stages import index, rawdata

    inputs = keras.Input((32, 32, 3))
    conv = keras.layers.Conv2D(1, 1, activation="sigmoid")
    model = keras.Model(inputs, conv(inputs), name="unet")
    conv.set_weights([np.array([-40.0, 40.0, 0.0], np.float32).reshape(1, 1, 3, 1), np.array([-2.0], np.float32)])
    model.save(tmp_path / "m.keras")
    raw = rawdata.open_raw(synthetic_root)
    frame = index.pair_slices(raw)[0]
    patients = sorted(frame["patient"].unique())[:2]
    per_patient, slices = errors.segment_patients(tmp_path / "m.keras", raw, frame, patients, 0.5, "run")
    assert per_patient["patient"].tolist() == patients and len(slices) == (frame["patient"].isin(patients)).sum()
    _, masks, _ = index.load_slices(raw, frame[frame["patient"] == patients[0]].reset_index(drop=True),
                                    progress=False)
    first = per_patient.iloc[0]
    assert first["true"] == masks.sum() > 0
    assert first["tp"] + first["fn_missed_slices"] + first["fn_found_slices"] == first["true"]
    assert slices[slices["patient"] == patients[0]]["true"].tolist() == masks.sum(axis=(1, 2)).tolist()
    assert (slices["pred"] >= slices["tp"]).all() and slices["pred"].sum() > 0
    with pytest.raises(SystemExit, match="TCGA_XX_0000 is not in"):
        errors.segment_patients(tmp_path / "m.keras", raw, frame, ["TCGA_XX_0000"], 0.5, "run")


def test_validation_runs_give_each_experiments_files_model_and_source(synthetic_root, tmp_path, monkeypatch):
    """An experiment read as crossval reads it (params, validation table, eval.json from git) and its model from the
    DVC cache by dvc.lock's hash, on the data it names."""
    import json

    import yaml

    from benchmarks import crossval

    md5 = "b182944097733f98d8ea8117c918689c"
    files = {"params.yaml": yaml.safe_dump({"data": {"source": "archive", "archive": str(synthetic_root)},
                                            "split": {"folds": 2, "fold": 0}}),
             "metrics/per_patient_validation.csv": "patient,threshold\nTCGA_AA_0001,0.5\n",
             "metrics/eval.json": json.dumps({"dice_volume_mean": 0.5}),
             "dvc.lock": yaml.safe_dump({"stages": {"train": {"outs": [{"path": "models/model.keras", "md5": md5}]}}})}
    monkeypatch.setattr(errors, "commits", lambda repo, names: {name: "rev" for name in names})
    for module in (errors, crossval):
        monkeypatch.setattr(module, "git_show", lambda repo, rev, path: files.get(path))
    cached = tmp_path / ".dvc/cache/files/md5" / md5[:2] / md5[2:]
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"model")
    (tmp_path / "models").mkdir()
    runs = list(errors.validation_runs(tmp_path, ["run-a"], None, tmp_path / "models"))
    assert len(runs) == 1
    name, params, validation, model, raw, frame = runs[0]
    assert name == "run-a" and params["split"]["fold"] == 0 and validation["patient"].tolist() == ["TCGA_AA_0001"]
    assert model.read_bytes() == b"model" and len(frame) > 0 and frame["patient"].nunique() > 1
