import json

import pandas as pd
import pytest
import yaml

from benchmarks import seeds


def evaluation(threshold, chosen_value, test, chosen="tta_flip"):
    compare = {"threshold": {"dice_volume_mean": threshold}, chosen: {"dice_volume_mean": chosen_value}}
    return {"validation": {"patients": 9, "postprocess_compare": compare},
            "postprocess": {"chosen_on_validation": chosen},
            "dice_volume_mean": test, "dice_volume_median": test + 0.05}


PATIENTS = pd.DataFrame({"patient": ["TCGA_A", "TCGA_B", "TCGA_C"], "dice": [0.9, 0.2, 0.8]})


def params(train_seed, seed=42, val=0.15):
    return {"seed": seed, "split": {"val": val, "test": 0.2, "folds": 0, "fold": 0}, "train": {"seed": train_seed},
            "profile": "cpu", "profiles": {"cpu": {}, "demo": {"members": None}}}


def test_run_row_reads_validation_test_and_the_worst_patient():
    row = seeds.run_row("ds-s7", params(7), evaluation(0.80, 0.83, 0.76), {"epochs": 14, "best_epoch": 9}, PATIENTS)
    assert row["seed"] == 7 and row["epochs (best)"] == "14 (9)" and row["chosen"] == "tta_flip"
    assert (row["validation, threshold only"], row["validation, chosen"], row["test mean"]) == (0.80, 0.83, 0.76)
    assert row["test worst"] == "0.200 (TCGA_B)"
    low, high = (float(x) for x in row["test 95% interval"].split("-"))
    assert low < PATIENTS.dice.mean() < high


def test_a_run_whose_patients_score_alike_has_no_interval():
    alike = PATIENTS.assign(dice=0.8)
    assert seeds.run_row("x", params(7), evaluation(0.8, 0.8, 0.8), {}, alike)["test 95% interval"] == "-"


def test_a_null_train_seed_is_the_top_level_seed():
    assert seeds.run_seed(params(None, seed=3)) == 3 and seeds.run_seed(params(5, seed=3)) == 5


def ensemble(members, **train):
    return {**params(None), "train": {"seed": None, "members": members, **train}}


def test_a_seed_ensemble_is_named_by_its_members_seeds_and_counted_as_an_ensemble():
    assert seeds.run_seed(ensemble([42, 7, 1])) == "42+7+1"
    assert seeds.run_seed(ensemble(None)) == 42
    assert seeds.unit(pd.DataFrame({"seed": ["42+7+1", "3+5+11"]})) == "ensemble"
    assert seeds.unit(rows([0.8, 0.7])) == "seed"


def test_a_distilled_ensemble_is_named_and_counted_as_one():
    assert seeds.run_seed(ensemble([42, 7, 1], distil=0.5)) == "42+7+1 distilled"
    assert seeds.run_seed(ensemble([42, 7, 1], distil=0)) == "42+7+1"
    assert seeds.unit(pd.DataFrame({"seed": ["42+7+1 distilled", "3+5+11 distilled"]})) == "distilled ensemble"
    with pytest.raises(SystemExit, match="differ in more than their seeds: train.distil"):
        seeds.same_recipe({"a": ensemble([42, 7, 1], distil=0.5), "b": ensemble([3, 5, 11])})


def test_seed_ensembles_of_one_recipe_may_differ_in_their_members_not_in_their_number():
    seeds.same_recipe({"a": ensemble([42, 7, 1]), "b": ensemble([3, 5, 11])})
    seeds.same_recipe({"a": params(1), "b": ensemble(None)})  # a run from before train.members: null
    with pytest.raises(SystemExit, match="differ in more than their seeds: train.members"):
        seeds.same_recipe({"a": ensemble([42, 7, 1]), "b": ensemble([3, 5])})
    with pytest.raises(SystemExit, match="differ in more than their seeds: train.members"):
        seeds.same_recipe({"a": ensemble([42, 7, 1]), "b": params(3)})


def test_one_network_on_its_seeds_copies_is_the_recipe_of_both_seeds_drawn_and_a_profile_may_train_one():
    # balance.seed members (the default since the forty-first round) with one network: its seed's draw, as the
    # runs of `-S train.seed=N -S balance.seed=N` drew theirs
    now = {**params(7), "balance": {"seed": "members"}, "train": {"seed": 7, "members": None}}
    before = {**params(3), "balance": {"seed": 3}, "train": {"seed": 3, "members": None}}
    assert (seeds.run_seed(now), seeds.run_copies(now)) == (7, 7)
    seeds.same_recipe({"a": now, "b": before})
    demo = {**ensemble([42, 7, 1]), "profile": "demo", "balance": {"seed": "members"}}
    assert (seeds.run_seed(demo), seeds.run_copies(demo)) == (42, 42)


def test_an_ensemble_whose_members_drew_their_own_copies_is_another_recipe_named_by_their_seeds():
    own = {**ensemble([42, 7, 1]), "balance": {"seed": "members"}}
    assert seeds.run_copies(own) == "42+7+1" and seeds.run_copies(ensemble([42, 7, 1])) == 42
    seeds.same_recipe({"a": own, "b": {**ensemble([3, 5, 11]), "balance": {"seed": "members"}}})
    with pytest.raises(SystemExit, match="differ in more than their seeds: balance.seed"):
        seeds.same_recipe({"a": own, "b": ensemble([3, 5, 11])})
    mine = pd.DataFrame([{**rows([0.8]).iloc[0], "seed": "42+7+1", "copies": "42+7+1"}])
    with pytest.raises(SystemExit, match="no seed in common"):  # text against numbers: no match, no dtype clash
        seeds.paired(mine, rows([0.8]))


def test_a_run_without_validation_scores_is_refused_by_name():
    with pytest.raises(SystemExit, match="unet-cpu.*no validation"):
        seeds.run_row("unet-cpu", params(42), {"dice_volume_mean": 0.6}, {}, PATIENTS)


def rows(tests, thresholds=None, chosen=None, start=0):
    n = len(tests)
    return pd.DataFrame({"run": [f"r{i}" for i in range(n)], "seed": list(range(start, start + n)), "copies": 42,
                         "test mean": tests,
                         "validation, threshold only": thresholds or [0.8] * n,
                         "validation, chosen": chosen or [0.8] * n})


def test_spread_counts_the_pairs_within_the_tolerance_edge_included():
    s = seeds.spread([0.78, 0.76, 0.70])
    assert s["pairs"] == 3 and s["pairs within"] == 1  # 0.78-0.76 = 0.02 counts; the two others do not
    assert s["range"] == pytest.approx(0.08) and s["mean"] == pytest.approx(0.74667, abs=1e-4)
    assert "1 of 3 pairs" in seeds.spread_line(s) and seeds.spread_line(s).endswith("not met")
    assert seeds.spread_line(seeds.spread([0.78, 0.77])).endswith(": met")


def test_paired_differences_follow_the_seed_and_validation_decides():
    lever = rows([0.80, 0.70], thresholds=[0.82, 0.78], chosen=[0.84, 0.79])
    base = rows([0.75, 0.75], thresholds=[0.80, 0.80], chosen=[0.80, 0.80]).iloc[::-1]  # order does not matter
    d = seeds.paired(lever, base)
    assert d["validation, chosen"].round(3).tolist() == [0.04, -0.01]
    assert d["test mean"].round(3).tolist() == [0.05, -0.05]
    text = seeds.verdict(d)
    assert "mean difference +0.015" in text and "ahead in 1 and behind in 1 of 2 seeds" in text


def test_paired_without_a_common_seed_is_refused():
    with pytest.raises(SystemExit, match="no seed in common"):
        seeds.paired(rows([0.8]), rows([0.8], start=5))


def test_runs_of_different_splits_are_refused():
    seeds.same_split({"a": params(1), "b": params(2)})
    with pytest.raises(SystemExit, match="do not share one split"):
        seeds.same_split({"a": params(1), "b": params(2, val=0.2)})
    with pytest.raises(SystemExit, match="do not share one split"):
        seeds.same_split({"a": params(1), "b": params(1, seed=7)})


def test_the_runs_of_one_recipe_differ_in_their_training_seed_only():
    seeds.same_recipe({"a": params(1), "b": params(2)})
    other = params(2)
    other["train"]["patience"] = 10
    with pytest.raises(SystemExit, match="differ in more than their seeds: train.patience"):
        seeds.same_recipe({"a": {**params(1), "train": {"seed": 1, "patience": 5}}, "b": other})
    with pytest.raises(SystemExit, match="differ in more than their seeds: train.patience"):
        seeds.same_recipe({"a": params(1), "b": other})  # a key only one run has


def test_select_takes_shell_patterns_and_names():
    found = [("ds-s42", "a"), ("ds-s7", "b"), ("p10-s42", "c")]
    assert seeds.select(found, ["ds-s*"]) == {"ds-s42": "a", "ds-s7": "b"}
    assert seeds.select(found, ["p10-s42", "ds-s7"]) == {"ds-s7": "b", "p10-s42": "c"}
    with pytest.raises(SystemExit, match="no experiment matches"):
        seeds.select(found, ["bnm-*"])


def fake_repo(monkeypatch, runs):
    """git_show over {commit: {path: text}}."""
    monkeypatch.setattr(seeds, "git_show", lambda repo, rev, path: runs[rev].get(path))


def files(train_seed, test, **train):
    p = params(train_seed)
    p["train"].update(train)
    return {"params.yaml": yaml.safe_dump(p),
            "metrics/eval.json": json.dumps(evaluation(0.8, 0.81, test)),
            "metrics/train.json": json.dumps({"epochs": 20, "best_epoch": 15}),
            "metrics/per_patient.csv": PATIENTS.to_csv(index=False)}


def test_load_sorts_by_seed_and_refuses_a_seed_twice_or_a_missing_file(monkeypatch, tmp_path):
    fake_repo(monkeypatch, {"a": files(42, 0.78), "b": files(7, 0.76), "c": files(7, 0.70),
                            "d": {**files(1, 0.7), "metrics/eval.json": None}})
    table, found = seeds.load(tmp_path, {"x-s42": "a", "x-s7": "b"})
    assert table.seed.tolist() == [7, 42] and table["test mean"].tolist() == [0.76, 0.78]
    assert set(found) == {"x-s42", "x-s7"}
    with pytest.raises(SystemExit, match="seeds \\[\\(7, 42\\)\\]"):
        seeds.load(tmp_path, {"x-s7": "b", "y-s7": "c"})
    with pytest.raises(SystemExit, match="x-s1: its commit has no metrics/eval.json"):
        seeds.load(tmp_path, {"x-s1": "d"})


def test_main_prints_the_spread_and_the_paired_verdict(monkeypatch, tmp_path, capsys):
    fake_repo(monkeypatch, {"a": files(42, 0.78), "b": files(7, 0.76),
                            "c": files(42, 0.80, patience=10), "d": files(7, 0.70, patience=10)})
    monkeypatch.setattr(seeds, "experiments",
                        lambda repo: [("ds-s42", "a"), ("ds-s7", "b"), ("p10-s42", "c"), ("p10-s7", "d")])
    seeds.main(["--repo", str(tmp_path), "--exp", "p10-s*", "--against", "ds-s*"])
    out = capsys.readouterr().out
    assert "over 2 seeds: mean 0.750, sd 0.071, range 0.100; 0 of 1 pair of seeds within 0.02: not met" in out
    assert "over 2 seeds: mean 0.770, sd 0.014, range 0.020; 1 of 1 pair of seeds within 0.02: met" in out
    assert "| 42 | 42 | p10-s42 vs ds-s42 | +0.000 | +0.000 | +0.020 |" in out
    assert "| 7 | 42 | p10-s7 vs ds-s7 | +0.000 | +0.000 | -0.060 |" in out
    assert "Test, for the record only: -0.020" in out
    assert "validation patient by patient: not available" in out  # these runs have no per_patient_validation.csv


def copies(train_seed, balance_seed, test=0.78):
    """A run's files with balance.seed set (None: the top-level seed's copies)."""
    run = files(train_seed, test)
    p = yaml.safe_load(run["params.yaml"])
    p["balance"] = {"total": "auto", "seed": balance_seed}
    return {**run, "params.yaml": yaml.safe_dump(p)}


def test_runs_differing_in_their_copies_seed_are_one_recipe_and_pair_by_both_seeds(monkeypatch, tmp_path):
    fake_repo(monkeypatch, {"a": copies(42, None), "b": copies(42, 7, 0.74), "c": copies(42, 42, 0.76),
                            "d": copies(7, 7, 0.70)})
    table, _ = seeds.load(tmp_path, {"cs-c42": "a", "cs-c7": "b", "ts-s7": "d"})
    assert list(zip(table.seed, table.copies)) == [(7, 7), (42, 7), (42, 42)]  # null is the top-level seed, 42
    with pytest.raises(SystemExit, match="\\(42, 42\\)"):
        seeds.load(tmp_path, {"cs-c42": "a", "x": "c"})  # balance.seed 42 draws the same copies as null
    lever, _ = seeds.load(tmp_path, {"x": "c", "y": "b"})
    base, _ = seeds.load(tmp_path, {"cs-c42": "a", "ts-s7": "d"})
    d = seeds.paired(lever, base)
    assert d["run"].tolist() == ["x vs cs-c42"] and d["test mean"].round(3).tolist() == [-0.02]
    with pytest.raises(SystemExit, match="no seed in common.*\\(42, 7\\)"):
        seeds.paired(lever.iloc[:1], base)  # y: seed 42 with copies 7


def validation_csv(threshold, chosen, patients=("TCGA_A", "TCGA_B", "TCGA_C")):
    """A run's metrics/per_patient_validation.csv; `chosen` is the tta_flip column, which evaluation() says it chose."""
    return pd.DataFrame({"patient": list(patients), "slices": 20, "true_volume": 100, "threshold": threshold,
                         "tta_flip": chosen}).to_csv(index=False)


def test_each_validation_patients_difference_is_averaged_over_the_seed_pairs(monkeypatch, tmp_path):
    runs = {"a": validation_csv([0.5, 0.6, 0.7], [0.6, 0.6, 0.7]),
            "b": validation_csv([0.5, 0.6, 0.7], [0.8, 0.6, 0.6]),
            "c": validation_csv([0.6, 0.6, 0.7], [0.6, 0.6, 0.7]),
            "d": validation_csv([0.5, 0.6, 0.7], [0.6, 0.6, 0.7])}
    fake_repo(monkeypatch, {sha: {"metrics/per_patient_validation.csv": text} for sha, text in runs.items()})
    names = {"lev-s1": "a", "lev-s2": "b", "base-s1": "c", "base-s2": "d"}
    tables = seeds.validation_patients(tmp_path, names, dict.fromkeys(names, "tta_flip"))
    differences = pd.DataFrame({"run": ["lev-s1 vs base-s1", "lev-s2 vs base-s2"]})
    by_patient = seeds.patient_differences(differences, tables)
    # TCGA_A: chosen (0.6 - 0.6 + 0.8 - 0.6) / 2, threshold only (0.5 - 0.6 + 0.5 - 0.5) / 2
    assert by_patient.loc["TCGA_A", "chosen"] == pytest.approx(0.1)
    assert by_patient.loc["TCGA_A", "threshold only"] == pytest.approx(-0.05)
    assert by_patient["chosen"].tolist() == pytest.approx([0.1, 0.0, -0.05])
    line = seeds.patient_verdict(by_patient, 2)
    assert line.startswith("validation patient by patient (3 patients, each one's difference averaged over 2 seed "
                           "pairs)")
    assert "chosen +0.017 (95% interval" in line and "for 1 / 1 patients" in line
    assert seeds.patient_differences(pd.DataFrame({"run": ["lev-s1 vs base-s9"]}), tables) is None


def test_main_compares_the_validation_patients_when_every_run_has_their_file(monkeypatch, tmp_path, capsys):
    lever = [0.70, 0.62, 0.81, 0.55, 0.90, 0.66]
    patients = [f"TCGA_{c}" for c in "ABCDEF"]
    runs = (("a", 42, 0.0, {}), ("b", 7, 0.0, {}), ("c", 42, -0.03, {"patience": 10}),
            ("d", 7, -0.01, {"patience": 10}))
    with_tables = {sha: {**files(seed, 0.78, **extra), "metrics/per_patient_validation.csv":
                         validation_csv([v - gain for v in lever], [v - gain for v in lever], patients)}
                   for sha, seed, gain, extra in runs}
    fake_repo(monkeypatch, with_tables)
    monkeypatch.setattr(seeds, "experiments",
                        lambda repo: [("ds-s42", "a"), ("ds-s7", "b"), ("p10-s42", "c"), ("p10-s7", "d")])
    seeds.main(["--repo", str(tmp_path), "--exp", "p10-s*", "--against", "ds-s*"])
    out = capsys.readouterr().out
    # every patient gains 0.03 in one pair and 0.01 in the other: +0.02 each, an interval of no width is undefined
    assert "validation patient by patient (6 patients, each one's difference averaged over 2 seed pairs)" \
        in out
    assert "chosen +0.020 (95% interval -)" in out and "for 6 / 0 patients" in out
