"""The pipeline without DVC: dvc.yaml's stages in order, in a scratch folder, then the recipe's figures.

For a GPU machine that has Keras on JAX or PyTorch but neither DVC nor TensorFlow (the lent H100 here).
Where DVC is installed, `dvc exp run -S profile=gpu` is the same run. Overrides are DVC's `-S key=value`:

  KERAS_BACKEND=jax python -m benchmarks.gpu_recipe -S data.archive=/root/lgg/kaggle_3m
  KERAS_BACKEND=jax python -m benchmarks.gpu_recipe -S profile=demo -S data.source=synthetic   # smoke test

Defaults: profile gpu, data.source archive. Prints each stage's seconds, the training summary and the
evaluation headline (per-volume Dice on the test patients: mean, median, worst; validation beside it).
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


def run_stages(workdir: Path, assignments: list[str], names: list[str] | None = None) -> dict[str, float]:
    """dvc.yaml's stage commands in order inside `workdir`, with params.yaml changed by `assignments`
    (only the stages in `names`, when given); seconds per stage."""
    workdir.mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for assignment in assignments:
        override(params, assignment)
    archive = params["data"]["archive"]
    if not Path(archive).is_absolute():  # relative to the project, as in params.yaml
        params["data"]["archive"] = str((ROOT / archive).resolve())
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    seconds = {}
    for name, stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items():
        if names is not None and name not in names:
            continue
        print(f"--- {name}: {stage['cmd']}", flush=True)
        start = time.perf_counter()
        command = stage["cmd"].split()
        if command[0] == "python":  # this interpreter (a GPU image may only have `python3`)
            command[0] = sys.executable
        subprocess.run(command, cwd=workdir, env=env, check=True)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-S", dest="set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "gpu")
    parser.add_argument("--fresh", action="store_true", help="empty the workdir first")
    args = parser.parse_args()
    if args.fresh and args.workdir.exists():
        shutil.rmtree(args.workdir)
    seconds = run_stages(args.workdir, DEFAULTS + args.set)
    report(args.workdir, seconds)


if __name__ == "__main__":
    sys.exit(main())
