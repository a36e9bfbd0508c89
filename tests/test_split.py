import pandas as pd
import pytest

from stages.common import BrainsegError
from stages.split import check_split, patient_table, split_patients


def patients(n=40, sites=("CS", "DU", "EZ", "FG", "HT")):
    return pd.DataFrame({"patient": [f"TCGA_{sites[i % len(sites)]}_{i:04d}" for i in range(n)],
                         "institution": [sites[i % len(sites)] for i in range(n)],
                         "slices": 20, "tumour_slices": 5})


def test_patient_table_groups_slices():
    index = pd.DataFrame({"patient": ["A", "A", "B"], "institution": ["CS", "CS", "DU"], "slice": [1, 2, 1],
                          "tumour": [True, False, True]})
    table = patient_table(index)
    assert table.to_dict("records") == [
        {"patient": "A", "institution": "CS", "slices": 2, "tumour_slices": 1},
        {"patient": "B", "institution": "DU", "slices": 1, "tumour_slices": 1}]


def test_each_patient_in_exactly_one_split_with_requested_fractions():
    table = split_patients(patients(), val=0.15, test=0.2, seed=1)
    assert table["patient"].is_unique
    assert table["split"].value_counts().to_dict() == {"train": 26, "test": 8, "val": 6}
    for name in ("val", "test"):
        assert table[table["split"] == name]["institution"].nunique() >= 3  # sites spread


def test_seeded_and_seed_matters():
    a = split_patients(patients(), 0.15, 0.2, seed=1)
    assert a.equals(split_patients(patients(), 0.15, 0.2, seed=1))
    assert not a.equals(split_patients(patients(), 0.15, 0.2, seed=2))


def test_rare_site_does_not_break_stratification():
    table = patients(20)
    table.loc[0, "institution"] = "XX"
    assert set(split_patients(table, 0.2, 0.2, seed=0)["split"]) == {"train", "val", "test"}


def test_kfold_validation_folds_cover_the_non_test_patients_once():
    vals = [set(t[t["split"] == "val"]["patient"]) for t in
            (split_patients(patients(), 0.15, 0.2, seed=3, folds=4, fold=k) for k in range(4))]
    test = set(split_patients(patients(), 0.15, 0.2, seed=3, folds=4, fold=0).query("split == 'test'")["patient"])
    assert sum(map(len, vals)) == 32 and set().union(*vals) == set(patients()["patient"]) - test
    with pytest.raises(BrainsegError, match="split.fold"):
        split_patients(patients(), 0.15, 0.2, seed=3, folds=4, fold=4)


def test_split_without_tumour_is_refused():
    table = split_patients(patients(10), 0.2, 0.2, seed=0)
    table.loc[table["split"] == "val", "tumour_slices"] = 0
    with pytest.raises(BrainsegError, match="'val' has no tumour"):
        check_split(table)
    with pytest.raises(BrainsegError, match="at least one"):
        split_patients(patients(2), 0.2, 0.2, seed=0)
