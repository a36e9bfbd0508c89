"""Benchmark: what quantising the LiteRT graph does to a trained segmenter's speed and Dice on a CPU.

Each graph scores the model the way the evaluate stage does, in the same run: the validation patients with every
post-processing of postprocess_compare, the one best there chosen, then the test patients once with it (printed for
the record; nothing is chosen on them). Graphs:
- litert: float32;
- dynamic_int8 (this benchmark only): LiteRT's dynamic-range quantisation, int8 weights (those of 1024 values or
  more) and each slice's activations quantised as it runs;
- litert_int8: the engine of that name (what `evaluate.engine: auto` takes for unet on a CPU with int8 dot
  products), weights and activations int8, the activations' ranges fixed on the built-in synthetic volumes
  (stages.engines.calibration_inputs);
- train_int8 (this benchmark only): the same with the ranges fixed on --calibration original slices of each
  training patient instead, to show whether synthetic slices cost anything.

For each: the network alone (model-size float32 batches of --batch validation slices, best of --repeats), and
evaluation's own slices/s (the plain prediction with its preprocessing: per-volume standardisation, resizing to
the model's size and back), against the 150 slices/s target of issue 6. Also how far each quantised graph's
probabilities lie from float32's on those validation slices, and how many pixels change side of the threshold.

    python -m benchmarks.quantisation [--model models/model.keras] [--data data]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

GRAPHS = ("litert", "dynamic_int8", "litert_int8", "train_int8")


def calibration_inputs(model, data: Path, per_patient: int, seed: int = 0) -> np.ndarray:
    """Up to `per_patient` original slices of each training patient, drawn at random, as the network takes
    them (stages.preprocess.network_input, then the model's input size, float32 0-1)."""
    from stages import prepared, preprocess

    images, _, table = prepared.originals(data, "train")
    rng = np.random.default_rng(seed)
    out = []
    for _, rows in table.groupby("patient", sort=False).groups.items():
        volume = np.asarray(images[np.asarray(rows)])
        volume = preprocess.network_input(model, volume, np.zeros(len(volume)))
        pick = np.sort(rng.choice(len(volume), min(per_patient, len(volume)), replace=False))
        out.append(preprocess.to_model_input(volume[pick], preprocess.input_size(model) or volume.shape[1]))
    return np.concatenate(out)


def dynamic_int8(model) -> bytes:
    """`model` as a LiteRT graph with dynamic-range quantisation (no representative data set)."""
    import contextlib
    import io

    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    with contextlib.redirect_stdout(io.StringIO()):  # as engines.convert: Keras' export prints every variable
        return converter.convert()


def network_rate(run, x: np.ndarray, repeats: int) -> float:
    """Slices/s of a runner on one batch, best of `repeats` after a warm-up call."""
    run(x)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run(x)
        best = min(best, time.perf_counter() - start)
    return len(x) / best


def score(model, data: Path, settings: dict) -> dict:
    """The evaluate stage's choice and scores: validation with every post-processing, the best applied to test."""
    from stages import evaluate, prepared

    validation = evaluate.evaluate_model(model, *prepared.originals(data, "val"), settings, progress=False)
    chosen, applied = evaluate.choose_postprocess(validation, settings)
    test = evaluate.evaluate_model(model, *prepared.originals(data, "test"), applied, progress=False)
    worst = test.per_patient.sort_values("dice").iloc[0]
    compare = validation.metrics["postprocess_compare"]
    return {"val_threshold": compare["threshold"]["dice_volume_mean"], "chosen": chosen,
            "val_chosen": compare[chosen]["dice_volume_mean"], "test": test.metrics["dice_volume_mean"],
            "test_median": test.metrics["dice_volume_median"], "worst": f"{worst['patient']} {worst['dice']:.3f}",
            "rate": validation.metrics["model"]["slices_per_second"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("models/model.keras"))
    parser.add_argument("--data", type=Path, default=Path("data"), help="folder of prepared/ and slices/")
    parser.add_argument("--calibration", type=int, default=8, help="slices per training patient (train_int8)")
    parser.add_argument("--batch", type=int, default=32, help="slices per batch for the network's own rate")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    import os

    from stages import engines, inference, prepared, preprocess
    from stages.common import BrainsegError, load_params

    params = load_params()
    model = inference.load_model(args.model)
    if inference.model_kind(model) != "segmenter":
        raise BrainsegError(f"{args.model}: a classifier; this benchmark scores segmenters")
    settings = {**params["evaluate"], "choose_on_validation": True}

    images, _, table = prepared.originals(args.data, "val")
    rows = table.index.to_numpy()[:args.batch]
    x = preprocess.network_input(model, np.asarray(images[rows]), table.loc[rows, "patient"].to_numpy())
    x = preprocess.to_model_input(x, preprocess.input_size(model) or x.shape[1])
    calibration = calibration_inputs(model, args.data, args.calibration)

    # each graph gets its own copy of the model: LiteRT graphs are kept per model object (engines._LITERT),
    # which is also where the graphs no engine names are put, in the float32 one's place
    graphs = {"dynamic_int8": dynamic_int8, "train_int8": lambda m: engines.convert(m, True, calibration)}
    runs, probs = {}, {}
    for name in GRAPHS:
        m = inference.load_model(args.model)
        engine = name if name in engines.LITERT_ENGINES else "litert"
        if name in graphs:
            engines._LITERT[m] = {"litert": engines.LiteRTRunner.from_graph(graphs[name](m))}
        run = engines.runner(m, engine)
        runs[name] = {"network": network_rate(run, x, args.repeats), **score(m, args.data, {**settings,
                                                                                         "engine": engine})}
        probs[name] = run(x)

    print(f"\nmodel {args.model} ({model.name}, {preprocess.input_size(model)} px); {os.cpu_count()} cores; "
          f"train_int8 calibrated on {len(calibration)} training slices, litert_int8 on "
          f"{len(engines.calibration_inputs(model))} synthetic ones; the network on {len(x)} validation "
          f"slices a batch")
    print(f"{'graph':12s} {'network/s':>9s} {'eval/s':>7s}  {'val thr':>7s} {'val chosen':>10s} {'chosen':11s} "
          f"{'test':>6s} {'median':>6s}  worst test patient")
    for name, r in runs.items():
        print(f"{name:12s} {r['network']:9.1f} {r['rate']:7.1f}  {r['val_threshold']:7.4f} {r['val_chosen']:10.4f} "
              f"{r['chosen']:11s} {r['test']:6.4f} {r['test_median']:6.4f}  {r['worst']}")
    base = runs["litert"]
    for name in GRAPHS[1:]:
        r, d = runs[name], np.abs(probs[name] - probs["litert"])
        flipped = np.mean((probs[name] > 0.5) != (probs["litert"] > 0.5))
        print(f"{name} against float32: network {r['network'] / base['network']:.2f}x, evaluation "
              f"{r['rate'] / base['rate']:.2f}x ({r['rate']:.1f} slices/s, target >= 150); validation chosen "
              f"{r['val_chosen'] - base['val_chosen']:+.4f}, test {r['test'] - base['test']:+.4f}; probabilities "
              f"differ by {d.mean():.5f} on average (max {d.max():.3f}), {flipped:.4%} of pixels change side of 0.5")


if __name__ == "__main__":
    main()
