"""Where per-volume Dice is lost: the validation patients of DVC experiments, their wrong pixels by kind and place.

    python -m benchmarks.errors --exp vnorm-fold0 --exp vnorm-s42-fold1 --exp vnorm-fold2 --exp vnorm-fold3
    python -m benchmarks.errors --repo ../clone --exp ... --data ../shared/data/lgg-mri-segmentation-dev.zip

Each experiment's trained model (models/model.keras, taken from the DVC cache by dvc.lock's hash) segments its
validation patients (metrics/per_patient_validation.csv), read from its data source (params.yaml's data.archive,
or --data), at evaluate.threshold with no post-processing. The wrong pixels are split four ways: tumour missed on
slices where none of it was found, tumour missed on slices where some was (under-segmentation), false positives on
tumour-free slices and false positives on tumour slices. Printed: each kind's share, the mean per-volume Dice if
that kind were gone (what a perfect fix of it would buy: a ceiling, not a forecast), the worst patients, and the
false positives on tumour-free slices by position in the volume (tenths, first slice to last; Kaggle numbers slices
from the bottom of the head). Validation patients only: what it shows may steer the next lever without
looking at test.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from benchmarks.architectures import git_show
from benchmarks.crossval import commits, markdown, run_files

MODEL = "models/model.keras"
SELECTION = "models/selection.keras"  # with train.refit, MODEL was trained on the validation patients too
KINDS = ["fn_missed_slices", "fn_found_slices", "fp_tumour_free", "fp_tumour_slices"]


def slice_table(truth: np.ndarray, pred: np.ndarray) -> pd.DataFrame:
    """One patient's slices in volume order (N,H,W) booleans -> per slice: position (0 first, 1 last), true,
    predicted and true-positive pixels."""
    n = len(truth)
    return pd.DataFrame({"position": np.arange(n) / max(n - 1, 1),
                         "true": truth.sum(axis=(1, 2)), "pred": pred.sum(axis=(1, 2)),
                         "tp": (truth & pred).sum(axis=(1, 2))})


def patient_errors(slices: pd.DataFrame) -> dict:
    """A patient's slice table -> true positives and the four kinds of wrong pixels."""
    tumour, found = slices["true"] > 0, slices["tp"] > 0
    missed, fp = slices["true"] - slices["tp"], slices["pred"] - slices["tp"]
    return {"true": int(slices["true"].sum()), "tp": int(slices["tp"].sum()),
            "fn_missed_slices": int(missed[tumour & ~found].sum()), "fn_found_slices": int(missed[found].sum()),
            "fp_tumour_free": int(fp[~tumour].sum()), "fp_tumour_slices": int(fp[tumour].sum())}


def volume_dice(frame: pd.DataFrame, without: tuple[str, ...] = ()) -> pd.Series:
    """Per-volume Dice of each row; the kinds in `without` counted as right (missed pixels as found)."""
    tp = frame["tp"] + sum(frame[k] for k in without if k.startswith("fn"))
    wrong = sum(frame[k] for k in KINDS if k not in without)
    denominator = 2 * tp + wrong
    # a patient with no tumour and nothing predicted scores 1, as stages.metrics scores empty volumes
    return pd.Series(np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 1.0), index=frame.index)


def ceilings(patients: pd.DataFrame) -> pd.DataFrame:
    """Each kind's share of the wrong pixels, and the mean per-volume Dice with that kind gone."""
    total = patients[KINDS].to_numpy().sum()
    rows = [{"error": "none removed (as segmented)", "pixels": "", "share": "",
             "mean per-volume Dice": volume_dice(patients).mean()}]
    for kind in KINDS:
        rows.append({"error": kind, "pixels": int(patients[kind].sum()),
                     "share": f"{patients[kind].sum() / max(total, 1):.0%}",
                     "mean per-volume Dice": volume_dice(patients, (kind,)).mean()})
    rows.append({"error": "all false positives", "pixels": int(patients[KINDS[2:]].to_numpy().sum()), "share": "",
                 "mean per-volume Dice": volume_dice(patients, tuple(KINDS[2:])).mean()})
    rows.append({"error": "all missed tumour", "pixels": int(patients[KINDS[:2]].to_numpy().sum()), "share": "",
                 "mean per-volume Dice": volume_dice(patients, tuple(KINDS[:2])).mean()})
    return pd.DataFrame(rows)


def by_position(slices: pd.DataFrame, bins: int = 10) -> pd.DataFrame:
    """Tumour-free and tumour slices by tenth of the volume: false positives on the former, tumour on the latter."""
    frame = slices.assign(tenth=np.minimum((slices["position"] * bins).astype(int), bins - 1))
    free = frame[frame["true"] == 0]
    out = pd.DataFrame({"tumour-free slices": free.groupby("tenth").size(),
                        "with false positives": free[free["pred"] > 0].groupby("tenth").size(),
                        "false-positive pixels": free.groupby("tenth")["pred"].sum(),
                        "tumour slices": frame[frame["true"] > 0].groupby("tenth").size(),
                        "tumour pixels": frame.groupby("tenth")["true"].sum()})
    return out.reindex(range(bins)).fillna(0).astype(int).rename_axis("tenth").reset_index()


def below_cut(slices: pd.DataFrame, cuts=(0.1, 0.15, 0.2, 0.25)) -> pd.DataFrame:
    """Mean per-volume Dice if every prediction on the slices below each position cut were removed (a fixed prior:
    no tumour at the skull base), with what it removes and what it loses."""
    rows = []
    for cut in (0.0, *cuts):
        low = slices["position"] < cut
        kept = slices.assign(pred=slices["pred"].where(~low, 0), tp=slices["tp"].where(~low, 0))
        per = kept.groupby(["run", "patient"])[["true", "pred", "tp"]].sum()
        total = per["true"] + per["pred"]
        dice = np.where(total > 0, 2 * per["tp"] / np.maximum(total, 1), 1.0)
        rows.append({"below position": cut, "predicted pixels removed": int(slices.loc[low, "pred"].sum()),
                     "of them tumour": int(slices.loc[low, "tp"].sum()),
                     "mean per-volume Dice": float(dice.mean())})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------ experiments

def out_hash(lock: dict, path: str) -> str | None:
    """The md5 dvc.lock records for an output path (None where no stage has it)."""
    for stage in lock.get("stages", {}).values():
        for out in stage.get("outs", []):
            if out.get("path") == path:
                return out["md5"]
    return None


def model_hash(lock: dict) -> str:
    md5 = out_hash(lock, MODEL)
    if md5 is None:
        raise SystemExit(f"dvc.lock names no {MODEL}: not a training run")
    return md5


def validation_model_hash(lock: dict) -> str:
    """The model a run chose its epochs with, which scores its validation patients: models/selection.keras, or
    models/model.keras in runs from before train.refit (where the two are one model)."""
    return out_hash(lock, SELECTION) or model_hash(lock)


def cached_model(repo: Path, md5: str, folder: Path) -> Path:
    """The DVC cache's copy of a model, under a .keras name (Keras loads by suffix)."""
    source = repo / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]
    if not source.is_file():
        raise SystemExit(f"{source}: not in the DVC cache; fix: `dvc exp pull` or run the experiment here")
    target = folder / f"{md5}.keras"
    shutil.copyfile(source, target)
    return target


def data_path(params: dict, override: Path | None, name: str) -> Path:
    if override is not None:
        return override
    data = params.get("data", {})
    if data.get("source") != "archive":
        raise SystemExit(f"{name}: data.source is {data.get('source')}; pass --data with its Kaggle-layout data")
    return Path(data["archive"])


def patient_volumes(raw, frame: pd.DataFrame, patients: list[str], name: str):
    """Each patient's (patient, images, masks), its slices in order, read from the source (`frame`: the source's
    pair_slices table); an error naming the run and the patient the source lacks."""
    from stages import index

    for patient in patients:
        rows = frame[frame["patient"] == patient].reset_index(drop=True)  # in slice order
        if rows.empty:
            raise SystemExit(f"{name}: validation patient {patient} is not in {raw.label()}")
        images, masks, _ = index.load_slices(raw, rows, progress=False)
        yield patient, images, masks


def validation_runs(repo: Path, names: list[str], data: Path | None, folder: Path):
    """Each named run as (name, params, validation table, its model copied into `folder`, raw source, the source's
    pair_slices table); each data source opened and listed once."""
    from stages import index, rawdata

    sources = {}
    for name, rev in commits(repo, names).items():
        params, validation, _ = run_files(repo, name, rev)
        model = cached_model(repo, validation_model_hash(yaml.safe_load(git_show(repo, rev, "dvc.lock"))), folder)
        path = data_path(params, data, name)
        if path not in sources:
            raw = rawdata.open_raw(path)
            sources[path] = raw, index.pair_slices(raw)[0]
        yield name, params, validation, model, *sources[path]


def segment_patients(model_path: Path, raw, frame: pd.DataFrame, patients: list[str], threshold: float,
                     name: str):
    """Each patient's slices (`frame`: the source's pair_slices table), segmented as evaluation does before
    post-processing -> (errors, slices) tables."""
    from stages import inference

    model = inference.load_model(model_path)
    errors, slices = [], []
    for patient, images, masks in patient_volumes(raw, frame, patients, name):
        pred = inference.predict_probs(model, images) > threshold
        table = slice_table(masks > 0, pred).assign(run=name, patient=patient)
        slices.append(table)
        errors.append({"run": name, "patient": patient, **patient_errors(table)})
    return pd.DataFrame(errors), pd.concat(slices, ignore_index=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.errors", description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=Path("."))
    parser.add_argument("--exp", action="append", required=True, help="an experiment (repeatable)")
    parser.add_argument("--data", type=Path, help="Kaggle-layout zip or folder (default: each run's data.archive)")
    parser.add_argument("--worst", type=int, default=8, help="patients listed, worst first")
    args = parser.parse_args(argv)
    errors, slices = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name, params, validation, model, raw, frame in validation_runs(args.repo, args.exp, args.data, Path(tmp)):
            threshold = float(params.get("evaluate", {}).get("threshold", 0.5))
            e, s = segment_patients(model, raw, frame, validation["patient"].tolist(), threshold, name)
            errors.append(e)
            slices.append(s)
            print(f"{name}: {len(validation)} validation patients segmented", flush=True)
    errors, slices = pd.concat(errors, ignore_index=True), pd.concat(slices, ignore_index=True)
    dice = volume_dice(errors)
    print(f"\n{len(errors)} validation patients of {len(args.exp)} runs, threshold only: mean per-volume Dice "
          f"{dice.mean():.3f}, median {dice.median():.3f}")
    print(markdown(ceilings(errors)))
    tumour = slices[slices["true"] > 0]
    print(f"\ntumour slices with no tumour pixel found: {int((tumour['tp'] == 0).sum())} of {len(tumour)} "
          f"({int(tumour.loc[tumour['tp'] == 0, 'true'].sum())} tumour pixels)")
    worst = errors.assign(dice=dice).nsmallest(args.worst, "dice")
    print(f"\nworst {len(worst)} patients")
    print(markdown(worst[["run", "patient", "dice", "true", "tp", *KINDS]]))
    print("\nby tenth of the volume (0: first slices, the bottom of the head in Kaggle's numbering)")
    print(markdown(by_position(slices)))
    print("\nwith every prediction below a position removed (a fixed prior, not a step of the pipeline)")
    print(markdown(below_cut(slices)))


if __name__ == "__main__":
    main()
