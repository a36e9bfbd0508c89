"""DVC stage `train`: fit params.yaml's `model` on data/prepared and keep the best epoch.

Outputs: models/selection.keras (the epoch validation chose: lowest val loss, or with train.monitor
val_dice_volume the best per-volume Dice of the validation patients), models/model.keras (the same model; with
train.refit, the recipe trained again on the training and validation patients for that many epochs), each replaced
atomically, metrics/train.json (with a `refit` section after a refit), and DVCLive per-epoch curves of the first run
in dvclive/train/plots/metrics/{train,eval}/<metric>.tsv, and each validation patient's Dice per epoch in
dvclive/train/val_dice_volume.csv (segmenters). With train.members both models are the members' average
(a seed ensemble) and metrics/train.json lists each member's facts under `members`; with train.distil as well, both
are one network (the student) trained on a mix of the masks and the ensemble's probability maps.

The batches come from stages.datasets (stages.augment's online transforms among them), the callbacks that pick
the saved epoch, stop early and log the curves from stages.callbacks.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import keras
import numpy as np

from stages import prepared
from stages.callbacks import MONITORS, TimeLimit, TrainTimer, VolumeDice, fit_callbacks, monitor, plain_names
from stages.common import (BrainsegError, load_params, member_seeds, profile_overrides, run_main, train_config,
                           training_seeds, write_csv, write_json)
from stages.datasets import make_datasets, slices_per_epoch, steps_per_epoch
from stages.losses import get_loss, segmentation_metrics
from stages.models import CLASSIFIERS, average, build_model

if TYPE_CHECKING:  # TensorFlow is imported where used: JAX / PyTorch machines may not have it
    import tensorflow as tf

DATA = Path("data")  # data/prepared's tables and the data/slices they point into
MODEL = Path("models/model.keras")  # the model evaluated on test and served: with train.refit, the refit
SELECTION = Path("models/selection.keras")  # the one validation chose the epochs and post-processing with
LIVE = Path("dvclive/train")
METRICS = Path("metrics/train.json")
SOURCE = Path("data/raw/SOURCE.json")


def main() -> None:
    params = load_params()
    cfg = train_config(params)
    for key, (train_value, value) in profile_overrides(params).items():
        print(f"profile {cfg['profile']}: {key} {value} (profiles.{cfg['profile']}.{key}) in place of train.{key} "
              f"{train_value}", flush=True)
    seed = training_seeds(params)[0]  # one network's (train.seed, else the top-level seed); an ensemble's first
    live = LIVE
    if importlib.util.find_spec("dvclive") is None:  # a GPU machine with Keras alone (benchmarks/gpu_recipe.py)
        print("dvclive is not installed: training without per-epoch curves in dvclive/train", flush=True)
        live = None
    members = member_seeds(cfg)
    distil = distil_weight(cfg, members)
    if distil:
        summary = train_student(params["model"], cfg, members, distil, DATA, SELECTION, live)
    elif members:
        summary = train_members(params["model"], cfg, members, DATA, SELECTION, live)
    else:
        summary = train(params["model"], cfg, seed, DATA, SELECTION, live)
    rates = summary.pop("learning_rates", None)
    if cfg.get("refit"):
        print(f"refit: training again on the training and validation patients for the {summary['best_epoch']} "
              "epochs validation chose", flush=True)
        summary["refit"] = refit(params["model"], cfg, seed, summary["best_epoch"], rates, DATA, MODEL)
    else:  # the model validation chose is the one served
        with checkpoint_path(MODEL) as checkpoint:
            shutil.copyfile(SELECTION, checkpoint)
    summary["seed"] = members or seed
    summary["data_source"] = json.loads(SOURCE.read_text()) if SOURCE.is_file() else "unknown"
    write_json(METRICS, summary)


def learning_rate(cfg: dict, steps_per_epoch: int):
    schedule = cfg.get("lr_schedule", "constant")
    if schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(cfg["learning_rate"], max(cfg["epochs"] * steps_per_epoch, 1))
    if schedule in ("plateau", "constant"):  # plateau: ReduceLROnPlateau lowers it, see callbacks.fit_callbacks()
        return cfg["learning_rate"]
    raise BrainsegError(f"params.yaml: train.lr_schedule '{schedule}' is not plateau, cosine or constant")


def compile_model(model: keras.Model, cfg: dict, steps_per_epoch: int = 1) -> keras.Model:
    """Adam, or AdamW with `weight_decay` on the kernels (not on biases or normalisation scales and offsets),
    keeping an exponential moving average of the weights when `ema` is a momentum, + the configured loss.
    Classifiers: binary cross-entropy, accuracy and AUC.
    doubleunet: the same loss on both outputs (summed), metrics on mask2, the prediction. Deep supervision
    (outputs aux_4, aux_2, mask): the same loss on each, an auxiliary output weighing 1 / its downsampling
    (nnU-Net's halving per level), metrics on the mask."""
    name = cfg.get("optimizer", "adam")
    if name not in ("adam", "adamw"):
        raise BrainsegError(f"params.yaml: train.optimizer '{name}' is not supported; use adam or adamw")
    if model.name in CLASSIFIERS:
        loss = keras.losses.BinaryCrossentropy()
        metrics = [keras.metrics.BinaryAccuracy(name="accuracy"), keras.metrics.AUC(name="auc")]
    else:
        loss, metrics = get_loss(cfg), segmentation_metrics()
    weights = None
    if len(model.outputs) > 1:
        loss, metrics = [loss] * len(model.outputs), [[]] * (len(model.outputs) - 1) + [metrics]
        weights = [1 / int(name[4:]) if name.startswith("aux_") else 1.0 for name in model.output_names]
    ema = cfg.get("ema")
    settings = dict(learning_rate=learning_rate(cfg, steps_per_epoch), use_ema=bool(ema),
                    ema_momentum=float(ema or 0.99))
    if name == "adamw":
        optimizer = keras.optimizers.AdamW(weight_decay=float(cfg["weight_decay"]), **settings)
        optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    else:
        optimizer = keras.optimizers.Adam(**settings)
    model.compile(optimizer=optimizer, loss=loss, loss_weights=weights,
                  metrics=metrics, jit_compile=cfg.get("jit_compile", "auto"))
    return model


def build_state(model: keras.Model, dataset) -> None:
    """The optimizer's slots and the metrics' and losses' state, made from `dataset`'s element spec before fit.

    Keras on TensorFlow without a strategy of its own leaves them to the first trace of the train step, and
    TensorFlow traces a step that made variables a second time: about 3-4 s more per fit on 2 cores (the same
    weights either way). This is what Keras' fit does first under a distribution strategy, by a method of its own
    (private: a Keras without it only costs the second trace)."""
    build_all = getattr(model, "_symbolic_build", None)
    if keras.backend.backend() == "tensorflow" and hasattr(dataset, "element_spec") and build_all is not None:
        build_all(data_batch=dataset.element_spec)


def strategy_scope(strategy=None):
    """The distribution strategy's scope on TensorFlow; other backends place the model themselves."""
    if keras.backend.backend() != "tensorflow":
        return contextlib.nullcontext()
    return (strategy or distribution_strategy()).scope()


def distribution_strategy() -> tf.distribute.Strategy:
    """MirroredStrategy over all GPUs when there are several, else the default (single device) strategy."""
    import tensorflow as tf

    if len(tf.config.list_logical_devices("GPU")) > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def build(name: str, cfg: dict, seed: int, data_dir: Path, splits: tuple = ("train", "val"),
          strategy: tf.distribute.Strategy | None = None, teacher=None):
    """(compiled model, *datasets of `splits`, training slice count) under the config's precision policy;
    `teacher`: the model whose outputs join the training targets (train.distil)."""
    keras.utils.set_random_seed(seed)
    size, batch = cfg["image_size"], cfg["batch_size"]
    previous_policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(cfg.get("mixed_precision") or "float32")
    try:
        with strategy_scope(strategy):
            model = build_model(name, (size, size, 3), cfg["filters"], cfg.get("weights"), cfg.get("input_norm"),
                                bool(cfg.get("slice_position")), int(cfg.get("neighbours") or 0),
                                bool(cfg.get("deep_supervision")), float(cfg.get("bn_momentum", 0.99)),
                                dropout=float(cfg.get("dropout") or 0), attention=bool(cfg.get("attention")),
                                norm=cfg.get("norm") or "batch")
            *datasets, n_train = make_datasets(Path(data_dir), size, batch, name in CLASSIFIERS,
                                               cfg.get("tumour_slices_only", False), seed, len(model.outputs),
                                               cfg.get("augment"), cfg.get("input_norm"),
                                               bool(cfg.get("slice_position")), int(cfg.get("neighbours") or 0),
                                               splits, teacher, float(cfg.get("distil") or 0))
            compile_model(model, cfg, steps_per_epoch(datasets[0], n_train, batch))
            build_state(model, datasets[0])
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)
    return model, *datasets, n_train


def train(name: str, cfg: dict, seed: int = 42, data_dir: Path = DATA, model_path: Path = MODEL,
          live_dir: Path | None = LIVE, strategy: tf.distribute.Strategy | None = None, teacher=None,
          train_split: str = "train") -> dict:
    """Fit `name` with the merged train/profile config `cfg` on the prepared table `train_split`; save the best epoch
    to `model_path` and return the summary written to metrics/train.json, with `learning_rates`, each epoch's (None
    where the schedule does not log them), for a refit to replay. `live_dir=None` turns DVCLive off. `teacher`:
    train.distil's ensemble, whose outputs join the training targets."""
    watch = monitor(cfg, name)
    model, train_ds, val_ds, n_train = build(name, cfg, seed, data_dir, (train_split, "val"), strategy, teacher)
    volume_dice = None
    if name not in CLASSIFIERS:
        patients = prepared.read_table(Path(data_dir), "val")[0]["patient"].to_numpy()
        volume_dice = VolumeDice.of(val_ds, patients, cfg["batch_size"])
    live = None
    if live_dir is not None:
        from dvclive import Live
        live = Live(dir=str(live_dir), dvcyaml=None, save_dvc_exp=False, report=None)
    timer = TrainTimer()
    limit = [TimeLimit(cfg["max_minutes"])] if cfg.get("max_minutes") else []
    # ModelCheckpoint writes into a private folder; only a finished run renames its file onto model_path.
    with checkpoint_path(model_path) as checkpoint:
        start = time.perf_counter()
        history = model.fit(train_ds, validation_data=val_ds, epochs=cfg["epochs"],
                            callbacks=[*fit_callbacks(cfg, checkpoint, live, volume_dice), timer, *limit],
                            shuffle=False,
                            verbose=1 if sys.stdout.isatty() else 2).history
        seconds = time.perf_counter() - start
        if not checkpoint.is_file():
            raise BrainsegError(f"{name} never reached a finite {watch}, so {model_path} was not written: "
                                "lower train.learning_rate in params.yaml and rerun `dvc repro train`")
        if served(model) is not model:  # deep supervision: the checkpoint keeps its mask head alone
            served(keras.models.load_model(checkpoint, safe_mode=True)).save(checkpoint)
    summary = summarize(name, cfg, model, history, n_train, seconds, timer.seconds,
                        slices_per_epoch(train_ds, n_train), watch)
    summary["time_limited"] = any(callback.stopped for callback in limit)  # the epochs ended by max_minutes
    if live_dir is not None:
        per_epoch = Path(live_dir) / "val_dice_volume.csv"
        if volume_dice is not None:
            write_csv(per_epoch, volume_dice.table())
        else:
            per_epoch.unlink(missing_ok=True)  # a classifier's run: no segmentation to score
    rates = history.get("learning_rate")
    summary["learning_rates"] = None if rates is None else [float(rate) for rate in rates]
    return summary


def budget_share(cfg: dict, started: float, trainings_left: int) -> dict:
    """`cfg` with train.max_minutes, the whole stage's wall-clock budget since `started` (time.perf_counter), cut
    to an even share of what is left of it for each of the `trainings_left`: a member that ends early (early
    stopping, a fast machine) leaves its minutes to the next. Unchanged without a budget."""
    if not cfg.get("max_minutes"):
        return cfg
    left = 60.0 * cfg["max_minutes"] - (time.perf_counter() - started)
    return {**cfg, "max_minutes": max(left / trainings_left, 1.0) / 60.0}  # spent: one epoch, as TimeLimit allows


def train_members(name: str, cfg: dict, seeds: list[int], data_dir: Path = DATA, model_path: Path = MODEL,
                  live_dir: Path | None = LIVE, strategy: tf.distribute.Strategy | None = None,
                  started: float | None = None, after: int = 0) -> dict:
    """A seed ensemble (train.members): the recipe trained once per seed, each member in a fresh Keras session
    exactly as a run with train.seed set to that seed (on its own draw of copies where balance drew one per member,
    as a run with balance.seed set to it too: prepared.member_table), and the average of their probability maps
    (stages.models.average) saved to `model_path`. DVCLive logs the first member's curves. The summary holds each
    member's under `members`; at the top the training time summed, and the mean over the members of the
    throughput and of the best epoch's validation figures (the ensemble's own are evaluate's). train.max_minutes
    is the budget of them all since `started` (default: now) and of `after` trainings that follow (budget_share)."""
    started = time.perf_counter() if started is None else started
    summaries = []
    with checkpoint_path(model_path) as checkpoint:  # the members are kept beside it until the average is saved
        for i, seed in enumerate(seeds):
            print(f"train.members: member {i + 1} of {len(seeds)}, seed {seed}", flush=True)
            keras.backend.clear_session()  # as a run of its own: Keras' global state starts empty
            share = budget_share(cfg, started, len(seeds) - i + after)
            summary = train(name, share, seed, data_dir, checkpoint.with_name(f"member_{seed}.keras"),
                            live_dir if i == 0 else None, strategy, train_split=prepared.member_table(data_dir, seed))
            summary.pop("learning_rates")
            summaries.append({"seed": seed, **summary})
        ensemble = average([keras.models.load_model(checkpoint.with_name(f"member_{seed}.keras"), safe_mode=True,
                                                    compile=False) for seed in seeds])
        ensemble.save(checkpoint)
    first = summaries[0]
    summary = {**{key: first[key] for key in ("model", "profile", "image_size", "batch_size", "filters",
                                              "train_slices")},
               "params": ensemble.count_params(),
               "train_seconds": round(sum(s["train_seconds"] for s in summaries), 1),
               "train_slices_per_s": round(float(np.mean([s["train_slices_per_s"] for s in summaries])), 2),
               "members_time_limited": sum(bool(s.get("time_limited")) for s in summaries)}
    for key in first:
        if key.startswith("best_val_"):
            summary[key] = float(np.mean([s[key] for s in summaries]))
    summary["members"] = summaries
    return summary


def distil_weight(cfg: dict, members: list[int]) -> float:
    """train.distil, checked: 0 for no distillation, else the teacher's share of the student's targets."""
    weight = cfg.get("distil") or 0
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight <= 1:
        raise BrainsegError(f"params.yaml: train.distil {weight!r} is not a number from 0 to 1 (the teacher's share "
                            "of the student's targets); set it with `dvc exp run -S train.distil=0.5`, or 0 for none")
    if weight and not members:
        raise BrainsegError("params.yaml: train.distil needs a teacher, the seed ensemble of train.members; set "
                            "`-S 'train.members=[42,7,1]'` too, or `-S train.distil=0`")
    return float(weight)


def train_student(name: str, cfg: dict, seeds: list[int], weight: float, data_dir: Path = DATA,
                  model_path: Path = MODEL, live_dir: Path | None = LIVE,
                  strategy: tf.distribute.Strategy | None = None) -> dict:
    """Knowledge distillation (train.distil): the seed ensemble of `seeds` (train_members) is the teacher, and one
    network, the student, is trained exactly as the run of the first member's seed but on soft_targets (`weight`
    of the teacher's probability maps, the rest the masks), then saved to `model_path`: one network's inference for
    the ensemble's knowledge. DVCLive logs the student. The summary is the student's, with the members' facts under
    `members` and `train_seconds` summing the members' and the student's."""
    Path(model_path).parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()  # train.max_minutes: the members' and the student's budget
    with tempfile.TemporaryDirectory(prefix=".teacher.", dir=Path(model_path).parent) as tmp:
        teacher = Path(tmp) / "teacher.keras"
        members = train_members(name, cfg, seeds, data_dir, teacher, None, strategy, started, after=1)
        print(f"train.distil: the student, seed {seeds[0]}, on {weight:g} x the ensemble's probability maps + "
              f"{1 - weight:g} x the masks", flush=True)
        keras.backend.clear_session()
        # passed as a path: loaded once the student is built, which is then built exactly as that seed's run
        summary = train(name, budget_share(cfg, started, 1), seeds[0], data_dir, model_path, live_dir, strategy,
                        teacher)
    summary["student_train_seconds"] = summary["train_seconds"]
    summary["train_seconds"] = round(summary["train_seconds"] + members["train_seconds"], 1)
    summary.update(distil=weight, student_seed=seeds[0], members=members["members"])
    return summary


def served(model: keras.Model) -> keras.Model:
    """The model to save: with deep supervision the mask head alone (its auxiliary heads only helped train the
    decoder), so evaluation, the CLI and the app run the plain network; any other model as it is."""
    if not any(name.startswith("aux_") for name in getattr(model, "output_names", None) or ()):
        return model  # a Sequential model has no output_names, nor auxiliary heads
    return keras.Model(model.inputs, model.outputs[-1], name=model.name)


@contextlib.contextmanager
def checkpoint_path(model_path: Path):
    """A path in a private folder beside `model_path` to save to; renamed onto model_path if the block ends with a
    file there, so a failed run leaves the last good model in place."""
    model_path = Path(model_path)
    model_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".train.", dir=model_path.parent) as tmp:
        checkpoint = Path(tmp) / model_path.name
        yield checkpoint
        if checkpoint.is_file():
            os.replace(checkpoint, model_path)


def refit(name: str, cfg: dict, seed: int, epochs: int, learning_rates: list[float] | None = None,
          data_dir: Path = DATA, model_path: Path = MODEL, strategy: tf.distribute.Strategy | None = None) -> dict:
    """The recipe trained again from scratch, with the same seed, on the training and validation patients
    (data/prepared's train and refit tables) for `epochs` epochs, the number a first run chose on validation;
    saved to `model_path`. With the plateau schedule each epoch gets the learning rate that epoch had in the first
    run (`learning_rates`), since nothing is left to watch for a plateau. Returns the refit's facts."""
    model, train_ds, n_train = build(name, cfg, seed, data_dir, (("train", "refit"),), strategy)
    replay = []
    if cfg.get("lr_schedule") == "plateau":
        if len(learning_rates or []) < epochs:
            raise BrainsegError(f"refit: {epochs} epochs asked but the first run logged {len(learning_rates or [])} "
                                "learning rates to replay. Fix: rerun `dvc repro train`")
        replay = [keras.callbacks.LearningRateScheduler(lambda epoch, rate: float(learning_rates[epoch]))]
    timer = TrainTimer()
    with checkpoint_path(model_path) as checkpoint:
        start = time.perf_counter()
        history = model.fit(train_ds, epochs=epochs, callbacks=[*replay, timer], shuffle=False,
                            verbose=1 if sys.stdout.isatty() else 2).history
        seconds = time.perf_counter() - start
        if not np.isfinite(history["loss"][-1]):
            raise BrainsegError(f"the refit of {name} ended with a loss of {history['loss'][-1]}, so {model_path} "
                                "was not replaced: set train.refit false or lower train.learning_rate")
        served(model).save(checkpoint)
    return {"epochs": epochs, "train_slices": n_train, "train_seconds": round(seconds, 1),
            "train_slices_per_s": round(slices_per_epoch(train_ds, n_train) * epochs / max(timer.seconds, 1e-9), 2),
            **{f"final_{key}": float(values[-1]) for key, values in plain_names(model, history).items()
               if key != "learning_rate"}}



def summarize(name, cfg, model, history, n_train, seconds, train_step_seconds,
              per_epoch: int | None = None, watch: str = "val_loss") -> dict:
    """Run facts plus the validation loss and metrics at the best epoch by `watch` (train.monitor; a model of
    several outputs, doubleunet or deep supervision: its total loss and the prediction's metrics without their
    output's prefix, so every segmenter reports best_val_dice). `per_epoch`: the slices trained on per epoch
    (slices_per_epoch), when not all `n_train`."""
    values = np.asarray(history[watch], np.float64)
    best = int(np.nanargmin(values) if MONITORS[watch] == "min" else np.nanargmax(values))
    epochs = len(history["val_loss"])
    summary = {"model": name, "profile": cfg["profile"], "params": served(model).count_params(),
               "image_size": cfg["image_size"], "batch_size": cfg["batch_size"], "filters": cfg["filters"],
               "train_slices": n_train, "epochs": epochs, "best_epoch": best + 1, "monitor": watch,
               "train_seconds": round(seconds, 1),
               "train_slices_per_s": round((per_epoch or n_train) * epochs / max(train_step_seconds, 1e-9), 2)}
    for key, values in plain_names(model, history).items():
        if key == "val_loss" or key.startswith("val_") and not key.endswith("_loss"):
            summary["best_" + key] = float(values[best])
    return summary


if __name__ == "__main__":
    run_main(main)
