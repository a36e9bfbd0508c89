"""Benchmark: training and inference speed of the default segmenter at the CPU size.

Prints, in one run on this machine:
- the matrix-multiply peak (float32 GEMM through TensorFlow, 2048x2048, best of several),
- training slices/s of params.yaml's model at the CPU profile in plain float32 Keras with default settings
  (the baseline: the network built from stock Keras layers, TensorFlow's own runtime defaults for this CPU),
  in the pipeline's recipe (its fused batch normalisation, ConcatConv2D decoders and BilinearUpSampling2D, its
  TensorFlow settings from stages/__init__.py, params.yaml's mixed_precision and jit_compile), each in a fresh
  process, with the convolution FLOPs they achieve as a share of the measured peak, and in the mixed precision this
  hardware offers (mixed_float16 on a GPU, mixed_bfloat16 on a CPU) as a share of that precision's own matmul
  peak (bfloat16 products run on AMX tiles where the CPU has them, several times the float32 peak),
- inference slices/s through stages.inference.predict_probs (what evaluation, the CLI and the app use), with
  the engine params.yaml's evaluate.engine picks here (on a CPU LiteRT, its int8 graph for unet where the CPU has
  int8 dot products) against Keras' own predict and the float32 LiteRT graph, for one network and, where the
  profile's train.members makes the default a seed ensemble, for the ensemble as it is served, against the
  target; then the float32 LiteRT graph alone (no resizing or standardisation), with the convolution FLOPs it
  achieves as a share of the measured peak: how much of the inference time is the network's, and how close the
  network already runs to what the CPU can do.

    python -m benchmarks.training [--steps 20] [--profile cpu] [--filters N] [--repeats 2]

--filters measures the same network at another width (the profile's `filters` replaced), e.g. to see how the
share of peak grows with the channel count. --repeats: how many fresh processes each setting gets (alternated,
the best kept); more of them make the figures steadier on a machine whose speed comes and goes.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def matmul_peak_gflops(tf, n: int = 2048, repeats: int = 5, dtype: str = "float32") -> float:
    """Best GFLOP/s of an n^3 matrix product in `dtype` (bfloat16 runs on AMX tiles where the CPU has them)."""
    a = tf.cast(tf.random.uniform((n, n), dtype=tf.float32), dtype)
    b = tf.cast(tf.random.uniform((n, n), dtype=tf.float32), dtype)
    tf.linalg.matmul(a, b).numpy()
    best = min(_time(lambda: tf.linalg.matmul(a, b).numpy()) for _ in range(repeats))
    return 2 * n ** 3 / best / 1e9


ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")


def cpu_summary(cpuinfo: str | None = None) -> str:
    """The CPU model and the instruction sets that decide TensorFlow's kernels (oneDNN by default only with
    AVX512-VNNI / BF16 or AMX), since this project's machines differ from one session to the next."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return "unknown CPU"
    from stages.engines import cpu_flags

    fields = dict(line.split(":", 1) for line in cpuinfo.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = cpu_flags(cpuinfo)
    return f"{fields.get('model name', 'unknown CPU')} ({' '.join(f for f in ISA_FLAGS if f in flags) or 'no AVX2'})"


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


def step_clock():
    """A Keras callback that notes when each training batch ends. Rates are taken between the first and the last
    note, so neither the first step nor fit()'s return counts: here fit() sometimes returns 1-3 s after its last
    step (while it lets go of its tf.data iterator), which made 20-step timings snap to 62.7 slices/s."""
    import keras

    class StepClock(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.ends = []

        def on_train_batch_end(self, batch, logs=None):
            self.ends.append(time.perf_counter())

    return StepClock()


def train_rate(name, cfg, steps: int, policy: str, jit, plain_layers: bool = False) -> tuple[float, float]:
    """(slices/s, forward GFLOP per slice) over `steps` training steps on random data. `plain_layers`: the
    network as plain Keras builds it (keras.layers.BatchNormalization instead of the pipeline's fused one,
    Concatenate then Conv2D instead of its ConcatConv2D)."""
    import keras
    import tensorflow as tf

    import stages.models
    from stages.datasets import per_output
    from stages.models import build_model
    from stages.train import compile_model

    keras.utils.set_random_seed(0)
    keras.mixed_precision.set_global_policy(policy)
    size, batch = cfg["image_size"], cfg["batch_size"]
    with stages.models.plain_keras() if plain_layers else contextlib.nullcontext():
        network = build_model(name, (size, size, 3), cfg["filters"], input_norm=cfg.get("input_norm"),
                              deep_supervision=bool(cfg.get("deep_supervision")))
    model = compile_model(network, {**cfg, "jit_compile": jit})
    rng = np.random.default_rng(0)
    x = rng.random((batch * 4, size, size, 3), dtype=np.float32)
    y = (rng.random((batch * 4, size, size, 1)) > 0.9).astype(np.float32)
    ds = tf.data.Dataset.from_tensor_slices((x, per_output(y, len(model.outputs))))  # deep supervision: one each
    ds = ds.repeat().batch(batch).prefetch(tf.data.AUTOTUNE)
    model.fit(ds, steps_per_epoch=3, epochs=1, verbose=0)  # trace and warm up
    clock = step_clock()
    model.fit(ds, steps_per_epoch=steps + 1, epochs=1, verbose=0, callbacks=[clock])
    keras.mixed_precision.set_global_policy("float32")
    return steps * batch / (clock.ends[-1] - clock.ends[0]), conv_flops(model) / 1e9


def served_model(name, cfg, seeds=()):
    """The network as evaluation, the CLI and the app serve it: one, or one per seed of `seeds` (train.members)
    averaged into one model (stages.models.average). Random weights (each network's drawn with its seed): speed
    does not depend on them."""
    import keras

    from stages.models import average, build_model

    members = []
    for seed in seeds or [0]:
        keras.utils.set_random_seed(seed)
        members.append(build_model(name, (cfg["image_size"],) * 2 + (3,), cfg["filters"],
                                   input_norm=cfg.get("input_norm")))
    return average(members) if len(members) > 1 else members[0]


def inference_rate(model, engine: str, n: int = 512) -> tuple[float, float]:
    """(slices/s through stages.inference.predict_probs, 256 px uint8 slices in and out; seconds of the first
    call: tracing, or the conversion for LiteRT)."""
    from stages.inference import predict_probs

    images = np.random.default_rng(0).integers(0, 255, (n, 256, 256, 3), dtype=np.uint8)
    first = _time(lambda: predict_probs(model, images[:64], batch_size=64, engine=engine))
    return n / _time(lambda: predict_probs(model, images, batch_size=64, engine=engine)), first


def graph_rate(model, n: int = 512, batch: int = 64, repeats: int = 3) -> float:
    """Slices/s of the model's float32 LiteRT graph alone, on model-size float32 batches: the network's share of
    inference, without the resizing and standardisation around it (best of `repeats`)."""
    from stages.engines import LiteRTRunner
    from stages.preprocess import input_size

    size = input_size(model)
    x = np.random.default_rng(0).random((batch, size, size, 3), dtype=np.float32)
    run = LiteRTRunner(model)
    run(x)
    return n / min(_time(lambda: [run(x) for _ in range(n // batch)]) for _ in range(repeats))


def profile_config(params: dict, profile: str, filters: int | None) -> dict:
    from stages.common import train_config

    cfg = train_config({**params, "profile": profile})
    return {**cfg, "filters": filters} if filters else cfg


def child(setting: str, steps: int, profile: str, policy: str | None, filters: int | None = None) -> dict:
    """One training measurement in this (fresh) process: TensorFlow reads its runtime options once, at import.

    plain: TensorFlow imported before anything of brainseg, with TF_ENABLE_ONEDNN_OPTS unset, so it runs with
    its own defaults for this CPU (oneDNN only on CPUs with AVX512-VNNI / BF16 or AMX); recipe: imported the way
    the pipeline does (stages/__init__.py turns oneDNN on unless the user set the variable)."""
    if setting == "plain":
        os.environ.pop("TF_ENABLE_ONEDNN_OPTS", None)
        import tensorflow as tf
    else:
        import stages  # noqa: F401
        import tensorflow as tf
    from tensorflow.python.util import _pywrap_util_port

    from stages.common import load_params

    params = load_params()
    cfg = profile_config(params, profile, filters)
    policy = policy or ("float32" if setting == "plain" else cfg.get("mixed_precision") or "float32")
    jit = False if setting == "plain" else cfg.get("jit_compile", "auto")
    rate, gflop = train_rate(params["model"], cfg, steps, policy, jit, plain_layers=setting == "plain")
    import keras

    compute = keras.mixed_precision.Policy(policy).compute_dtype
    peak = matmul_peak_gflops(tf)
    return {"rate": rate, "gflop": gflop, "peak": peak, "compute_dtype": compute,
            "peak_compute": peak if compute == "float32" else matmul_peak_gflops(tf, dtype=compute),
            "policy": policy, "jit": jit,
            "onednn": bool(_pywrap_util_port.IsMklEnabled()),
            "gpu": bool(tf.config.list_logical_devices("GPU"))}


def child_command(setting: str, args, policy: str | None = None) -> list[str]:
    """The fresh process that measures one setting, with every option that shapes the network passed on."""
    command = [sys.executable, "-m", "benchmarks.training", "--child", setting, "--steps", str(args.steps),
               "--profile", args.profile]
    if policy:
        command += ["--policy", policy]
    if args.filters:
        command += ["--filters", str(args.filters)]
    return command


def measure(setting: str, args, policy: str | None = None) -> dict:
    out = subprocess.run(child_command(setting, args, policy), capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--filters", type=int, help="the network's width instead of the profile's")
    parser.add_argument("--repeats", type=int, default=2, help="fresh processes per setting, the best kept")
    parser.add_argument("--child", choices=["plain", "recipe"], help=argparse.SUPPRESS)
    parser.add_argument("--policy", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.profile, args.policy, args.filters)))
        return
    # alternated and repeated, each in a fresh process, best of each, so neither gains from when it runs
    runs = {"plain": [], "recipe": []}
    for _ in range(max(args.repeats, 1)):
        for setting in runs:
            runs[setting].append(measure(setting, args))
    plain, recipe = (max(runs[s], key=lambda r: r["rate"]) for s in runs)
    base, ours, gflop = plain["rate"], recipe["rate"], plain["gflop"]
    # the machine's peak is the best GEMM either setting reached (oneDNN's and Eigen's matmul differ)
    peak = max(r["peak"] for rs in runs.values() for r in rs)
    policy, jit = recipe["policy"], recipe["jit"]
    # the other precision a user of this hardware would try: float16 on a GPU, bfloat16 on a CPU
    other = "mixed_float16" if recipe["gpu"] else "mixed_bfloat16"
    mixed = None
    if other != policy:
        mixed_runs = [measure("recipe", args, other) for _ in range(max(args.repeats, 1))]
        mixed = max(mixed_runs, key=lambda r: r["rate"])
        mixed_peak = max(r["peak_compute"] for r in mixed_runs)

    import stages  # noqa: F401  the pipeline's TensorFlow settings for the inference measured here
    from stages.common import load_params
    from stages.engines import pick_engine

    params = load_params()
    cfg = profile_config(params, args.profile, args.filters)
    name = params["model"]
    one = served_model(name, cfg)
    engine = pick_engine(one, params["evaluate"].get("engine", "auto"))
    infer_keras, first_keras = inference_rate(one, "keras")
    infer_float, first_float = inference_rate(one, "litert") if engine != "litert" else (None, None)
    infer, first = inference_rate(one, engine)
    seeds = cfg.get("members") or []
    if seeds:  # the default serves a seed ensemble: what it costs is the inference figure that counts
        served = served_model(name, cfg, seeds)
        served_engine = pick_engine(served, params["evaluate"].get("engine", "auto"))
        infer_served, first_served = inference_rate(served, served_engine)
    graph = graph_rate(served if seeds else one)
    achieved = lambda rate: 3 * gflop * rate  # training ~ 3 forward passes of FLOPs  # noqa: E731
    print(f"\nmachine: {os.cpu_count()} cores, {cpu_summary()}; model {name}, {cfg['image_size']} px, "
          f"filters {cfg['filters']}, batch {cfg['batch_size']}; {gflop:.2f} conv GFLOP per slice forward")
    peaks = ", ".join(f"{r['peak']:.1f}" for rs in runs.values() for r in rs)
    rates = {s: ", ".join(f"{r['rate']:.1f}" for r in runs[s]) for s in runs}
    print(f"matmul peak (float32, 2048^3)        {peak:8.1f} GFLOP/s  (best of both settings' processes: "
          f"{peaks})")
    print(f"train, plain float32 Keras defaults (oneDNN {'on' if plain['onednn'] else 'off'})  {base:8.1f} slices/s  "
          f"({achieved(base):6.1f} GFLOP/s, {achieved(base) / peak:5.1%} of peak)")
    print(f"train, recipe (oneDNN {'on' if recipe['onednn'] else 'off'}, policy {policy}, jit {jit})  {ours:8.1f} "
          f"slices/s  ({achieved(ours):6.1f} GFLOP/s, {achieved(ours) / peak:5.1%} of peak)   speed-up "
          f"{ours / base:.2f}x (target >= 1.5x, >= 60% of peak)")
    print(f"  (each best of {len(runs['plain'])}, alternated, a fresh process each: plain {rates['plain']}; "
          f"recipe {rates['recipe']})")
    if mixed is not None:
        rate, dtype = mixed["rate"], mixed["compute_dtype"]
        print(f"train, {other} (jit {jit})  {rate:8.1f} slices/s  ({achieved(rate):6.1f} GFLOP/s, "
              f"{achieved(rate) / mixed_peak:5.1%} of the {mixed_peak:.1f} GFLOP/s {dtype} matmul peak; "
              f"{rate / base:.2f}x plain float32)")
    one_net = "one network, " if seeds else ""
    print(f"inference, {one_net}Keras predict (256->{cfg['image_size']} px)  {infer_keras:8.1f} slices/s  "
          f"(first call {first_keras:.1f} s)")
    if infer_float is not None:
        print(f"inference, {one_net}LiteRT float32 (256->{cfg['image_size']} px)  {infer_float:8.1f} slices/s  "
              f"({infer_float / infer_keras:.2f}x Keras; first call {first_float:.1f} s)")
    target = "" if seeds else "target >= 150; "
    print(f"inference, {one_net}pipeline engine {engine} (256->{cfg['image_size']} px)  {infer:8.1f} slices/s  "
          f"({infer / infer_keras:.2f}x Keras; {target}first call {first:.1f} s)")
    if seeds:
        print(f"inference, the default's {len(seeds)} networks averaged (train.members {seeds}), pipeline engine "
              f"{served_engine}  {infer_served:8.1f} slices/s  (target >= 150; first call {first_served:.1f} s; every "
              f"member on every slice: evaluate.cascade's saving depends on real slices, python -m benchmarks.cascade)")
    networks = len(seeds) or 1
    flops = gflop * networks * graph
    print(f"  {'their' if seeds else 'its'} float32 LiteRT graph alone (model-size input, no resizing or "
          f"standardisation)  {graph:8.1f} slices/s  ({flops:6.1f} GFLOP/s, {flops / peak:5.1%} of the matmul peak)")


if __name__ == "__main__":
    main()
