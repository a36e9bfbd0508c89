"""Seed ensembles: several trained models of one recipe, their probability maps averaged, scored as evaluate does.

Each argument is a run folder (a `dvc exp` workspace or a `benchmarks.gpu_recipe` workdir) with
models/model.keras and data/prepared. All must share one split (the same data/split.csv). The ensemble is one
Keras model that averages the members' outputs, so evaluate's own code scores it: validation patients first,
post-processing chosen on them, then one look at the test patients. Prints each member's figures (from its
metrics/eval.json) beside the ensemble's.

  python -m benchmarks.ensemble runs/r42 runs/r7 runs/r1 [--out ensemble.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import keras
import yaml

from stages import evaluate, inference, prepared
from stages.common import BrainsegError


def average(models: list[keras.Model]) -> keras.Model:
    """One model whose output is the mean of the members' final outputs (named as the members, so evaluation
    and its checks see the architecture it averages)."""
    name = models[0].name
    inputs = keras.Input(models[0].inputs[0].shape[1:])
    outputs = []
    for i, member in enumerate(models):
        member.name = f"member_{i}"  # nested models need distinct names
        y = member(inputs)
        outputs.append(y[-1] if isinstance(y, (list, tuple)) else y)
    mean = outputs[0] if len(outputs) == 1 else keras.layers.Average(dtype="float32")(outputs)
    return keras.Model(inputs, mean, name=name)


def check_same_split(runs: list[Path]) -> None:
    splits = {run: (run / "data/split.csv").read_bytes() for run in runs}
    if len(set(splits.values())) != 1:
        raise BrainsegError(f"{', '.join(map(str, runs))}: their data/split.csv differ; an ensemble must be "
                            "scored on patients none of its members trained on. Fix: runs of one split "
                            "(same seed and split parameters, only train.seed changed)")


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args()
    summary = {"members": {str(run): member_figures(run) for run in args.runs},
               "ensemble": evaluate_ensemble(args.runs)}
    text = json.dumps(summary, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
