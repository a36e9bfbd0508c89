"""The README's architecture table: one row per DVC experiment, read from the metrics each one committed.

    python -m benchmarks.architectures            # every experiment of the repository in the current folder
    python -m benchmarks.architectures --repo PATH --exp unet-cpu --exp resunet-cpu

Rows come from `metrics/eval.json`, `metrics/train.json`, `metrics/per_patient.csv` and `params.yaml` as git
holds them in each experiment's commit (what `dvc exp show` reads), so the table is only ever measured figures.
"""
from __future__ import annotations

import argparse
import io
import json
import subprocess
from pathlib import Path

import pandas as pd

COLUMNS = ["experiment", "model", "params", "epochs (best)", "post-processing", "per-volume Dice mean", "median",
           "worst", "mean without post-processing", "per-slice Dice all / tumour", "pixel Dice",
           "detection acc. (sens. / spec., AUC)", "train min", "train slices/s", "inference slices/s"]
DASH = "-"


def experiments(repo: Path) -> list[tuple[str, str]]:
    """(name, commit) of every experiment, over all baselines, oldest baseline first."""
    from dvc.repo import Repo
    found = Repo(str(repo)).experiments.ls(all_commits=True)
    return [(name, sha) for runs in found.values() for name, sha in runs if sha]


def git_show(repo: Path, rev: str, path: str) -> str | None:
    result = subprocess.run(["git", "-C", str(repo), "show", f"{rev}:{path}"], capture_output=True, text=True)
    return result.stdout if result.returncode == 0 else None


def _f(value, digits=3) -> str:
    return DASH if value is None else f"{value:.{digits}f}"


def row(name: str, evaluation: dict, train: dict, per_patient: pd.DataFrame | None) -> dict:
    """One table row from an experiment's metric files (segmenter or classifier keys)."""
    det = evaluation.get("detection") or {
        k: evaluation.get(f"classifier_{k}") for k in ("accuracy", "sensitivity", "specificity", "roc_auc")}
    out = {"experiment": name, "model": evaluation["model"]["name"], "params": f"{evaluation['model']['parameters']:,}",
           "epochs (best)": f"{train.get('epochs', DASH)} ({train.get('best_epoch', DASH)})",
           "detection acc. (sens. / spec., AUC)": (f"{_f(det['accuracy'])} ({_f(det['sensitivity'])} / "
                                                   f"{_f(det['specificity'])}, {_f(det['roc_auc'])})"),
           "train min": _f(train.get("train_seconds", 0) / 60, 1),
           "train slices/s": _f(train.get("train_slices_per_s"), 1),
           "inference slices/s": _f(evaluation["model"].get("slices_per_second"), 0)}
    if "dice_volume_mean" not in evaluation:  # a classifier: no masks to score
        return {k: out.get(k, DASH) for k in COLUMNS}
    worst = DASH
    if per_patient is not None and len(per_patient):
        low, ties = per_patient["dice"].min(), int((per_patient["dice"] == per_patient["dice"].min()).sum())
        worst = f"{low:.3f}" + (f" ({ties} patients)" if ties > 1 else "")
    raw = evaluation.get("postprocess_compare", {}).get("threshold", {})
    # runs from before the validation choice applied no post-processing: their headline is threshold only
    out.update({"post-processing": evaluation.get("postprocess", {}).get("chosen_on_validation") or "none",
                "per-volume Dice mean": f"**{_f(evaluation['dice_volume_mean'])}**",
                "median": _f(evaluation["dice_volume_median"]), "worst": worst,
                "mean without post-processing": _f(raw.get("dice_volume_mean")),
                "per-slice Dice all / tumour": f"{_f(evaluation['dice_slice_mean'])} / "
                                               f"{_f(evaluation['dice_slice_tumour_mean'])}",
                "pixel Dice": _f(evaluation["dice_pixel"])})
    return {k: out.get(k, DASH) for k in COLUMNS}


def table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(r[c]) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def collect(repo: Path, names: list[str] | None = None) -> list[dict]:
    rows = []
    for name, sha in experiments(repo):
        if names and name not in names:
            continue
        evaluation, train = git_show(repo, sha, "metrics/eval.json"), git_show(repo, sha, "metrics/train.json")
        if evaluation is None or train is None:
            continue
        csv = git_show(repo, sha, "metrics/per_patient.csv")
        per_patient = pd.read_csv(io.StringIO(csv)) if csv else None
        rows.append(row(name, json.loads(evaluation), json.loads(train), per_patient))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.architectures", description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=Path("."))
    parser.add_argument("--exp", action="append", help="only these experiments (repeatable)")
    args = parser.parse_args(argv)
    # segmenters first, then classifiers (no Dice), each by name
    rows = sorted(collect(args.repo, args.exp), key=lambda r: (r["per-volume Dice mean"] == DASH, r["experiment"]))
    if not rows:
        raise SystemExit(f"{args.repo}: no DVC experiments with metrics/eval.json; "
                         "run `dvc exp run -S model=NAME` first")
    print(table(rows))


if __name__ == "__main__":
    main()
