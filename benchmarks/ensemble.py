"""Seed ensembles: several trained models of one recipe, their probability maps averaged, scored as evaluate does.

Each argument is a run folder (a `dvc exp` workspace or a `benchmarks.gpu_recipe` workdir) with
models/model.keras and data/prepared. All must share one split (the same data/split.csv); they may differ in
train.seed and in balance.seed (each member trained on its own draw of balance's copies). The ensemble is one
Keras model that averages the members' outputs, so evaluate's own code scores it: validation patients first,
post-processing chosen on them, then one look at the test patients. Prints each member's figures (from its
metrics/eval.json) beside the ensemble's.

  python -m benchmarks.ensemble runs/r42 runs/r7 runs/r1 [--out ensemble.json]

With --folds the members are the k runs of a k-fold split (`split.folds: k`, one run per `split.fold`): they share
the test patients but each validated on its own fold, so no patient outside the test split was unseen by all of
them. The post-processing is then chosen on the pooled out-of-fold validation (each non-test patient scored by the
member that did not train on it, as `benchmarks.crossval` pools it), and the average is scored once on test:

  python -m benchmarks.ensemble --folds runs/f0 runs/f1 runs/f2 runs/f3 runs/f4

With --groups K the runs (seeds of one split) are cut, in the order given, into ensembles of K members with no
member shared, and each ensemble is scored as above. Issue 6 asks that a recipe run with another seed stay within
0.02 of per-volume Dice on test; an ensemble recipe's "another seed" is another set of member seeds. The spread of
the ensembles' test means is printed beside the spread of the same runs scored alone, with the same measure as
`benchmarks.seeds`:

  python -m benchmarks.ensemble --groups 3 runs/s42 runs/s7 runs/s1 runs/s3 runs/s5 runs/s11
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd
import yaml

from benchmarks import crossval, seeds
from stages import evaluate, inference, prepared
from stages.common import BrainsegError
from stages.models import average


def check_same_split(runs: list[Path]) -> None:
    splits = {run: (run / "data/split.csv").read_bytes() for run in runs}
    if len(set(splits.values())) != 1:
        raise BrainsegError(f"{', '.join(map(str, runs))}: their data/split.csv differ; an ensemble must be "
                            "scored on patients none of its members trained on. Fix: runs of one split "
                            "(same seed and split parameters; only train.seed or balance.seed changed)")


def split_test_patients(run: Path) -> list[str]:
    split = pd.read_csv(run / "data/split.csv")
    return sorted(split.loc[split["split"] == "test", "patient"])


def pooled_validation(runs: list[Path]) -> pd.DataFrame:
    """The k-fold runs' validation tables pooled (every fold once, no patient twice); the runs must set aside
    the same test patients."""
    if len({tuple(split_test_patients(run)) for run in runs}) != 1:
        raise BrainsegError(f"{', '.join(map(str, runs))}: their test patients differ; the runs of a fold ensemble "
                            "must come from one k-fold split (same seed, split.val, split.test and split.folds, "
                            "one run per split.fold)")
    tables, _, k = crossval.load(Path("."), [str(run) for run in runs], folders=True)
    return crossval.pool(tables, k)


def evaluate_fold_ensemble(runs: list[Path]) -> dict:
    """The average of a k-fold split's models: post-processing chosen on the pooled out-of-fold validation, then
    one look at the test patients."""
    pooled = pooled_validation(runs)
    params = yaml.safe_load((runs[0] / "params.yaml").read_text())["evaluate"]
    # runs evaluated before a setting existed have no column for it: choose among those they all scored
    scores = {name: float(pooled[name].mean()) for name in evaluate.compare_settings(params) if name in pooled}
    chosen, settings = evaluate.best_postprocess(scores, params)
    model = average([inference.load_model(run / evaluate.MODEL) for run in runs])
    test = evaluate.evaluate_model(model, *prepared.originals(runs[0] / evaluate.DATA, "test"), settings,
                                   desc="test")
    worst = test.per_patient.loc[test.per_patient["dice"].idxmin()]
    return {"validation": {"patients": len(pooled), "pooled_out_of_fold_dice_volume_mean": scores,
                           "chosen": chosen},
            "test": {k: test.metrics[k] for k in ("dice_volume_mean", "dice_volume_median", "dice_slice_mean",
                                                  "dice_pixel", "tversky")},
            "worst_test_patient": {"patient": worst["patient"], "dice": float(worst["dice"])}}


def evaluate_ensemble(runs: list[Path]) -> dict:
    """Validation, the post-processing it chooses, then test, for the average of the runs' models."""
    check_same_split(runs)
    params = yaml.safe_load((runs[0] / "params.yaml").read_text())["evaluate"]
    model = average([inference.load_model(run / evaluate.MODEL) for run in runs])
    data = runs[0] / evaluate.DATA
    validation = evaluate.evaluate_model(model, *prepared.originals(data, "val"), params, desc="validation")
    chosen, settings = evaluate.choose_postprocess(validation, params)
    test = evaluate.evaluate_model(model, *prepared.originals(data, "test"), settings, desc="test")
    worst = test.per_patient.loc[test.per_patient["dice"].idxmin()]
    return {"validation": {"dice_volume_mean": validation.metrics["dice_volume_mean"],
                           "chosen": chosen,
                           "chosen_dice_volume_mean": validation.metrics["postprocess_compare"][chosen]
                           ["dice_volume_mean"]},
            "test": {k: test.metrics[k] for k in ("dice_volume_mean", "dice_volume_median", "dice_slice_mean",
                                                  "dice_pixel", "tversky")},
            "worst_test_patient": {"patient": worst["patient"], "dice": float(worst["dice"])}}


def member_figures(run: Path) -> dict:
    """A member's own figures, from the metrics/eval.json its evaluate stage wrote."""
    m = json.loads((run / evaluate.EVAL_JSON).read_text())
    chosen = m["postprocess"].get("chosen_on_validation")
    compare = m["validation"].get("postprocess_compare", {})
    return {"test_dice_volume_mean": m["dice_volume_mean"], "test_dice_volume_median": m["dice_volume_median"],
            "validation_dice_volume_mean": m["validation"]["dice_volume_mean"], "postprocess_chosen": chosen,
            "validation_chosen_dice_volume_mean": compare.get(chosen, {}).get("dice_volume_mean")}


def groups_of(runs: list[Path], size: int) -> list[list[Path]]:
    """The runs cut in order into ensembles of `size` members, none shared; at least two, to have a spread."""
    if size < 1 or len(runs) % size or len(runs) < 2 * size:
        raise BrainsegError(f"--groups {size} with {len(runs)} runs: give a multiple of {size} runs, at least "
                            f"{2 * size}, so that every ensemble has {size} members of its own and there are two "
                            "or more ensembles to compare")
    return [runs[i:i + size] for i in range(0, len(runs), size)]


def evaluate_groups(runs: list[Path], size: int) -> dict:
    """Each run's own figures (member_figures), each group's ensemble scored (validation, its choice, test), and the
    spread of the ensembles' test means beside that of the same runs alone; the same for validation (with the chosen
    post-processing), the split a choice may be made on."""
    groups = groups_of(runs, size)
    check_same_split(runs)
    alone = [member_figures(run) for run in runs]
    unchosen = [str(run) for run, m in zip(runs, alone) if m["validation_chosen_dice_volume_mean"] is None]
    if unchosen:
        raise BrainsegError(f"{', '.join(unchosen)}: metrics/eval.json has no post-processing chosen on validation "
                            "(a run from before evaluate.choose_on_validation). Fix: `dvc repro evaluate` there")
    scored = []
    for group in groups:
        score = evaluate_ensemble(group)
        score["members"] = [str(run) for run in group]
        scored.append(score)
    return {"members": dict(zip(map(str, runs), alone)), "ensembles": scored,
            "ensemble_spread": seeds.spread([s["test"]["dice_volume_mean"] for s in scored]),
            "alone_spread": seeds.spread([m["test_dice_volume_mean"] for m in alone]),
            "ensemble_validation_spread": seeds.spread([s["validation"]["chosen_dice_volume_mean"] for s in scored]),
            "alone_validation_spread": seeds.spread([m["validation_chosen_dice_volume_mean"] for m in alone])}


def groups_table(summary: dict) -> str:
    """The ensembles as rows, then the spread lines: test, then validation, each ensembles then runs alone."""
    rows = pd.DataFrame([{"members": ", ".join(s["members"]),
                          "validation, threshold only": s["validation"]["dice_volume_mean"],
                          "validation, chosen": s["validation"]["chosen_dice_volume_mean"],
                          "chosen": s["validation"]["chosen"], "test mean": s["test"]["dice_volume_mean"],
                          "test median": s["test"]["dice_volume_median"],
                          "test worst": f"{s['worst_test_patient']['dice']:.3f} "
                                        f"({s['worst_test_patient']['patient']})"}
                         for s in summary["ensembles"]])
    validation = {"measure": "validation per-volume Dice, chosen post-processing", "target": False}
    return "\n".join([crossval.markdown(rows), seeds.spread_line(summary["ensemble_spread"], unit="ensemble"),
                      "the same runs alone: " + seeds.spread_line(summary["alone_spread"]),
                      seeds.spread_line(summary["ensemble_validation_spread"], unit="ensemble", **validation),
                      "the same runs alone: " + seeds.spread_line(summary["alone_validation_spread"], **validation)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--folds", action="store_true",
                        help="the runs are the k folds of one k-fold split (see above), not seeds of one split")
    parser.add_argument("--groups", type=int, metavar="K",
                        help="cut the runs, in order, into ensembles of K members each and compare their spread "
                             "with the runs' own (see above)")
    parser.add_argument("--out", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args()
    if args.groups and args.folds:
        parser.error("--groups compares seed ensembles of one split; --folds averages the folds of one")
    if args.groups:
        summary = evaluate_groups(args.runs, args.groups)
        text = json.dumps(summary, indent=1)
        print(groups_table(summary))
    else:
        scoring = evaluate_fold_ensemble if args.folds else evaluate_ensemble
        summary = {"members": {str(run): member_figures(run) for run in args.runs}, "ensemble": scoring(args.runs)}
        text = json.dumps(summary, indent=1)
        print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
