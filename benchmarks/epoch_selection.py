"""Which validation figure should pick the epoch a run keeps: the validation loss, or the validation patients'
mean per-volume Dice (`train.monitor`), judged on validation patients that did not pick it.

    A=$PWD/../shared/data/lgg-mri-segmentation-dev.zip
    for s in 42 7 1 3 5; do
      dvc exp run -n md-s$s -S train.members=null -S train.monitor=val_dice_volume -S train.seed=$s \
        -S data.source=archive -S data.archive=$A
    done
    python -m benchmarks.epoch_selection --exp 'md-s*'

Picking the epoch by the validation Dice and then scoring validation with it flatters that choice: the figure that
chose is the figure reported. So each run's validation patients are cut into two halves, in every way there is
(126 ways for 9 patients), and each half in turn picks the epoch by its own mean Dice while the other half scores
it; against that, the other half scored at the epoch of the lowest validation loss. The loss is the whole
validation set's, scoring half included, so this comparison leans towards the loss, not the Dice. `train.monitor`
changes only the epoch kept, never the training, so one run holds both rules: each epoch's per-patient Dice
(`dvclive/train/val_dice_volume.csv`) and validation loss (`dvclive/train/plots/metrics/eval/loss.tsv`).
The per-patient Dice is train's (threshold 0.5, at model size, no post-processing), not evaluate's.
"""
from __future__ import annotations

import argparse
import io
import itertools
import json

import numpy as np
import pandas as pd

from benchmarks.architectures import experiments, git_show
from benchmarks.crossval import markdown
from benchmarks.seeds import select

PER_PATIENT = "dvclive/train/val_dice_volume.csv"
LOSS = "dvclive/train/plots/metrics/eval/loss.tsv"


def dice_matrix(per_patient: pd.DataFrame) -> pd.DataFrame:
    """train's per-epoch table (epoch, patient, dice) as epochs x patients."""
    return per_patient.pivot(index="epoch", columns="patient", values="dice").sort_index()


def halves(patients: list, limit: int | None = None) -> list[tuple[list, list]]:
    """Every cut of `patients` into two halves (the smaller first, each cut once), as (picking, scoring) pairs in
    both directions; `limit` keeps the first cuts only, for many patients."""
    small = len(patients) // 2
    cuts = []
    for chosen in itertools.combinations(range(len(patients)), small):
        rest = [i for i in range(len(patients)) if i not in chosen]
        if len(patients) % 2 == 0 and rest < list(chosen):
            continue  # an even cut seen from its other half
        cuts.append(([patients[i] for i in chosen], [patients[i] for i in rest]))
        if limit and len(cuts) >= limit:
            break
    return [pair for a, b in cuts for pair in ((a, b), (b, a))]


def held_out(dice: pd.DataFrame, loss: np.ndarray, limit: int | None = None) -> dict:
    """Mean Dice of the scoring half at the epoch its other half picks by Dice, and at the lowest loss's epoch,
    averaged over every cut (halves); also the whole set's in-sample figures at both epochs."""
    loss_epoch = int(np.nanargmin(loss))
    by_dice, by_loss = [], []
    for picking, scoring in halves(list(dice.columns), limit):
        epoch = int(np.argmax(dice[picking].mean(axis=1).to_numpy()))  # the first of equal epochs, as Keras keeps
        by_dice.append(dice[scoring].iloc[epoch].mean())
        by_loss.append(dice[scoring].iloc[loss_epoch].mean())
    whole = dice.mean(axis=1).to_numpy()
    return {"epochs": len(dice), "epoch by loss": loss_epoch + 1, "epoch by Dice": int(np.argmax(whole)) + 1,
            "Dice at the loss's epoch": float(whole[loss_epoch]), "Dice at the Dice's epoch": float(whole.max()),
            "held-out half, by loss": float(np.mean(by_loss)), "held-out half, by Dice": float(np.mean(by_dice)),
            "cuts": len(by_dice)}


def run_figures(name: str, per_patient: pd.DataFrame, loss: pd.DataFrame, limit: int | None = None) -> dict:
    dice = dice_matrix(per_patient)
    if len(loss) != len(dice):
        raise SystemExit(f"{name}: {len(loss)} epochs of validation loss but {len(dice)} of per-patient Dice")
    return {"run": name, **held_out(dice, loss["loss"].to_numpy(np.float64), limit)}


def verdict(rows: pd.DataFrame) -> str:
    diff = rows["held-out half, by Dice"] - rows["held-out half, by loss"]
    ahead, behind = int((diff > 0.005).sum()), int((diff < -0.005).sum())
    return (f"held-out half, Dice's epoch against the loss's: mean {diff.mean():+.3f} over {len(rows)} runs, ahead in "
            f"{ahead} and behind in {behind} (by more than 0.005); the same epoch in "
            f"{int((rows['epoch by loss'] == rows['epoch by Dice']).sum())}")


def load(repo, runs: dict[str, str], limit: int | None = None) -> pd.DataFrame:
    rows = []
    for name, sha in sorted(runs.items()):
        per_patient, loss = git_show(repo, sha, PER_PATIENT), git_show(repo, sha, LOSS)
        if per_patient is None or loss is None:
            raise SystemExit(f"{name}: its commit has no {PER_PATIENT} or {LOSS} (a run from before the per-epoch "
                             "validation Dice, or a classifier)")
        row = run_figures(name, pd.read_csv(io.StringIO(per_patient), dtype={"patient": str}),
                          pd.read_csv(io.StringIO(loss), sep="\t"), limit)
        train = json.loads(git_show(repo, sha, "metrics/train.json") or "{}")
        row["kept"] = f"{train.get('best_epoch', '-')} ({train.get('monitor', 'val_loss')})"
        rows.append(row)
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.epoch_selection", description=__doc__.splitlines()[0])
    parser.add_argument("--repo", default=".")
    parser.add_argument("--exp", action="append", required=True, help="runs: names or patterns such as 'md-s*'")
    parser.add_argument("--limit", type=int, default=None, help="at most this many cuts into halves a run")
    args = parser.parse_args(argv)
    rows = load(args.repo, select(experiments(args.repo), args.exp), args.limit)
    print(markdown(rows))
    print(verdict(rows))


if __name__ == "__main__":
    main()
