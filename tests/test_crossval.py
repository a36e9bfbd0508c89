import json

import pandas as pd
import pytest
import yaml

from benchmarks import crossval


def fold_table(patients, threshold, tta_flip):
    return pd.DataFrame({"patient": patients, "slices": 20, "true_volume": 100, "threshold": threshold,
                         "min_component": threshold, "largest_3d": threshold, "tta_flip": tta_flip})


def test_pooled_scores_weigh_every_patient_once_not_every_fold():
    folds = {0: fold_table(["A", "B", "C"], [0.9, 0.6, 0.0], [0.9, 0.7, 0.2]), 1: fold_table(["D"], [0.5], [0.6])}
    table = crossval.pool(folds, 2)
    assert table.fold.tolist() == [0, 0, 0, 1]
    rows = crossval.summary(table).set_index("post-processing")
    assert rows.loc["threshold", "mean"] == pytest.approx(0.5)  # (0.9+0.6+0+0.5)/4, not the folds' (0.5+0.5)/2
    assert rows.loc["threshold", "median"] == pytest.approx(0.55)
    assert rows.loc["threshold", "worst"] == "0.000 (C)"
    assert rows.loc["tta_flip", "fold means"] == "0.600 / 0.600"
    assert rows.loc["tta_flip", "patients"] == 4
    low, high = (float(x) for x in rows.loc["threshold", "95% interval"].split("-"))
    assert 0 <= low < 0.5 < high <= 0.9  # an interval of the pooled patients' mean, inside their range


def test_each_step_is_compared_with_the_step_before_patient_by_patient():
    table = crossval.pool({0: fold_table(["A", "B", "C", "D"], [0.5, 0.5, 0.5, 0.5], [0.6, 0.6, 0.6, 0.4])}, 1)
    table["tta_affine"] = table["tta_flip"] + 0.002  # within 0.005: neither better nor worse
    rows = crossval.steps(table).set_index("step")
    assert rows.index.tolist() == ["threshold -> min_component", "min_component -> largest_3d",
                                   "largest_3d -> tta_flip", "tta_flip -> tta_affine"]
    assert rows.loc["threshold -> min_component", "difference"] == 0
    assert rows.loc["threshold -> min_component", "Wilcoxon p"] == 1.0
    flip = rows.loc["largest_3d -> tta_flip"]
    assert flip["difference"] == pytest.approx(0.05) and flip["better / worse"] == "3 / 1"
    assert 0 < flip["Wilcoxon p"] < 1
    assert rows.loc["tta_flip -> tta_affine", "better / worse"] == "0 / 0"
    assert rows.loc["tta_flip -> tta_affine", "mean"] == pytest.approx(0.552)


def test_a_missing_fold_or_a_patient_in_two_folds_is_refused():
    with pytest.raises(SystemExit, match=r"folds \[2\] of 3"):
        crossval.pool({0: fold_table(["A"], [1], [1]), 1: fold_table(["B"], [1], [1])}, 3)
    assert len(crossval.pool({0: fold_table(["A"], [1], [1]), 1: fold_table(["B"], [1], [1])}, 3, partial=True)) == 2
    with pytest.raises(SystemExit, match=r"\['B'\] are validated in more than one fold"):
        crossval.pool({0: fold_table(["A", "B"], [1, 1], [1, 1]), 1: fold_table(["B"], [1], [1])}, 2)


def fake_repo(monkeypatch, runs: dict[str, dict]):
    """Experiments named like DVC's, their files served as `git show` would."""
    monkeypatch.setattr(crossval, "experiments", lambda repo: [(name, name) for name in runs])
    monkeypatch.setattr(crossval, "git_show", lambda repo, rev, path: runs[rev].get(path))


def run_files(fold, folds, table):
    evaluation = {"dice_volume_mean": 0.7 + fold / 100, "dice_volume_median": 0.8, "data": {"patients": 12},
                  "postprocess": {"chosen_on_validation": "tta_flip"}, "validation": {"patients": len(table)}}
    return {"params.yaml": yaml.safe_dump({"split": {"folds": folds, "fold": fold}}),
            "metrics/per_patient_validation.csv": table.to_csv(index=False),
            "metrics/eval.json": json.dumps(evaluation)}


def test_main_reads_each_experiment_fold_and_prints_the_pooled_table(monkeypatch, capsys):
    fake_repo(monkeypatch, {"cv-b": run_files(1, 2, fold_table(["C"], [0.4], [0.5])),
                            "cv-a": run_files(0, 2, fold_table(["A", "B"], [0.8, 0.6], [0.9, 0.7]))})
    crossval.main(["--exp", "cv-b", "--exp", "cv-a"])
    out = capsys.readouterr().out
    assert "2-fold cross-validation over 3 non-test patients" in out
    assert "| threshold | 3 | 0.600 | 0.400-0.733 | 0.600 | 0.400 (C) | 0.700 / 0.400 |" in out
    assert "| tta_flip | 3 | 0.700 | 0.567-0.900 | 0.700 | 0.500 (C) | 0.800 / 0.500 |" in out
    assert "| largest_3d -> tta_flip | 3 | 0.700 | 0.100 | - | 3 / 0 | 0.250 |" in out  # each step against the last
    assert "fold 0: test per-volume Dice 0.700" in out and "fold 1: test per-volume Dice 0.710" in out


def test_an_unfinished_cross_validation_is_pooled_only_when_asked_and_says_so(monkeypatch, capsys):
    fake_repo(monkeypatch, {"cv-a": run_files(0, 3, fold_table(["A", "B"], [0.8, 0.6], [0.9, 0.7])),
                            "cv-c": run_files(2, 3, fold_table(["C"], [0.4], [0.5]))})
    with pytest.raises(SystemExit, match=r"folds \[1\] of 3"):
        crossval.main(["--exp", "cv-a", "--exp", "cv-c"])
    crossval.main(["--exp", "cv-a", "--exp", "cv-c", "--partial"])
    assert "3-fold cross-validation (PARTIAL: folds [0, 2] only) over 3 non-test patients" in capsys.readouterr().out


def test_runs_that_do_not_make_one_k_fold_set_are_refused(monkeypatch):
    table = fold_table(["A"], [1], [1])
    fake_repo(monkeypatch, {"a": run_files(0, 2, table), "b": run_files(0, 2, fold_table(["B"], [1], [1])),
                            "c": run_files(1, 3, table), "plain": run_files(0, 0, table)})
    with pytest.raises(SystemExit, match="fold 0 is named twice"):
        crossval.main(["--exp", "a", "--exp", "b"])
    with pytest.raises(SystemExit, match="different split.folds"):
        crossval.main(["--exp", "a", "--exp", "c"])
    with pytest.raises(SystemExit, match="not a k-fold run"):
        crossval.main(["--exp", "plain"])
    with pytest.raises(SystemExit, match="no experiment named nope"):
        crossval.main(["--exp", "nope"])


def test_a_lever_is_compared_with_its_baseline_patient_by_patient(monkeypatch, capsys):
    patients = [f"P{i}" for i in range(8)]
    base = [0.5, 0.6, 0.7, 0.8, 0.4, 0.5, 0.6, 0.9]
    lever = [b + d for b, d in zip(base, [0.05, 0.04, 0.06, 0.02, 0.03, 0.05, -0.01, 0.0])]
    table = crossval.paired(crossval.pool({0: fold_table(patients[:4], lever[:4], lever[:4]),
                                           1: fold_table(patients[4:], lever[4:], lever[4:])}, 2),
                            crossval.pool({0: fold_table(patients[:4], base[:4], base[:4]),
                                           1: fold_table(patients[4:], base[4:], base[4:])}, 2))
    row = table.set_index("post-processing").loc["threshold"]
    assert row["difference"] == pytest.approx(0.03) and row["better / worse"] == "6 / 1"
    assert 0.01 < row["Wilcoxon p"] < 0.1  # six of seven non-zero differences positive: suggestive, not sure
    low, high = (float(x) for x in row["95% interval"].split(" to "))
    assert 0 < low < 0.03 < high < 0.06  # the mean gain's interval, over these eight patients
    same = crossval.pool({0: fold_table(patients, base, base)}, 1)
    assert crossval.paired(same, same).loc[0, "Wilcoxon p"] == 1.0
    assert crossval.paired(same, same).loc[0, "95% interval"] == "-"  # no difference, no interval
    with pytest.raises(SystemExit, match="different patients"):
        crossval.paired(same, crossval.pool({0: fold_table(patients[:7], base[:7], base[:7])}, 1))

    fake_repo(monkeypatch, {"lev-a": run_files(0, 2, fold_table(patients[:4], lever[:4], lever[:4])),
                            "lev-b": run_files(1, 2, fold_table(patients[4:], lever[4:], lever[4:])),
                            "base-a": run_files(0, 2, fold_table(patients[:4], base[:4], base[:4])),
                            "base-b": run_files(1, 2, fold_table(patients[4:], base[4:], base[4:]))})
    crossval.main(["--exp", "lev-a", "--exp", "lev-b", "--against", "base-a", "--against", "base-b"])
    out = capsys.readouterr().out
    assert "against base-a, base-b, patient by patient:" in out
    assert "| threshold | 8 | 0.655 | 0.625 | 0.030 | +0.011 to +0.044 | 6 / 1 |" in out
    with pytest.raises(SystemExit, match="pair the same folds"):
        crossval.main(["--exp", "lev-a", "--exp", "lev-b", "--against", "base-a", "--partial"])


def test_run_folders_are_pooled_as_experiments_are(tmp_path, capsys):
    # benchmarks.gpu_recipe workdirs: the same three files, read from disk
    runs = []
    for fold, table in ((0, fold_table(["A", "B"], [0.8, 0.6], [0.9, 0.7])), (1, fold_table(["C"], [0.4], [0.5]))):
        run = tmp_path / f"f{fold}"
        for path, text in run_files(fold, 2, table).items():
            (run / path).parent.mkdir(parents=True, exist_ok=True)
            (run / path).write_text(text)
        runs.append(str(run))
    crossval.main(["--run", runs[1], "--run", runs[0]])
    out = capsys.readouterr().out
    assert "2-fold cross-validation over 3 non-test patients" in out
    assert "| tta_flip | 3 | 0.700 | 0.567-0.900 | 0.700 | 0.500 (C) | 0.800 / 0.500 |" in out
    with pytest.raises(SystemExit, match="no metrics/per_patient_validation.csv"):
        crossval.main(["--run", str(tmp_path / "nowhere")])
    with pytest.raises(SystemExit):  # one kind of run or the other
        crossval.main(["--run", runs[0], "--exp", "cv-a"])
