"""How much a trained segmenter leans on the sequences that the data set fills with FLAIR when a patient lacks them.

    python -m benchmarks.missing_sequences --exp 'ms-s*' --against 'ts-s*'
    python -m benchmarks.missing_sequences --repo ../clone --exp ts-s42 --split test --data ../shared/data/...zip

Kaggle's slices of a patient scanned without post-contrast (or without pre- and post-contrast) hold copies of the
FLAIR in those channels (7 of the dev archive's 61 patients). Each experiment's model (from the DVC cache, by
dvc.lock's hash: with train.refit, the one that chose the epoch for validation, the served one for test) segments
its validation patients (`--split test`: its test patients, a measurement only) three
ways: as given, with the post-contrast channel replaced by the FLAIR, and with both pre- and post-contrast
replaced, as the data set would give them had those sequences been missing. Printed: the mean per-volume Dice of
each way, threshold only and with the post-processing the run's evaluation chose on validation (eval.json), each
way's loss against the slices as given, and with --against the same for a baseline's runs (a recipe trained with
`train.augment.missing` against one without, say).
Patients whose slices already hold the copies score alike in every way that copies what they lack.
"""
from __future__ import annotations

import argparse
import io
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from benchmarks.architectures import git_show
from benchmarks.crossval import experiments, markdown, run_files
from benchmarks.errors import cached_model, data_path, model_hash, patient_volumes, validation_model_hash
from benchmarks.position_cut import volume_dice
from benchmarks.seeds import run_copies, run_seed, select

# the data set's channels: pre-contrast, FLAIR, post-contrast; each way lists those that become FLAIR copies
WAYS = {"as given": (), "post-contrast from FLAIR": (2,), "pre- and post-contrast from FLAIR": (0, 2)}


def with_flair_copies(images: np.ndarray, channels) -> np.ndarray:
    """uint8 slices (N,H,W,3) with `channels` replaced by copies of the FLAIR (channel 1), as the data set fills
    a sequence a patient was not scanned with; the input is left as it was."""
    out = np.array(images, copy=True)
    for channel in channels:
        out[..., channel] = out[..., 1]
    return out


def lacking(images: np.ndarray) -> tuple[int, ...]:
    """The channels of a patient's slices that already copy its FLAIR on every slice with a head."""
    heads = images[images.reshape(len(images), -1, 3).max(axis=(1, 2)) > 0]
    if not len(heads):
        return ()
    return tuple(c for c in (0, 2) if np.array_equal(heads[..., c], heads[..., 1]))


def score_patient(model, images: np.ndarray, masks: np.ndarray, settings: dict[str, dict]) -> dict:
    """One patient's slices (in order) -> {(way, setting): per-volume Dice}; each way's views predicted once."""
    from stages import inference
    from stages.postprocess import postprocess

    view_sets = {inference.view_set(s) for s in settings.values()}
    views = inference.views_covering(view_sets)
    patients, truth, out = np.zeros(len(images)), masks > 0, {}
    engine = next(iter(settings.values())).get("engine", "auto")  # the evaluate params' engine, as evaluation runs
    for way, channels in WAYS.items():
        probs = inference.view_probs(model, with_flair_copies(images, channels), views, engine=engine)
        averages = inference.average_views(probs, views, view_sets)
        for name, setting in settings.items():
            pred = postprocess(averages[inference.view_set(setting)], setting, patients)
            out[way, name] = volume_dice(truth, pred)
    return out


def run_settings(params: dict, evaluation: dict) -> dict[str, dict]:
    """Threshold only, and the post-processing the run's evaluation chose on validation (its eval.json)."""
    from stages.evaluate import compare_settings
    from stages.postprocess import recorded_settings

    evaluate = params.get("evaluate", {})
    return {"threshold": compare_settings(evaluate)["threshold"],
            "chosen": recorded_settings(evaluate, evaluation["postprocess"])}


def split_patients(repo: Path, rev: str, name: str, split: str, validation: pd.DataFrame) -> list[str]:
    if split == "val":
        return validation["patient"].tolist()
    csv = git_show(repo, rev, "metrics/per_patient.csv")
    if csv is None:
        raise SystemExit(f"{name}: no metrics/per_patient.csv (its evaluate stage has not run)")
    return pd.read_csv(io.StringIO(csv))["patient"].tolist()


def score_runs(repo: Path, patterns: list[str], split: str, data: Path | None) -> pd.DataFrame:
    """The matching experiments' patients of `split`, scored every way: one row per run, patient, way and
    setting."""
    from stages import index, inference, rawdata

    runs = select(experiments(repo), patterns)
    rows, sources = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, rev in runs.items():
            params, validation, evaluation = run_files(repo, name, rev)
            lock = yaml.safe_load(git_show(repo, rev, "dvc.lock"))
            # with train.refit the test patients are scored by the refit model, as evaluate scores them
            md5 = validation_model_hash(lock) if split == "val" else model_hash(lock)
            model = inference.load_model(cached_model(repo, md5, Path(tmp)))
            path = data_path(params, data, name)
            if path not in sources:
                raw = rawdata.open_raw(path)
                sources[path] = raw, index.pair_slices(raw)[0]
            settings = run_settings(params, evaluation)
            patients = split_patients(repo, rev, name, split, validation)
            for patient, images, masks in patient_volumes(*sources[path], patients, name):
                already = lacking(images)
                for (way, setting), dice in score_patient(model, images, masks, settings).items():
                    rows.append({"run": name, "seed": run_seed(params), "copies": run_copies(params),
                                 "patient": patient, "lacks": "+".join(("pre", "", "post")[c] for c in already),
                                 "way": way, "setting": setting, "dice": dice})
            print(f"{name}: {len(patients)} {split} patients scored {len(WAYS)} ways", flush=True)
    if not rows:
        raise SystemExit(f"{repo}: no experiment matches {patterns}")
    return pd.DataFrame(rows)


def summary(scores: pd.DataFrame) -> pd.DataFrame:
    """Per run and way: mean per-volume Dice threshold only and chosen, and the loss against the slices as
    given."""
    means = scores.pivot_table(index=["run", "way"], columns="setting", values="dice", aggfunc="mean")
    means = means[[s for s in ("threshold", "chosen") if s in means]]
    given = means.xs("as given", level="way")
    loss = means - given.reindex(means.index, level="run")
    table = means.join(loss.add_suffix(" vs as given")).reset_index()
    table["way"] = pd.Categorical(table["way"], list(WAYS))
    return table.sort_values(["run", "way"]).reset_index(drop=True)


def overall(scores: pd.DataFrame) -> pd.DataFrame:
    """Each way over all the runs: mean of the run means, and the runs' range."""
    per_run = scores.pivot_table(index=["way", "run"], columns="setting", values="dice", aggfunc="mean")
    per_run = per_run[[s for s in ("threshold", "chosen") if s in per_run]]
    table = per_run.groupby(level="way").agg(["mean", "min", "max"])
    table.columns = [f"{setting} {stat}" for setting, stat in table.columns]
    return table.reindex(list(WAYS)).reset_index()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.missing_sequences",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=Path("."))
    parser.add_argument("--exp", action="append", required=True, help="experiment name or glob (repeatable)")
    parser.add_argument("--against", action="append", default=[], help="a baseline's experiments (repeatable)")
    parser.add_argument("--split", choices=("val", "test"), default="val",
                        help="whose slices: validation patients (default) or test patients (a measurement only)")
    parser.add_argument("--data", type=Path, help="Kaggle-layout zip or folder (default: each run's data.archive)")
    args = parser.parse_args(argv)
    groups = {"experiments": args.exp, **({"baseline": args.against} if args.against else {})}
    for label, patterns in groups.items():
        scores = score_runs(args.repo, patterns, args.split, args.data)
        print(f"\n{label} ({', '.join(patterns)}), {args.split} patients, mean per-volume Dice:")
        print(markdown(summary(scores)))
        print(markdown(overall(scores)))
        lacks = scores.loc[scores["lacks"] != "", ["patient", "lacks"]].drop_duplicates()
        if len(lacks):
            print("already FLAIR copies in the data set: "
                  + ", ".join(f"{p} ({what})" for p, what in lacks.itertuples(index=False)))


if __name__ == "__main__":
    main()
