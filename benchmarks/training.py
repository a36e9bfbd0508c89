"""Benchmark: training and inference speed of the default segmenter at the CPU size.

Prints, in one run on this machine:
- the matrix-multiply peak (float32 GEMM through TensorFlow, 2048x2048, best of several),
- training slices/s of params.yaml's model at the CPU profile in plain float32 Keras with default settings
  (the baseline), in the pipeline's recipe (params.yaml's mixed_precision and jit_compile), with the
  convolution FLOPs they achieve as a share of the measured peak, and in the mixed precision this hardware
  offers (mixed_float16 on a GPU, mixed_bfloat16 on a CPU),
- inference slices/s through stages.inference.predict_probs (what evaluation, the CLI and the app use), with
  the engine params.yaml's evaluate.engine picks here (LiteRT on a CPU) against Keras' own predict.

    python -m benchmarks.training [--steps 20] [--profile cpu]
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np


def matmul_peak_gflops(tf, n: int = 2048, repeats: int = 5) -> float:
    a = tf.random.uniform((n, n), dtype=tf.float32)
    b = tf.random.uniform((n, n), dtype=tf.float32)
    tf.linalg.matmul(a, b).numpy()
    best = min(_time(lambda: tf.linalg.matmul(a, b).numpy()) for _ in range(repeats))
    return 2 * n ** 3 / best / 1e9


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def conv_flops(model) -> float:
    """Multiply-adds x2 of every convolution in one forward pass of one slice."""
    import keras

    total = 0.0
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.Conv2DTranspose)):
            kh, kw, cin, cout = layer.kernel.shape
            if isinstance(layer, keras.layers.Conv2DTranspose):
                h, w = layer.input.shape[1:3]
            else:
                h, w = layer.output.shape[1:3]
            total += 2.0 * h * w * kh * kw * cin * cout
    return total


def train_rate(name, cfg, steps: int, policy: str, jit) -> tuple[float, float]:
    """(slices/s, forward GFLOP per slice) over `steps` training steps on random data."""
    import keras
    import tensorflow as tf

    from stages.models import build_model
    from stages.train import compile_model

    keras.utils.set_random_seed(0)
    keras.mixed_precision.set_global_policy(policy)
    size, batch = cfg["image_size"], cfg["batch_size"]
    model = compile_model(build_model(name, (size, size, 3), cfg["filters"], input_norm=cfg.get("input_norm")),
                          {**cfg, "jit_compile": jit})
    rng = np.random.default_rng(0)
    x = rng.random((batch * 4, size, size, 3), dtype=np.float32)
    y = (rng.random((batch * 4, size, size, 1)) > 0.9).astype(np.float32)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(batch).prefetch(tf.data.AUTOTUNE)
    model.fit(ds, steps_per_epoch=3, epochs=1, verbose=0)  # trace and warm up
    seconds = _time(lambda: model.fit(ds, steps_per_epoch=steps, epochs=1, verbose=0))
    keras.mixed_precision.set_global_policy("float32")
    return steps * batch / seconds, conv_flops(model) / 1e9


def inference_rate(name, cfg, engine: str, n: int = 512) -> tuple[float, float]:
    """(slices/s, seconds of the first call: tracing, or the conversion for LiteRT)."""
    import keras

    from stages.inference import predict_probs
    from stages.models import build_model

    keras.utils.set_random_seed(0)
    model = build_model(name, (cfg["image_size"],) * 2 + (3,), cfg["filters"], input_norm=cfg.get("input_norm"))
    images = np.random.default_rng(0).integers(0, 255, (n, 256, 256, 3), dtype=np.uint8)
    first = _time(lambda: predict_probs(model, images[:64], batch_size=64, engine=engine))
    return n / _time(lambda: predict_probs(model, images, batch_size=64, engine=engine)), first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--profile", default="cpu")
    args = parser.parse_args()
    import tensorflow as tf

    from stages.common import load_params, train_config

    params = load_params()
    cfg = train_config({**params, "profile": args.profile})
    name = params["model"]
    peak = matmul_peak_gflops(tf)
    policy = cfg.get("mixed_precision") or "float32"
    jit = cfg.get("jit_compile", "auto")
    # alternated and repeated, best of each, so neither setting gains from when it runs in the process
    bases, ours_runs = [], []
    for _ in range(2):
        base, gflop = train_rate(name, cfg, args.steps, "float32", False)
        bases.append(base)
        ours_runs.append(train_rate(name, cfg, args.steps, policy, jit)[0])
    base, ours = max(bases), max(ours_runs)
    # Keras' jit_compile "auto" means no XLA on a CPU-only machine: then the recipe is the plain setting
    xla = jit is True or (jit == "auto" and bool(tf.config.list_logical_devices("GPU")))
    same = policy == "float32" and not xla
    # the other precision a user of this hardware would try: float16 on a GPU, bfloat16 on a CPU
    other = "mixed_float16" if tf.config.list_logical_devices("GPU") else "mixed_bfloat16"
    mixed = train_rate(name, cfg, args.steps, other, jit)[0] if other != policy else None
    from stages.inference import pick_engine
    from stages.models import build_model

    engine = pick_engine(build_model(name, (cfg["image_size"],) * 2 + (3,), cfg["filters"],
                                     input_norm=cfg.get("input_norm")),
                         params["evaluate"].get("engine", "auto"))
    infer_keras, first_keras = inference_rate(name, cfg, "keras")
    infer, first = inference_rate(name, cfg, engine)
    achieved = lambda rate: 3 * gflop * rate  # training ~ 3 forward passes of FLOPs  # noqa: E731
    print(f"\nmachine: {os.cpu_count()} cores; model {name}, {cfg['image_size']} px, filters {cfg['filters']}, "
          f"batch {cfg['batch_size']}; {gflop:.2f} conv GFLOP per slice forward")
    print(f"matmul peak (float32, 2048^3)        {peak:8.1f} GFLOP/s")
    print(f"train, plain float32 Keras defaults  {base:8.1f} slices/s  ({achieved(base):6.1f} GFLOP/s, "
          f"{achieved(base) / peak:5.1%} of peak)")
    print(f"train, recipe (policy {policy}, jit {jit})  {ours:8.1f} slices/s  ({achieved(ours):6.1f} GFLOP/s, "
          f"{achieved(ours) / peak:5.1%} of peak)   speed-up {ours / base:.2f}x (target >= 1.5x, >= 60% of peak)")
    print(f"  (each best of 2, alternated: plain {', '.join(f'{r:.1f}' for r in bases)}; recipe "
          f"{', '.join(f'{r:.1f}' for r in ours_runs)})"
          + ("; the recipe's settings are the plain ones here, so any speed-up is this machine's noise" if same else ""))
    if mixed is not None:
        print(f"train, {other} (jit {jit})  {mixed:8.1f} slices/s  ({mixed / base:.2f}x plain float32)")
    print(f"inference, Keras predict (256->{cfg['image_size']} px)  {infer_keras:8.1f} slices/s  "
          f"(first call {first_keras:.1f} s)")
    print(f"inference, pipeline engine {engine} (256->{cfg['image_size']} px)  {infer:8.1f} slices/s  "
          f"({infer / infer_keras:.2f}x Keras; target >= 150; first call {first:.1f} s)")


if __name__ == "__main__":
    main()
