"""`evaluate.min_position` chosen on validation: k-fold runs' validation patients re-scored with each cut.

    python -m benchmarks.position_cut --exp vnorm-fold0 --exp vnorm-s42-fold1 ... --cut 0.1 --cut 0.15 --cut 0.2
    python -m benchmarks.position_cut --repo ../clone --exp ... --data ../shared/data/lgg-mri-segmentation-dev.zip
    python -m benchmarks.position_cut --exp lever-fold0 ... --cut 0.2 --against vnorm-fold0 ...  # a lever, same cut

Each experiment's saved model (from the DVC cache, by dvc.lock's hash) segments its validation patients once in
each test-time view (plain, mirrored, rotated and zoomed: stages.inference.test_time_views); every post-processing
setting the evaluation stage compares (evaluate.compare_settings) is then applied with each `min_position` cut (0:
the setting as the runs used it) and scored per volume (stages.metrics' convention: a patient with no tumour and
nothing predicted scores 1). Printed per cut: the pooled
table benchmarks.crossval prints, and the cut against no cut, patient by patient. Validation patients only, so
the cut can be chosen here and the test patients looked at once, with the cut chosen. With --against, a
baseline's runs are re-scored the same way and the experiments are compared with them at each cut, patient by
patient, so a lever made with a cut is judged against a baseline made before it under the same cut.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.crossval import REFERENCE, SETTINGS, markdown, paired, pool, steps, summary
from benchmarks.errors import patient_volumes, validation_runs


def volume_dice(truth: np.ndarray, pred: np.ndarray) -> float:
    """One patient's per-volume Dice, as stages.metrics scores it (1 when there is no tumour and nothing is
    predicted)."""
    from stages import metrics

    return float(metrics.dice_per_volume(metrics.slice_counts(truth, pred, ["patient"] * len(truth))).iloc[0])


def scores(truth: np.ndarray, averages: dict, params: dict, cuts) -> dict[float, dict]:
    """One patient (slices in order): {cut: {setting: per-volume Dice}} for every compare setting and cut.
    `averages`: {(tta_flip, tta_affine): probabilities}, as stages.inference.average_views gives them."""
    from stages import inference
    from stages.evaluate import compare_settings
    from stages.postprocess import postprocess

    patients = np.zeros(len(truth))  # one volume, in slice order
    out = {}
    for cut in cuts:
        out[cut] = {}
        for name, setting in compare_settings(params).items():
            p = averages[inference.view_set(setting)]
            out[cut][name] = volume_dice(truth, postprocess(p, {**setting, "min_position": cut}, patients))
    return out


def segment_run(model_path: Path, raw, frame: pd.DataFrame, patients: list[str], params: dict, cuts,
                fold: int, name: str) -> dict[float, pd.DataFrame]:
    """A run's validation patients -> {cut: table of patient, fold and one Dice column per setting}."""
    from stages import inference
    from stages.evaluate import compare_settings

    model = inference.load_model(model_path)
    rows: dict[float, list] = {cut: [] for cut in cuts}
    view_sets = {inference.view_set(setting) for setting in compare_settings(params).values()}
    views = inference.views_covering(view_sets)
    for patient, images, masks in patient_volumes(raw, frame, patients, name):
        averages = inference.average_views(inference.view_probs(model, images, views), views, view_sets)
        for cut, dice in scores(masks > 0, averages, params, cuts).items():
            rows[cut].append({"patient": patient, "fold": fold, **dice})
    return {cut: pd.DataFrame(r) for cut, r in rows.items()}


def segment_runs(repo: Path, names: list[str], data: Path | None, cuts) -> tuple[dict[float, dict], int]:
    """k-fold runs' validation patients -> ({cut: {fold: table}}, k)."""
    tables, k = {cut: {} for cut in cuts}, set()
    with tempfile.TemporaryDirectory() as tmp:
        for name, params, validation, model, raw, frame in validation_runs(repo, names, data, Path(tmp)):
            split = params.get("split", {})
            k.add(int(split.get("folds", 0)))
            fold = int(split.get("fold", 0))
            evaluate = {**params.get("evaluate", {}), "min_position": 0}
            per_cut = segment_run(model, raw, frame, validation["patient"].tolist(), evaluate, cuts, fold, name)
            for cut, table in per_cut.items():
                tables[cut][fold] = table
            print(f"{name}: {len(validation)} validation patients segmented", flush=True)
    if len(k) != 1 or k == {0}:
        raise SystemExit(f"the experiments are not k-fold runs of one k (split.folds {sorted(k)})")
    return tables, k.pop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.position_cut", description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=Path("."))
    parser.add_argument("--exp", action="append", required=True, help="one k-fold experiment per fold (repeatable)")
    parser.add_argument("--cut", action="append", type=float, required=True, help="a min_position to try (0-1)")
    parser.add_argument("--data", type=Path, help="Kaggle-layout zip or folder (default: each run's data.archive)")
    parser.add_argument("--against", action="append", default=[],
                        help="a baseline's k-fold runs, one per fold (repeatable): re-scored with the same cuts and "
                             "compared patient by patient at each")
    args = parser.parse_args(argv)
    cuts = [0.0, *sorted(set(args.cut) - {0.0})]
    tables, k = segment_runs(args.repo, args.exp, args.data, cuts)
    partial = len(tables[0.0]) < k
    if args.against:
        against, base_k = segment_runs(args.repo, args.against, args.data, cuts)
        if base_k != k or sorted(against[0.0]) != sorted(tables[0.0]):
            raise SystemExit(f"--against names folds {sorted(against[0.0])} of {base_k}, --exp folds "
                             f"{sorted(tables[0.0])} of {k}")
    base = pool(tables[0.0], k, partial)
    for cut in cuts:
        table = pool(tables[cut], k, partial)
        print(f"\nmin_position {cut}: {len(table)} validation patients"
              + (f" (PARTIAL: folds {sorted(tables[cut])} of {k})" if partial else ""))
        print(markdown(summary(table)))
        print("each step against the one before, patient by patient:")
        print(markdown(steps(table)))
        if cut:
            print(markdown(paired(table, base).rename(columns={"baseline": "no cut"})))
        if args.against:
            print(f"against {', '.join(args.against)} with the same cut, patient by patient:")
            print(markdown(paired(table, pool(against[cut], k, partial))))
    print(f"reference: {REFERENCE}; settings as evaluate compares them: {', '.join(SETTINGS)}")


if __name__ == "__main__":
    main()
