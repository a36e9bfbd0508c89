"""The pipeline without DVC: dvc.yaml's stages in order, in a scratch folder, then the recipe's figures.

For a GPU machine that has Keras on JAX or PyTorch but neither DVC nor TensorFlow (the lent H100 here).
Where DVC is installed, `dvc exp run -S profile=gpu` is the same run. Overrides are DVC's `-S key=value`:

  KERAS_BACKEND=jax python -m benchmarks.gpu_recipe -S data.archive=/root/lgg/kaggle_3m
  KERAS_BACKEND=jax python -m benchmarks.gpu_recipe -S profile=demo -S data.source=synthetic   # smoke test
  KERAS_BACKEND=jax python -m benchmarks.gpu_recipe --folds 5 --parallel 3 -S data.archive=/root/lgg/kaggle_3m

Defaults: profile gpu, data.source archive. Prints each stage's seconds, the training summary and the
evaluation headline (per-volume Dice on the test patients: mean, median, worst; validation beside it).

--seeds 42 7 1 runs the recipe once per training seed (`train.seed`) on one split (workdir/seed42 ...), at
most --parallel at a time, then prints the seed spread on test and the seed ensemble (`benchmarks.ensemble`):

  KERAS_BACKEND=jax python -m benchmarks.gpu_recipe --seeds 42 7 1 --parallel 3 -S data.archive=/root/lgg/kaggle_3m

(`-S seed=N` would change the top-level seed, which also draws the split: other test patients.)

--folds k runs the k runs of `split.folds: k` (workdir/fold0 ...; each run's output in its run.log), at most
--parallel of them at a time on the one GPU, then prints the pooled cross-validation (`benchmarks.crossval`) and
the fold ensemble on test (`benchmarks.ensemble --folds`). Five processes compiling XLA at once made the H100's
first epoch take 3 minutes, so keep --parallel at 3 or less: three took 2 minutes, and `--folds 5 --parallel 3`
ran whole in 7.9 minutes there. On JAX the runs share a persistent compilation cache (workdir/jax-cache, unless
JAX_COMPILATION_CACHE_DIR is set): a run after the first loads its compiled steps instead of compiling them
again (first epoch 14-15 s instead of 2 minutes). --resume keeps the folds an earlier
call already evaluated with the same parameters, so k folds can be spread over several time-limited calls.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from stages.common import ROOT

DEFAULTS = ["profile=gpu", "data.source=archive"]


def override(params: dict, assignment: str) -> None:
    """Set a dotted key as `dvc exp run -S` does (the value parsed as YAML)."""
    key, _, value = assignment.partition("=")
    *path, last = key.split(".")
    node = params
    for part in path:
        node = node[part]
    if last not in node:
        raise SystemExit(f"-S {assignment}: params.yaml has no key {key}")
    node[last] = yaml.safe_load(value)


def params_text(assignments: list[str]) -> str:
    """The project's params.yaml changed by `assignments`, as a run folder holds it."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for assignment in assignments:
        override(params, assignment)
    archive = params["data"]["archive"]
    if not Path(archive).is_absolute():  # relative to the project, as in params.yaml
        params["data"]["archive"] = str((ROOT / archive).resolve())
    return yaml.safe_dump(params, sort_keys=False)


def run_stages(workdir: Path, assignments: list[str], names: list[str] | None = None, log=None,
               env: dict | None = None) -> dict[str, float]:
    """dvc.yaml's stage commands in order inside `workdir`, with params.yaml changed by `assignments`
    (only the stages in `names`, when given); seconds per stage. `log`: a file for the commands' output
    (default: this process's); `env`: variables added to theirs."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "params.yaml").write_text(params_text(assignments))
    env = {**os.environ, **(env or {}),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    seconds = {}
    for name, stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items():
        if names is not None and name not in names:
            continue
        print(f"--- {name}: {stage['cmd']}", file=log or sys.stdout, flush=True)
        start = time.perf_counter()
        command = stage["cmd"].split()
        if command[0] == "python":  # this interpreter (a GPU image may only have `python3`)
            command[0] = sys.executable
        subprocess.run(command, cwd=workdir, env=env, check=True, stdout=log,
                       stderr=subprocess.STDOUT if log else None)
        seconds[name] = round(time.perf_counter() - start, 1)
    return seconds


def report(workdir: Path, seconds: dict[str, float]) -> dict:
    train = json.loads((workdir / "metrics/train.json").read_text())
    evaluation = json.loads((workdir / "metrics/eval.json").read_text())
    validation = evaluation.get("validation", {})
    per_patient = list(csv.DictReader((workdir / "metrics/per_patient.csv").open()))
    worst = min(per_patient, key=lambda row: float(row["dice"])) if per_patient else {}
    import keras

    summary = {"keras_backend": keras.backend.backend(), "device": device_name(), "stage_seconds": seconds,
               "total_seconds": round(sum(seconds.values()), 1), "train": train,
               "test": {k: evaluation.get(k) for k in ("dice_volume_mean", "dice_volume_median",
                                                       "dice_slice_mean", "dice_pixel", "tversky",
                                                       "postprocess")},
               "worst_test_patient": worst,
               "validation": {k: v for k, v in validation.items() if k.startswith("dice")}}
    print(json.dumps(summary, indent=1))
    return summary


def device_name() -> str:
    import keras

    if keras.backend.backend() == "jax":
        import jax

        return str(jax.devices()[0].device_kind)
    if keras.backend.backend() == "torch":
        import torch

        return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    import tensorflow as tf

    return ", ".join(d.name for d in tf.config.list_logical_devices()) or "cpu"


def child_env(workdir: Path, parallel: int) -> dict[str, str]:
    """What the runs' processes get (only JAX reads it): one compilation cache for all of them and, side by side,
    a share of the GPU's memory each (a JAX process takes 75% of it by default). Variables already set win."""
    env = {"JAX_COMPILATION_CACHE_DIR": str(workdir / "jax-cache")}
    if parallel > 1:
        env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{0.9 / parallel:.2f}"
    return {k: v for k, v in env.items() if k not in os.environ}


def evaluated_with(run: Path, assignments: list[str]) -> bool:
    """Whether the run folder holds an evaluation made with the params.yaml that `assignments` give."""
    return (run / "metrics/eval.json").exists() and (run / "params.yaml").exists() \
        and (run / "params.yaml").read_text() == params_text(assignments)


def run_side_by_side(workdir: Path, runs: dict[str, list[str]], parallel: int,
                     resume: bool = False) -> dict[str, dict[str, float]]:
    """Runs named `runs` ({folder name: its params.yaml assignments}) in workdir/NAME, at most `parallel` at a
    time; seconds per stage of each. A run that fails is named with its log; the others still finish. With
    `resume`, a run already evaluated with the same params.yaml (an earlier call cut short by a time limit) is
    kept, its seconds unknown ({})."""
    from concurrent.futures import ThreadPoolExecutor

    env = child_env(workdir, parallel)

    def one(name: str) -> dict[str, float]:
        run = workdir / name
        if resume and evaluated_with(run, runs[name]):
            print(f"{name}: evaluated before with these params, kept", flush=True)
            return {}
        run.mkdir(parents=True, exist_ok=True)
        with open(run / "run.log", "w") as log:
            return run_stages(run, runs[name], log=log, env=env)

    print(f"{len(runs)} runs, {parallel} at a time; each run's output in {workdir}/NAME/run.log", flush=True)
    with ThreadPoolExecutor(parallel) as pool:
        futures = {name: pool.submit(one, name) for name in runs}
    failed = [name for name, future in futures.items() if future.exception()]
    if failed:
        raise SystemExit(f"{', '.join(failed)} failed: see "
                         f"{', '.join(str(workdir / name / 'run.log') for name in failed)}")
    return {name: future.result() for name, future in futures.items()}


def run_folds(workdir: Path, assignments: list[str], k: int, parallel: int,
              resume: bool = False) -> dict[int, dict[str, float]]:
    """The k runs of a k-fold split in workdir/fold0 ... (run_side_by_side); seconds per stage, by fold."""
    runs = {f"fold{fold}": assignments + [f"split.folds={k}", f"split.fold={fold}"] for fold in range(k)}
    seconds = run_side_by_side(workdir, runs, parallel, resume)
    return {fold: seconds[f"fold{fold}"] for fold in range(k)}


def run_seeds(workdir: Path, assignments: list[str], seeds: list[int], parallel: int,
              resume: bool = False) -> dict[int, dict[str, float]]:
    """The recipe once per training seed (`train.seed`, which leaves the split alone: the top-level `seed` would
    draw another split) in workdir/seedN (run_side_by_side); seconds per stage, by seed."""
    runs = {f"seed{seed}": assignments + [f"train.seed={seed}"] for seed in seeds}
    seconds = run_side_by_side(workdir, runs, parallel, resume)
    return {seed: seconds[f"seed{seed}"] for seed in seeds}


def report_folds(workdir: Path, seconds: dict[int, dict[str, float]]) -> dict:
    """Each fold's figures, the pooled cross-validation and the fold ensemble on test."""
    from benchmarks import crossval, ensemble

    runs = [workdir / f"fold{fold}" for fold in sorted(seconds)]
    folds = {fold: report(run, seconds[fold]) for fold, run in zip(sorted(seconds), runs)}
    tables, _, k = crossval.load(Path("."), [str(run) for run in runs], folders=True)
    print(f"{k}-fold cross-validation over the non-test patients (each post-processing fixed for all folds):")
    print(crossval.markdown(crossval.summary(crossval.pool(tables, k))))
    print(f"reference: {crossval.REFERENCE}")
    fold_ensemble = ensemble.evaluate_fold_ensemble(runs)
    print("fold ensemble:", json.dumps(fold_ensemble, indent=1))
    return {"folds": folds, "fold_ensemble": fold_ensemble}


def report_seeds(workdir: Path, seconds: dict[int, dict[str, float]]) -> dict:
    """Each seed's figures, their spread on test (mean, sd, range of per-volume Dice) and the seed ensemble."""
    import numpy as np

    from benchmarks import ensemble

    runs = {seed: workdir / f"seed{seed}" for seed in sorted(seconds)}
    seeds = {seed: report(run, seconds[seed]) for seed, run in runs.items()}
    test = np.array([seeds[seed]["test"]["dice_volume_mean"] for seed in runs])
    spread = {"seeds": list(runs), "test_dice_volume_mean": [round(float(d), 4) for d in test],
              "mean": round(float(test.mean()), 4), "sd": round(float(test.std(ddof=1)), 4) if len(test) > 1 else 0.0,
              "range": round(float(test.max() - test.min()), 4)}
    print("seed spread on test:", json.dumps(spread))
    seed_ensemble = ensemble.evaluate_ensemble(list(runs.values())) if len(runs) > 1 else None
    print("seed ensemble:", json.dumps(seed_ensemble, indent=1))
    return {"seeds": seeds, "spread": spread, "seed_ensemble": seed_ensemble}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-S", dest="set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "gpu")
    parser.add_argument("--fresh", action="store_true", help="empty the workdir first")
    parser.add_argument("--folds", type=int, default=0, metavar="K", help="run the K folds of split.folds: K")
    parser.add_argument("--seeds", type=int, nargs="+", metavar="SEED",
                        help="run the recipe once per train.seed on one split, then the spread and seed ensemble")
    parser.add_argument("--parallel", type=int, default=1, metavar="N",
                        help="with --folds or --seeds: N runs at a time")
    parser.add_argument("--resume", action="store_true",
                        help="with --folds or --seeds: keep the runs an earlier call evaluated with the same params")
    args = parser.parse_args()
    if args.fresh and args.workdir.exists():
        shutil.rmtree(args.workdir)
    if args.folds and args.seeds:
        raise SystemExit("--folds and --seeds: one at a time (a seed's folds: --folds K -S train.seed=N)")
    if args.seeds:
        if args.parallel < 1:
            raise SystemExit(f"--parallel {args.parallel}: need N >= 1")
        seconds = run_seeds(args.workdir, DEFAULTS + args.set, args.seeds, args.parallel, args.resume)
        summary = report_seeds(args.workdir, seconds)
        (args.workdir / "seeds.json").write_text(json.dumps(summary, indent=1) + "\n")
        return
    if args.folds:
        if args.folds < 2 or args.parallel < 1:
            raise SystemExit(f"--folds {args.folds} --parallel {args.parallel}: need K >= 2 folds and N >= 1")
        seconds = run_folds(args.workdir, DEFAULTS + args.set, args.folds, args.parallel, args.resume)
        summary = report_folds(args.workdir, seconds)
        (args.workdir / "folds.json").write_text(json.dumps(summary, indent=1) + "\n")
        return
    seconds = run_stages(args.workdir, DEFAULTS + args.set, env=child_env(args.workdir, 1))
    report(args.workdir, seconds)


if __name__ == "__main__":
    sys.exit(main())
