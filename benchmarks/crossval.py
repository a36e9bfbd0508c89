"""Cross-validated per-volume Dice: the validation patients of k-fold DVC experiments, pooled.

    A=$PWD/../shared/data/lgg-mri-segmentation-dev.zip
    for f in 0 1 2 3 4; do
      dvc exp run --queue -n cv5-fold$f -S split.folds=5 -S split.fold=$f -S data.source=archive -S data.archive=$A
    done
    dvc queue start -j 1
    python -m benchmarks.crossval --exp cv5-fold0 --exp cv5-fold1 --exp cv5-fold2 --exp cv5-fold3 --exp cv5-fold4
    python -m benchmarks.crossval --partial --exp ...   # the folds done so far, said to be partial
    python -m benchmarks.crossval --exp lever-fold0 ... --against cv5-fold0 ...  # a lever, paired by patient
    python -m benchmarks.crossval --run runs/f0 --run runs/f1 ...  # run folders (benchmarks.gpu_recipe --workdir)

With `split.folds: k` the test patients stay aside and the others are cut into k folds by patient; the run with
`split.fold: f` validates on fold f. Pooled over the k runs, every non-test patient is scored once by a model that
never trained on it: the measure of Buda et al. 2019 (82% mean per-volume Dice, 5-fold cross-validation over all 110
patients). Each post-processing setting is reported as fixed in advance over all folds, never chosen per fold, since
a choice made on the same patients would flatter the score; each mean comes with its 95% bootstrap interval over the
pooled patients. Early stopping did see each fold's validation loss, as in the published protocol. With --against, a
second set of k-fold runs (the baseline of a lever) is pooled the same way and compared patient by patient: mean
difference with its 95% bootstrap interval, patients better and worse, and the two-sided Wilcoxon signed-rank
p-value (scipy), the test of a paired difference that does not assume it is normal. Figures come from the metric
files each experiment committed (`metrics/per_patient_validation.csv`, `metrics/eval.json`, `params.yaml`).
"""
from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import pandas as pd
import yaml

from benchmarks.architectures import experiments, git_show
from stages.intervals import interval_text, mean_interval

# evaluate.compare_settings, in order (runs evaluated before tta_affine existed lack its column)
SETTINGS = ["threshold", "min_component", "largest_3d", "tta_flip", "tta_affine"]
REFERENCE = "Buda et al. 2019: 0.82 mean (5-fold cross-validation, all 110 patients, 256 px, GPU)"


def pool(folds: dict[int, pd.DataFrame], k: int, partial: bool = False) -> pd.DataFrame:
    """The folds' validation tables stacked, with a `fold` column; no patient twice, and every fold present
    unless `partial` (then the score covers only the folds' patients, and says so)."""
    missing = sorted(set(range(k)) - set(folds))
    if missing and not partial:
        raise SystemExit(f"folds {missing} of {k} have no experiment: queue them with -S split.fold=N")
    table = pd.concat([t.assign(fold=f) for f, t in sorted(folds.items())], ignore_index=True)
    twice = table.patient[table.patient.duplicated()].unique().tolist()
    if twice:
        raise SystemExit(f"patients {twice} are validated in more than one fold: the runs do not share one split "
                         "(same seed, split.val, split.test and split.folds needed)")
    return table


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per post-processing setting: patients, mean and its 95% bootstrap interval over the patients
    (stages.intervals), median, worst patient and its Dice, mean per fold."""
    rows = []
    for name in [s for s in SETTINGS if s in table]:
        worst = table.loc[table[name].idxmin()]
        rows.append({"post-processing": name, "patients": len(table), "mean": table[name].mean(),
                     "95% interval": interval_text(*mean_interval(table[name])),
                     "median": table[name].median(), "worst": f"{worst[name]:.3f} ({worst.patient})",
                     "fold means": " / ".join(f"{m:.3f}" for m in table.groupby("fold")[name].mean())})
    return pd.DataFrame(rows)


def paired_stats(diff: pd.Series) -> dict:
    """Differences, one per patient: their mean and its 95% bootstrap interval over the patients, patients gaining /
    losing more than 0.005, and the Wilcoxon signed-rank p-value."""
    from scipy.stats import wilcoxon

    p = wilcoxon(diff).pvalue if (diff != 0).any() else 1.0
    moved = f"{int((diff > 0.005).sum())} / {int((diff < -0.005).sum())}"
    return {"difference": diff.mean(), "95% interval": interval_text(*mean_interval(diff), signed=True),
            "better / worse": moved, "Wilcoxon p": float(p)}


def steps(table: pd.DataFrame) -> pd.DataFrame:
    """Each post-processing step against the one before it (compare_settings adds one step at a time), on the
    same patients: what that step alone did."""
    names = [s for s in SETTINGS if s in table]
    return pd.DataFrame([{"step": f"{before} -> {after}", "patients": len(table), "mean": table[after].mean(),
                          **paired_stats(table[after] - table[before])} for before, after in zip(names, names[1:])])


def paired(table: pd.DataFrame, baseline: pd.DataFrame) -> pd.DataFrame:
    """Per post-processing setting, `table` against `baseline` on the same patients: mean difference (and its 95%
    interval), how many patients gained and lost more than 0.005, and the Wilcoxon signed-rank p-value."""
    both = table.merge(baseline, on="patient", suffixes=("", "_base"))
    if len(both) != len(table) or len(both) != len(baseline):
        raise SystemExit(f"the two sets validate different patients ({len(table)} and {len(baseline)}, "
                         f"{len(both)} shared): compare runs of one split")
    return pd.DataFrame([{"post-processing": name, "patients": len(both), "mean": both[name].mean(),
                          "baseline": both[f"{name}_base"].mean(), **paired_stats(both[name] - both[f"{name}_base"])}
                         for name in [s for s in SETTINGS if s in table and s in baseline]])


def fold_lines(evaluations: dict[int, dict]) -> list[str]:
    """Each fold's model on the shared test patients, with the post-processing its validation chose."""
    lines = []
    for f, e in sorted(evaluations.items()):
        lines.append(f"fold {f}: test per-volume Dice {e['dice_volume_mean']:.3f} (median "
                     f"{e['dice_volume_median']:.3f}, {e['data']['patients']} patients, post-processing "
                     f"{e['postprocess'].get('chosen_on_validation')}); validation chose from "
                     f"{e['validation']['patients']} patients")
    return lines


def markdown(frame: pd.DataFrame) -> str:
    cells = frame.map(lambda v: f"{v:.3f}" if isinstance(v, float) else str(v))
    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in cells.itertuples(index=False)])


def commits(repo: Path, names: list[str]) -> dict[str, str]:
    """Each named experiment's commit; an error naming the first that does not exist."""
    found = dict(experiments(repo))
    for name in names:
        if name not in found:
            raise SystemExit(f"{repo}: no experiment named {name} (`dvc exp show` lists them)")
    return {name: found[name] for name in names}


def run_files(repo: Path, name: str, rev: str) -> tuple[dict, pd.DataFrame, dict]:
    """An experiment's params.yaml, its validation patients' table and its eval.json."""
    params = yaml.safe_load(git_show(repo, rev, "params.yaml") or "{}")
    csv = git_show(repo, rev, "metrics/per_patient_validation.csv")
    if csv is None:
        raise SystemExit(f"{name}: no metrics/per_patient_validation.csv (a run from before it was written)")
    return params, pd.read_csv(io.StringIO(csv)), json.loads(git_show(repo, rev, "metrics/eval.json"))


def folder_files(run: Path) -> tuple[dict, pd.DataFrame, dict]:
    """The same three files of a run folder (a `benchmarks.gpu_recipe` workdir)."""
    csv = run / "metrics/per_patient_validation.csv"
    if not csv.exists():
        raise SystemExit(f"{run}: no metrics/per_patient_validation.csv (its evaluate stage has not run)")
    return (yaml.safe_load((run / "params.yaml").read_text()), pd.read_csv(csv),
            json.loads((run / "metrics/eval.json").read_text()))


def load(repo: Path, names: list[str], folders: bool = False) -> tuple[dict[int, pd.DataFrame], dict[int, dict], int]:
    """Each run's fold number, validation table and eval.json; k, which they must share. The runs are
    experiments of `repo` by name, or with `folders` run folders by path."""
    if folders:
        found = {name: folder_files(Path(name)) for name in names}
    else:
        found = {name: run_files(repo, name, rev) for name, rev in commits(repo, names).items()}
    tables, evaluations, ks = {}, {}, set()
    for name, (params, validation, evaluation) in found.items():
        split = params.get("split", {})
        if int(split.get("folds", 0)) < 2:
            raise SystemExit(f"{name}: split.folds is {split.get('folds')}: not a k-fold run")
        ks.add(int(split["folds"]))
        fold = int(split["fold"])
        if fold in tables:
            raise SystemExit(f"{name}: fold {fold} is named twice")
        tables[fold] = validation
        evaluations[fold] = evaluation
    if len(ks) != 1:
        raise SystemExit(f"the experiments use different split.folds: {sorted(ks)}")
    return tables, evaluations, ks.pop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.crossval", description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=Path("."))
    runs = parser.add_mutually_exclusive_group(required=True)
    runs.add_argument("--exp", action="append", help="one experiment per fold (repeatable)")
    runs.add_argument("--run", action="append", type=Path,
                      help="or one run folder per fold, such as benchmarks.gpu_recipe's --workdir (repeatable)")
    parser.add_argument("--partial", action="store_true",
                        help="pool the folds named even if some are missing (an unfinished cross-validation)")
    parser.add_argument("--against", action="append", default=[],
                        help="the baseline's runs, one per fold (repeatable; experiments or folders, as the runs): "
                        "compared patient by patient")
    args = parser.parse_args(argv)
    names, folders = (args.exp, False) if args.exp else ([str(r) for r in args.run], True)
    tables, evaluations, k = load(args.repo, names, folders)
    table = pool(tables, k, args.partial)
    done = "" if len(tables) == k else f" (PARTIAL: folds {sorted(tables)} only)"
    print(f"{k}-fold cross-validation{done} over {len(table)} non-test patients, per-volume Dice of each "
          "patient's held-out fold; each post-processing fixed for all folds")
    print(markdown(summary(table)))
    print("each step against the one before, patient by patient:")
    print(markdown(steps(table)))
    print(f"reference: {REFERENCE}")
    print("\n".join(fold_lines(evaluations)))
    if args.against:
        base_tables, base_evaluations, base_k = load(args.repo, args.against, folders)
        if base_k != k or sorted(base_tables) != sorted(tables):
            raise SystemExit(f"--against names folds {sorted(base_tables)} of {base_k}, the runs folds "
                             f"{sorted(tables)} of {k}: pair the same folds")
        print(f"\nagainst {', '.join(args.against)}, patient by patient:")
        print(markdown(paired(table, pool(base_tables, base_k, args.partial))))
        print("baseline " + "\nbaseline ".join(fold_lines(base_evaluations)))


if __name__ == "__main__":
    main()
