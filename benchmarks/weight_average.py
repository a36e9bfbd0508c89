"""Weight averaging over a run's last epochs (stochastic weight averaging) against its best epoch, on validation.

    dvc repro balance        # the split and the prepared data the run trains on
    python -m benchmarks.weight_average --workdir runs/wa-s42 --seed 42 [--last 3 --last 5 --last 8]

Trains params.yaml's recipe as `stages.train` does, keeping every epoch's weights in --workdir, then scores on
the validation patients, with every post-processing step evaluation compares: the best epoch (what the pipeline
keeps), the last epoch, and the mean of the last k epochs' weights for each --last k, its batch-norm statistics
recomputed over one pass of the training batches (the averaged weights would not match the running statistics of
any one epoch; --last k without it is also scored, `k-nobn`). The validation loss of each is printed too, so one
can see what a rule choosing by it would keep. Validation patients only: nothing here looks at the test patients.
A finished --workdir is scored again without training.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import keras
import numpy as np


def average_weights(epochs: list[list[np.ndarray]]) -> list[np.ndarray]:
    """The element-wise mean of several epochs' weight lists (model.get_weights() order)."""
    return [np.mean(arrays, axis=0).astype(arrays[0].dtype) for arrays in zip(*epochs)]


def recompute_batch_norm(model: keras.Model, batches) -> int:
    """Each BatchNormalization layer's moving mean and variance set to the average of its batch statistics over
    `batches` (inputs, or (inputs, targets) pairs), weights untouched; returns the number of batches."""
    from stages.preprocess import all_layers

    layers = [layer for layer in all_layers(model) if isinstance(layer, keras.layers.BatchNormalization)]
    momenta = [layer.momentum for layer in layers]
    count = 0
    try:
        for count, batch in enumerate(batches, start=1):
            for layer in layers:  # moving = moving * m + batch * (1 - m): with m = (t-1)/t, the running mean
                layer.momentum = (count - 1) / count
            model(batch[0] if isinstance(batch, (tuple, list)) else batch, training=True)
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
    return count


def train_saving_epochs(workdir: Path, seed: int) -> dict:
    """stages.train.train with every epoch's weights saved as workdir/eNN.weights.h5; the best epoch as
    workdir/best.keras and the summary as workdir/train.json."""
    from stages import train
    from stages.common import load_params, train_config

    class SaveEpoch(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):  # the served network's weights: best.keras has no auxiliary heads
            train.served(self.model).save_weights(str(workdir / f"e{epoch + 1:02d}.weights.h5"))

    made = train.fit_callbacks
    # first, so it saves each epoch's own weights: early stopping puts the best epoch's back at the last epoch's end
    def saving(cfg, checkpoint, live=None, volume_dice=None):
        return [SaveEpoch(), *made(cfg, checkpoint, live, volume_dice)]

    train.fit_callbacks = saving
    try:
        params = load_params()
        summary = train.train(params["model"], train_config(params), seed, train.DATA, workdir / "best.keras", None)
    finally:
        train.fit_callbacks = made
    (workdir / "train.json").write_text(json.dumps({**summary, "seed": seed}, indent=1))
    return summary


def variants(summary: dict, lasts: list[int]) -> dict[str, tuple[list[int], bool]]:
    """name -> (epochs averaged, batch-norm statistics recomputed)."""
    epochs, best = summary["epochs"], summary["best_epoch"]
    out = {"best epoch": ([best], False), "last epoch": ([epochs], False)}
    for k in lasts:
        window = list(range(max(1, epochs - k + 1), epochs + 1))
        out[f"last {k}"] = (window, True)
        out[f"last {k}-nobn"] = (window, False)
    return out


def score(workdir: Path, lasts: list[int]) -> list[dict]:
    from stages import datasets, evaluate, inference, prepared, train
    from stages.common import load_params, train_config

    params = load_params()
    cfg = train_config(params)
    summary = json.loads((workdir / "train.json").read_text())
    train_ds, val_ds, _ = datasets.make_datasets(train.DATA, cfg["image_size"], cfg["batch_size"], False, False, 0,
                                                 1, None, cfg.get("input_norm"), bool(cfg.get("slice_position")),
                                                 int(cfg.get("neighbours") or 0))
    chosen_variants = variants(summary, lasts)
    reader = inference.load_model(workdir / "best.keras")
    saved = {}  # each epoch's weights read once, however many variants average it
    for epoch in sorted({e for epochs, _ in chosen_variants.values() for e in epochs}):
        reader.load_weights(str(workdir / f"e{epoch:02d}.weights.h5"))
        saved[epoch] = reader.get_weights()
    rows = []
    for name, (epochs, batch_norm) in chosen_variants.items():
        # a new model object each time: the LiteRT engine converts a model once, from its weights at that moment
        model = inference.load_model(workdir / "best.keras")
        model.set_weights(average_weights([saved[epoch] for epoch in epochs]))
        if batch_norm:
            recompute_batch_norm(model, train_ds)
        train.compile_model(model, cfg)
        val_loss = float(model.evaluate(val_ds, verbose=0, return_dict=True)["loss"])
        validation = evaluate.evaluate_model(model, *prepared.originals(train.DATA, "val"), params["evaluate"],
                                             progress=False)
        chosen, _ = evaluate.choose_postprocess(validation, params["evaluate"])
        compare = {k: v["dice_volume_mean"] for k, v in validation.metrics["postprocess_compare"].items()}
        rows.append({"weights": name, "epochs": f"{epochs[0]}-{epochs[-1]}" if len(epochs) > 1 else str(epochs[0]),
                     "val_loss": val_loss, **compare, "chosen": chosen, "chosen Dice": compare[chosen]})
        print(f"{name}: val_loss {val_loss:.4f}, chosen {chosen} {compare[chosen]:.3f}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    import pandas as pd

    from benchmarks.crossval import markdown

    parser = argparse.ArgumentParser(prog="python -m benchmarks.weight_average", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--last", type=int, action="append", help="average the last k epochs (repeatable)")
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    if not (args.workdir / "train.json").is_file():
        train_saving_epochs(args.workdir, args.seed)
    rows = score(args.workdir, args.last or [3, 5, 8])
    summary = json.loads((args.workdir / "train.json").read_text())
    print(f"\nseed {summary.get('seed')}: {summary['epochs']} epochs, best {summary['best_epoch']}; validation "
          f"patients, per-volume Dice under each post-processing step")
    print(markdown(pd.DataFrame(rows)))
    (args.workdir / "weight_average.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
