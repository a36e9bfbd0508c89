"""Stage `split`: assign whole patients to train / val / test, never single slices.

Patients are stratified by institution (rare institutions pooled) so every split sees the scanners of
several sites; every split must hold tumour slices. Optional k-fold: `folds` > 1 splits the non-test
patients into k folds and `fold` picks the validation one.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold, train_test_split

from stages.common import BrainsegError, load_params, run_main, write_csv, write_json

# the index stage's table (dvc.yaml names it; importing stages.index for the path would make its code a dependency)
INDEX = Path("data") / "index.csv"
SPLIT = Path("data") / "split.csv"


def patient_table(index: pd.DataFrame) -> pd.DataFrame:
    return (index.groupby("patient", sort=True)
            .agg(institution=("institution", "first"), slices=("slice", "size"), tumour_slices=("tumour", "sum"))
            .reset_index())


def strata(institutions: pd.Series, min_count: int) -> np.ndarray:
    """Institution labels with those seen fewer than `min_count` times pooled into 'other'."""
    counts = institutions.value_counts()
    labels = institutions.where(institutions.map(counts) >= min_count, "other")
    if (labels == "other").sum() == 1:  # a lone 'other' cannot be stratified: fold it into the largest site
        labels = labels.replace("other", counts.index[0])
    return labels.to_numpy()


def split_patients(patients: pd.DataFrame, val: float, test: float, seed: int,
                   folds: int = 0, fold: int = 0) -> pd.DataFrame:
    """patients (patient, institution, ...) -> same rows with a `split` column."""
    if len(patients) < 3:
        raise BrainsegError(f"only {len(patients)} patient(s): train, val and test each need at least one")
    ids = patients["patient"].to_numpy()
    labels = strata(patients["institution"], 2)

    def cut(ids, labels, size):
        try:
            return train_test_split(ids, labels, test_size=size, random_state=seed, stratify=labels)
        except ValueError:  # too few patients per site for stratification: fall back to a plain seeded cut
            return train_test_split(ids, labels, test_size=size, random_state=seed)

    rest, test_ids, rest_labels, _ = cut(ids, labels, max(1, round(test * len(ids))))
    if folds and folds > 1:
        if not 0 <= fold < folds:
            raise BrainsegError(f"params.yaml: split.fold {fold} is not in 0..{folds - 1}")
        kfold = StratifiedKFold(folds, shuffle=True, random_state=seed)
        pooled = strata(pd.Series(rest_labels), folds)
        _, val_idx = list(kfold.split(rest, pooled))[fold]
        val_ids = rest[val_idx]
    else:
        _, val_ids, _, _ = cut(rest, strata(pd.Series(rest_labels), 2), max(1, round(val * len(ids))))
    split = np.full(len(ids), "train", dtype=object)
    split[np.isin(ids, val_ids)] = "val"
    split[np.isin(ids, test_ids)] = "test"
    return patients.assign(split=split)


def check_split(table: pd.DataFrame) -> None:
    for name in ("train", "val", "test"):
        part = table[table["split"] == name]
        if part.empty or part["tumour_slices"].sum() == 0:
            raise BrainsegError(f"split '{name}' has no tumour slices; with so few patients change split.val/test "
                                "or the seed")


def main() -> None:
    params = load_params()
    p = params["split"]
    index = pd.read_csv(INDEX)
    table = split_patients(patient_table(index), p["val"], p["test"], params["seed"], p["folds"], p["fold"])
    check_split(table)
    write_csv(SPLIT, table)
    summary = {name: {"patients": int((part := table[table["split"] == name]).shape[0]),
                      "slices": int(part["slices"].sum()), "tumour_slices": int(part["tumour_slices"].sum()),
                      "institutions": int(part["institution"].nunique())}
               for name in ("train", "val", "test")}
    write_json(Path("metrics") / "split.json", summary)
    print(summary)


if __name__ == "__main__":
    run_main(main)
