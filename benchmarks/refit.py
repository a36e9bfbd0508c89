"""Refit on training + validation patients against the model validation chose, for DVC experiments already run.

    dvc repro balance        # a workspace with the experiments' split: their top-level seed, split and balance
    python -m benchmarks.refit --repo ../clone --exp vnorm-s42 --exp vnorm-s7 ... --workdir runs/refit

For each experiment: the model it kept (from the DVC cache by dvc.lock's hash: the epoch with the lowest validation
loss; models/selection.keras, or models/model.keras in runs from before train.refit), that epoch's number
(metrics/train.json) and the learning rate of each epoch (DVCLive's log). The recipe is then trained again from
scratch, with the experiment's train settings and seed, on the training split plus the validation patients
(balanced like the training split: stages.balance.write_refit) for that many epochs, the learning rates replayed
(stages.train.refit: what `train.refit: true` does in the pipeline). Both models are scored as the evaluate stage
scores them: the post-processing chosen on the validation patients with the experiment's own model, then the test
patients once with each model. Printed: each experiment's two test scores, then both pooled over experiments and
patient by patient (Wilcoxon). A finished run's metrics are read back.
"""
from __future__ import annotations

import argparse
import io
import json
import shutil
import tempfile
from pathlib import Path

import pandas as pd
import yaml

from benchmarks.architectures import git_show
from benchmarks.crossval import commits, markdown, paired_stats
from benchmarks.errors import cached_model, validation_model_hash
from benchmarks.learning_curve import link_data

RATES = "dvclive/train/plots/metrics/train/learning_rate.tsv"
SAME = ("seed", "split", "balance")  # what decides the prepared data an experiment trained on


def check_same_data(name: str, params: dict, workspace: dict) -> None:
    for key in SAME:
        if params.get(key) != workspace.get(key):
            raise SystemExit(f"{name}: params.yaml's {key} ({params.get(key)}) differs from this workspace's "
                             f"({workspace.get(key)}), so it trained on other data: run this where it ran")


def learning_rates(text: str | None) -> list[float] | None:
    """Each epoch's learning rate from DVCLive's learning_rate.tsv (None without one: no plateau schedule)."""
    if not text:
        return None
    return pd.read_csv(io.StringIO(text), sep="\t").sort_values("step")["learning_rate"].astype(float).tolist()


def make_data(data: Path, folder: Path, balance: dict, seed: int) -> Path:
    """folder/data: the workspace's data linked, with the refit table (the validation patients balanced) added to
    its prepared tables; made once."""
    from stages import balance as balancing

    target = folder / "data"
    if (target / "prepared/refit.csv").is_file():
        return target
    link_data(data, target, lambda name: not name.startswith("refit"))
    index, split, images, masks = balancing.load_inputs(data)
    with tempfile.TemporaryDirectory(dir=target) as tmp:  # refit.csv last: a finished table means finished copies
        balancing.write_refit(Path(tmp), index, split, images, masks, balance, seed)
        for item in sorted(Path(tmp).iterdir(), key=lambda p: p.suffix == ".csv"):
            item.rename(target / "prepared" / item.name)
    return target


def run_root(folder: Path, data: Path, models: dict[str, Path]) -> Path:
    (folder / "models").mkdir(parents=True, exist_ok=True)
    if not (folder / "data").exists():
        (folder / "data").symlink_to(data.resolve())
    for name, source in models.items():
        if source != folder / "models" / name:
            shutil.copyfile(source, folder / "models" / name)
    return folder


def run_experiment(repo: Path, name: str, rev: str, data: Path, workdir: Path, workspace: dict) -> dict:
    """Train the refit of one experiment (unless done) and score both models; their eval.json files."""
    from stages import evaluate, train
    from stages.common import train_config

    params = yaml.safe_load(git_show(repo, rev, "params.yaml") or "{}")
    check_same_data(name, params, workspace)
    first = json.loads(git_show(repo, rev, "metrics/train.json") or "{}")
    if "best_epoch" not in first:
        raise SystemExit(f"{name}: no best_epoch in metrics/train.json: not a finished training run")
    folder = workdir / name
    folder.mkdir(parents=True, exist_ok=True)
    selection = folder / "selection.keras"
    if not selection.is_file():
        cached = cached_model(repo, validation_model_hash(yaml.safe_load(git_show(repo, rev, "dvc.lock"))),
                              folder)
        cached.rename(selection)
    stage_params = {**workspace, "model": params["model"]}
    kept = run_root(folder / "kept", data, {"model.keras": selection})
    refit = run_root(folder / "refit", data, {"selection.keras": selection})
    cfg = train_config(params)
    seed = params["seed"] if cfg.get("seed") is None else cfg["seed"]
    if not (refit / "metrics/train.json").is_file():
        print(f"{name}: refit for {first['best_epoch']} epochs (seed {seed})", flush=True)
        rates = learning_rates(git_show(repo, rev, RATES))
        summary = train.refit(params["model"], cfg, seed, first["best_epoch"], rates, refit / "data",
                              refit / evaluate.MODEL)
        (refit / "metrics").mkdir(exist_ok=True)
        (refit / "metrics/train.json").write_text(json.dumps(summary, indent=1))
    for root in (kept, refit):
        if not (root / evaluate.EVAL_JSON).is_file():
            evaluate.run_stage(stage_params, root)
    return {"kept": kept, "refit": refit}


def per_patient(roots: dict) -> pd.DataFrame:
    """Each test patient's per-volume Dice under each model (columns kept, refit)."""
    return pd.DataFrame({label: pd.read_csv(root / "metrics/per_patient.csv", dtype={"patient": str})
                         .set_index("patient")["dice"] for label, root in roots.items()})


def summary_row(name: str, roots: dict, patients: pd.DataFrame) -> dict:
    kept, refit = (json.loads((roots[k] / "metrics/eval.json").read_text()) for k in ("kept", "refit"))
    trained = json.loads((roots["refit"] / "metrics/train.json").read_text())
    return {"experiment": name, "post-processing (validation)": kept["postprocess"]["chosen_on_validation"],
            "validation": kept["validation"]["dice_volume_mean"],
            "refit epochs": trained["epochs"], "refit slices": trained["train_slices"],
            "refit minutes": round(trained["train_seconds"] / 60, 1),
            "test, kept model": kept["dice_volume_mean"], "test, refit": refit["dice_volume_mean"],
            "median, kept": kept["dice_volume_median"], "median, refit": refit["dice_volume_median"],
            "worst, kept": float(patients["kept"].min()), "worst, refit": float(patients["refit"].min())}


def main(argv: list[str] | None = None) -> None:
    from stages.common import load_params

    parser = argparse.ArgumentParser(prog="python -m benchmarks.refit", description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=Path("."), help="the repository holding the experiments")
    parser.add_argument("--exp", action="append", required=True, help="an experiment (repeatable)")
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=Path("data"), help="this workspace's data folder")
    args = parser.parse_args(argv)
    workspace = load_params()
    data = make_data(args.data, args.workdir, workspace["balance"], workspace["seed"])
    rows, pairs = [], []
    for name, rev in commits(args.repo, args.exp).items():
        roots = run_experiment(args.repo, name, rev, data, args.workdir, workspace)
        pairs.append(per_patient(roots))
        rows.append(summary_row(name, roots, pairs[-1]))
        print(markdown(pd.DataFrame(rows[-1:])), flush=True)
    frame = pd.DataFrame(rows)
    print("\nper-volume Dice on the test patients: the model each run kept by validation against its refit on "
          "training + validation patients (post-processing chosen on validation with the kept model)")
    print(markdown(frame))
    means = frame[["test, kept model", "test, refit"]]
    print(f"\nmean over {len(frame)} runs: kept {means.iloc[:, 0].mean():.3f} (sd {means.iloc[:, 0].std():.3f}), "
          f"refit {means.iloc[:, 1].mean():.3f} (sd {means.iloc[:, 1].std():.3f}); refit better in "
          f"{int((means.iloc[:, 1] > means.iloc[:, 0]).sum())} of {len(frame)} runs")
    both = pd.concat(pairs, ignore_index=True)
    moved = paired_stats(both["refit"] - both["kept"])
    print(f"patient by patient, runs pooled ({len(both)} pairs): refit - kept {moved['difference']:+.3f} "
          f"(95% interval {moved['95% interval']}), "
          f"better / worse by over 0.005: {moved['better / worse']}, Wilcoxon p {moved['Wilcoxon p']:.3g}")


if __name__ == "__main__":
    main()
