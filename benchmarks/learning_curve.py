"""Learning curve: the recipe trained on fewer of the training patients, scored on the same validation and test.

    dvc repro balance        # the split and the prepared data
    python -m benchmarks.learning_curve --workdir runs/lc --patients 10 --patients 20 --patients 30 [--subsets 2]
    python -m benchmarks.learning_curve --workdir runs/lc --patients 30 --refit   # the refit, judged on validation

Each run keeps n of the split's training patients, drawn at random (subset s: numpy's generator seeded with s),
with the augmented copies balance made of their slices, so the tumour share stays near one half. Its epochs are
scaled by (all training slices / kept slices), so every run takes about as many optimizer steps as the full
recipe: a smaller set is not also trained less. Then the evaluate stage's own scoring: validation patients, the
post-processing they choose, the test patients once. Nothing is chosen from these figures; they say how the
per-volume Dice grows with the number of training patients, so whether the dev archive's 40 are what holds the
recipe back. A finished run (its metrics/eval.json) is read back, not trained again.

With --refit, each run is also trained again from scratch on all the training patients for the epochs its own early
stopping chose, its learning rates replayed (stages.train.refit, what `train.refit: true` does with the validation
patients), and scored the same way. The patients added stand in for the validation patients a real refit adds, so
the refit procedure (a fixed epoch count, no early stopping) is judged on validation patients it never trained on.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

DATA = Path("data")


def subset_table(train: pd.DataFrame, n: int, subset: int) -> pd.DataFrame:
    """The training table's rows of n patients drawn with seed `subset` (originals, then their copies, in order)."""
    patients = sorted(train["patient"].unique())
    if not 0 < n <= len(patients):
        raise SystemExit(f"--patients {n}: the training split has {len(patients)} patients")
    keep = set(np.random.default_rng(subset).choice(patients, n, replace=False))
    return train[train["patient"].isin(keep)]


def scaled_epochs(epochs: int, all_slices: int, kept_slices: int) -> int:
    """Epochs that give about the optimizer steps of `epochs` over all the slices."""
    return max(1, int(round(epochs * all_slices / kept_slices)))


def link_data(source: Path, target: Path, keep=lambda name: True) -> None:
    """target, a data folder made afresh: source's files linked, not copied; of source/prepared only the files whose
    names `keep` accepts."""
    shutil.rmtree(target, ignore_errors=True)
    (target / "prepared").mkdir(parents=True)
    for item in source.iterdir():
        if item.name != "prepared":
            (target / item.name).symlink_to(item.resolve())
    for item in (source / "prepared").iterdir():
        if keep(item.name):
            (target / "prepared" / item.name).symlink_to(item.resolve())


def make_root(data: Path, root: Path, table: pd.DataFrame) -> None:
    """root/data: the prepared data, with the training table replaced by `table` (the arrays linked, not copied)."""
    shutil.rmtree(root, ignore_errors=True)
    link_data(data, root / "data", lambda name: name != "train.csv")
    table.to_csv(root / "data/prepared/train.csv", index=False)


def make_refit_root(run_root: Path, root: Path, train: pd.DataFrame, kept: pd.DataFrame) -> None:
    """root/data: run_root's data with the training patients left out of `kept` as the refit table (their copies
    read from the training copies' files, which their `copy` numbers index)."""
    shutil.rmtree(root, ignore_errors=True)
    link_data(run_root / "data", root / "data")
    prepared = root / "data/prepared"
    for kind in ("images", "masks"):
        (prepared / f"refit_copies_{kind}.npy").symlink_to((prepared / f"train_copies_{kind}.npy").resolve())
    train[~train["patient"].isin(set(kept["patient"]))].to_csv(prepared / "refit.csv", index=False)


def refit_run(run_root: Path, root: Path, params: dict, seed: int) -> None:
    """The run in run_root trained again on all the training patients for its best epoch count, then scored."""
    from stages import evaluate, train
    from stages.common import train_config

    first = json.loads((run_root / "metrics/train.json").read_text())
    summary = train.refit(params["model"], train_config(params), seed, first["best_epoch"], first.get("learning_rates"),
                          root / "data", root / evaluate.MODEL)
    (root / "metrics").mkdir(exist_ok=True)
    (root / "metrics/train.json").write_text(json.dumps(summary, indent=1))
    evaluate.run_stage(params, root)


def run(root: Path, params: dict, epochs: int, seed: int) -> dict:
    """Train on root/data, then score as the evaluate stage does; metrics/eval.json under root."""
    from stages import evaluate, train
    from stages.common import train_config

    cfg = {**train_config(params), "epochs": epochs}
    summary = train.train(params["model"], cfg, seed, root / "data", root / evaluate.MODEL, None)
    (root / "metrics").mkdir(exist_ok=True)
    (root / "metrics/train.json").write_text(json.dumps(summary, indent=1))
    evaluate.run_stage(params, root)
    return json.loads((root / "metrics/eval.json").read_text())


def row(n: int, subset: int, table: pd.DataFrame, root: Path, refit: bool = False) -> dict:
    result = json.loads((root / "metrics/eval.json").read_text())
    trained = json.loads((root / "metrics/train.json").read_text())
    chosen = result["postprocess"]["chosen_on_validation"]
    return {"patients": n, "subset": subset, "model": "refit on all" if refit else "early stopping",
            "training slices": trained["train_slices"] if refit else len(table),
            "epochs (best)": f"{trained['epochs']} ({'fixed' if refit else trained['best_epoch']})",
            "validation": result["validation"]["postprocess_compare"][chosen]["dice_volume_mean"],
            "validation, threshold only": result["validation"]["postprocess_compare"]["threshold"]["dice_volume_mean"],
            "post-processing": chosen, "test": result["dice_volume_mean"], "test median": result["dice_volume_median"]}


def main(argv: list[str] | None = None) -> None:
    from benchmarks.crossval import markdown
    from stages.common import load_params, train_config

    parser = argparse.ArgumentParser(prog="python -m benchmarks.learning_curve", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--patients", type=int, action="append", required=True,
                        help="training patients to keep (repeatable)")
    parser.add_argument("--subsets", type=int, default=1, help="random draws of each size (seeds 1, 2, ...)")
    parser.add_argument("--data", type=Path, default=DATA, help="the prepared data folder (default: data)")
    parser.add_argument("--refit", action="store_true",
                        help="also train each run again on all the training patients for its best epoch count")
    args = parser.parse_args(argv)
    params = load_params()
    seed = params["seed"] if params["train"].get("seed") is None else params["train"]["seed"]
    train = pd.read_csv(args.data / "prepared/train.csv")
    rows = []
    for subset in range(1, args.subsets + 1):
        for n in args.patients:
            table = subset_table(train, n, subset)
            root = args.workdir / f"p{n}-{subset}"
            if not (root / "metrics/eval.json").is_file():
                make_root(args.data, root, table)
                epochs = scaled_epochs(train_config(params)["epochs"], len(train), len(table))
                print(f"{n} patients (subset {subset}): {len(table)} of {len(train)} training slices, "
                      f"{epochs} epochs", flush=True)
                run(root, params, epochs, seed)
            rows.append(row(n, subset, table, root))
            print(markdown(pd.DataFrame(rows[-1:])), flush=True)
            if args.refit:
                again = args.workdir / f"p{n}-{subset}-refit"
                if not (again / "metrics/eval.json").is_file():
                    make_refit_root(root, again, train, table)
                    print(f"{n} patients (subset {subset}): refit on all {train['patient'].nunique()} training "
                          "patients", flush=True)
                    refit_run(root, again, params, seed)
                rows.append(row(n, subset, table, again, refit=True))
                print(markdown(pd.DataFrame(rows[-1:])), flush=True)
    frame = pd.DataFrame(rows).sort_values(["patients", "subset", "model"])
    print(f"\nper-volume Dice against the number of training patients (of {train['patient'].nunique()}); "
          "validation chose the post-processing, test looked at once")
    print(markdown(frame))
    means = frame.groupby(["patients", "model"])[["validation", "validation, threshold only", "test"]].mean()
    means = means.reset_index()
    print(markdown(means))


if __name__ == "__main__":
    main()
