"""Benchmark: what mixed precision does to a trained segmenter's Dice and speed at inference.

The model's float32 weights are copied into the same architecture built under a mixed policy
(mixed_bfloat16 on a CPU, mixed_float16 on a GPU) and both are scored by the evaluation stage's own code on
the prepared validation and test patients, threshold only (no post-processing), in the same run, both run
by Keras (and float32 once more by the LiteRT engine evaluation uses on a CPU). The model
must have been trained with the filters of params.yaml's profile (its weights are copied by shape).

    python -m benchmarks.precision [--model models/model.keras] [--data data] [--policy mixed_bfloat16]
"""
from __future__ import annotations

import argparse
from pathlib import Path


def rebuild(model, policy: str, filters: int):
    """`model`'s architecture built under `policy`, carrying its weights."""
    import keras

    from stages.models import build_model

    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(policy)
    try:
        names = {layer.name for layer in model.layers}
        norm = "slice" if "standardise" in names else "volume" if "volume_decode" in names else None
        twin = build_model(model.name, model.input_shape[1:], filters, input_norm=norm)
    finally:
        keras.mixed_precision.set_global_policy(previous)
    twin.set_weights(model.get_weights())
    return twin


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("models/model.keras"))
    parser.add_argument("--data", type=Path, default=Path("data"), help="folder of prepared/ and slices/")
    parser.add_argument("--policy", default=None, help="default: mixed_float16 with a GPU, else mixed_bfloat16")
    args = parser.parse_args(argv)
    import tensorflow as tf

    from stages import evaluate, inference, prepared
    from stages.common import load_params, train_config

    params = load_params()
    settings = {**params["evaluate"], "min_component": 0, "largest_3d": False, "tta_flip": False, "engine": "keras"}
    policy = args.policy or ("mixed_float16" if tf.config.list_logical_devices("GPU") else "mixed_bfloat16")
    model = inference.load_model(args.model)
    mixed = rebuild(model, policy, train_config(params)["filters"])
    print(f"\nmodel {args.model} ({model.name}); policy compared: {policy}; threshold only")
    for split in ("val", "test"):
        data = prepared.originals(args.data, split)
        for name, m, engine in (("float32", model, "keras"), (policy, mixed, "keras"), ("float32", model, "litert")):
            scores = evaluate.evaluate_model(m, *data, {**settings, "engine": engine}, progress=False).metrics
            print(f"{split:5s} {name:15s} {engine:6s} per-volume Dice {scores['dice_volume_mean']:.4f}  pixel Dice "
                  f"{scores['dice_pixel']:.4f}  {scores['model']['slices_per_second']:7.1f} slices/s")


if __name__ == "__main__":
    main()
