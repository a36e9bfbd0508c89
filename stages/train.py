"""DVC stage `train`: fit params.yaml's `model` on data/prepared and keep the best epoch.

Outputs: models/selection.keras (the epoch validation chose: lowest val loss, or with train.monitor
val_dice_volume the best per-volume Dice of the validation patients), models/model.keras (the same model; with
train.refit, the recipe trained again on the training and validation patients for that many epochs), each replaced
atomically, metrics/train.json (with a `refit` section after a refit), and DVCLive per-epoch curves of the first run
in dvclive/train/plots/metrics/{train,eval}/<metric>.tsv, and each validation patient's Dice per epoch in
dvclive/train/val_dice_volume.csv (segmenters). With train.members both models are the members' average
(a seed ensemble) and metrics/train.json lists each member's facts under `members`; with train.distil as well, both
are one network (the student) trained on a mix of the masks and the ensemble's probability maps.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import keras
import numpy as np
import pandas as pd

from stages import metrics as scores
from stages import prepared
from stages.balance import replay
from stages.common import (BrainsegError, load_params, member_seeds, profile_overrides, run_main, train_config,
                           training_seeds, write_csv, write_json)
from stages.losses import get_loss, segmentation_metrics
from stages.models import CLASSIFIERS, average, build_model
from stages.preprocess import (FLAIR, add_neighbours, add_position, mask_to_model_size, neighbour_places, resize_images,
                               slice_positions, standardise_volume, to_model_input, volume_stats)

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


def make_datasets(data_dir: Path, image_size: int, batch_size: int, classifier: bool = False,
                  tumour_slices_only: bool = False, seed: int = 0, outputs: int = 1,
                  augment: dict | None = None, input_norm: str | None = None, slice_position: bool = False,
                  neighbours: int = 0, splits: tuple = ("train", "val"), teacher=None, distil: float = 0.0):
    """Batched tf.data datasets of model-size inputs and targets for `splits` (training, then validation),
    plus the training slice count. A split may be a tuple of prepared tables trained on together: the refit's
    ("train", "refit"), with no validation split.

    Slices are resized once here, a chunk at a time, and kept as uint8 (masks as float16: the soft edges of
    an area-resized binary mask, exact for halving); batches are scaled to float32 as they are drawn, so
    memory holds the split at model size in a quarter (images) and half (masks) of the float32 bytes.
    Targets are (size, size, 1) masks, or for a classifier 1.0 when the slice's mask has any tumour; a model
    with several `outputs` gets the target once per output. `tumour_slices_only` filters training slices only.
    `augment` (params.yaml's train.augment) transforms training batches anew each epoch: see augmenter().
    `input_norm: volume` standardises each patient's slices first (its copies with its originals' statistics,
    stages.preprocess.standardise_volume), so that split is held once at full size before it is resized.
    `slice_position` adds each slice's place in its patient's volume as a fourth channel (an augmented copy
    takes its source's: table_positions). `neighbours` > 0 adds the FLAIR of that many slices below and above
    each slice as channels (with_neighbours), before the position; that split is then held once at full size too.
    `teacher` (a model, its file, or any callable from float32 model inputs to its outputs) and `distil` > 0: the
    training targets become soft_targets' mix of the masks and the teacher's outputs; validation keeps the masks.
    On a Keras backend other than TensorFlow (JAX, PyTorch: a GPU machine without TensorFlow), the same batches
    come from SliceBatches instead of tf.data, except that each epoch's last partial training batch is left out:
    XLA compiles the training step once per batch shape, and on the H100 that second compile took ~45 s of the
    GPU recipe's second epoch. The epoch's shuffle decides which slices (fewer than a batch) wait for the next.
    """
    transform = augmenter(augment or {}, seed)
    datasets = []
    for i, names in enumerate(splits):
        training = i == 0
        parts = [split_arrays(Path(data_dir), name, image_size, input_norm, slice_position, neighbours)
                 for name in ((names,) if isinstance(names, str) else names)]
        x, y = (np.concatenate(arrays) if len(arrays) > 1 else arrays[0] for arrays in zip(*parts))
        tumour = y.max(axis=tuple(range(1, y.ndim))) > 0  # works on an empty split too
        if training and tumour_slices_only:
            keep = np.flatnonzero(tumour)
            x, y, tumour = x[keep], y[keep], tumour[keep]
        if len(x) == 0:
            raise BrainsegError(f"{data_dir}: no {'+'.join(names) if isinstance(names, tuple) else names} slices to "
                                "train on; check params.yaml split / train.tumour_slices_only and rerun `dvc repro`")
        if classifier:
            y = tumour.astype(np.float16)[:, None]
        if training and teacher is not None and distil > 0:
            y = soft_targets(teacher, x, y, distil, batch_size)
        if training:
            n_train = len(x)
        if keras.backend.backend() != "tensorflow":
            datasets.append(SliceBatches(x, y, batch_size, seed if training else None,
                                         transform if training else None, classifier, outputs,
                                         drop_remainder=training and len(x) >= batch_size))
            continue
        import tensorflow as tf

        ds = tf.data.Dataset.from_tensor_slices((x, y))
        if training:
            ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
        # the same float32 values as preprocess.to_model_input gives evaluation and inference
        ds = ds.batch(batch_size).map(lambda image, target: (tf.cast(image, tf.float32) / 255.0,
                                                             tf.cast(target, tf.float32)))
        if training and transform is not None:
            ds = ds.map(same_transform(transform, classifier))
        if outputs > 1:
            ds = ds.map(lambda image, target: (image, per_output(target, outputs)))
        datasets.append(ds.prefetch(tf.data.AUTOTUNE))
    return *datasets, n_train


def split_arrays(data_dir: Path, split: str, image_size: int, input_norm: str | None = None,
                 slice_position: bool = False, neighbours: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One prepared table's (inputs, masks) at model size, as make_datasets describes."""
    def to_model_size(images, masks):
        return resize_images(images, image_size), mask_to_model_size(masks, image_size).astype(np.float16)

    if input_norm == "volume" or neighbours:
        x, y, table = prepared.load_split(data_dir, split)
        if input_norm == "volume":
            for _, rows in table.reset_index(drop=True).groupby("patient").indices.items():
                originals = rows[table["copy"].to_numpy()[rows] < 0]
                x[rows] = standardise_volume(x[rows], volume_stats(x[originals]))
        if neighbours:
            x = with_neighbours(x, table, neighbours)
        x, y = to_model_size(x, y)
    else:
        x, y, table = prepared.load_split(data_dir, split, transform=to_model_size)
    if slice_position:
        x = add_position(x, table_positions(table))
    return x, y


def soft_targets(teacher, x: np.ndarray, y: np.ndarray, weight: float, batch_size: int = 32) -> np.ndarray:
    """Knowledge distillation's targets: (1 - weight) * the masks + weight * the teacher's outputs on the same
    model-size uint8 inputs (scaled as training scales them), as float16 like the masks. The teacher is run on the
    training split once, before training: the student sees the same soft targets each epoch."""
    if isinstance(teacher, (str, Path)):
        teacher = keras.models.load_model(teacher, safe_mode=True, compile=False)
    predict = teacher.predict if hasattr(teacher, "predict") else None
    soft = np.empty(y.shape, np.float16)
    for rows in (slice(start, start + 256) for start in range(0, len(x), 256)):  # a chunk at a time: memory
        chunk = to_model_input(x[rows], x.shape[1])  # already at model size: only scaled, as training does
        out = predict(chunk, batch_size=batch_size, verbose=0) if predict else teacher(chunk)
        out = np.asarray(out[-1] if isinstance(out, (list, tuple)) else out, np.float32)
        soft[rows] = (1.0 - weight) * y[rows].astype(np.float32) + weight * out.reshape(y[rows].shape)
    return soft


def patient_places(table):
    """For each patient of a prepared split: (its rows, its original slices' rows in slice-number order, each
    row's place among those originals). A copy keeps its source's slice number, so it takes its source's place."""
    numbers = table["slice"].to_numpy()
    originals = table["copy"].to_numpy() < 0
    for _, rows in table.reset_index(drop=True).groupby("patient").indices.items():
        own = rows[originals[rows]]
        if len(own) == 0:
            raise BrainsegError(f"patient {table['patient'].iloc[rows[0]]} has augmented copies but no original "
                                "slices in its split. Fix: run `dvc repro balance --force`")
        own = own[np.argsort(numbers[own], kind="stable")]
        yield rows, own, np.searchsorted(numbers[own], numbers[rows]).clip(0, len(own) - 1)


def table_positions(table) -> np.ndarray:
    """preprocess.slice_positions for a prepared split's rows: each slice's place among its patient's originals."""
    positions = np.empty(len(table), np.float32)
    for rows, own, place in patient_places(table):
        positions[rows] = slice_positions(np.zeros(len(own)))[place]
    return positions


def table_neighbours(table, count: int) -> np.ndarray:
    """preprocess.neighbour_rows for a prepared split's rows: the rows of each slice's `count` neighbours below
    and above among its patient's original slices."""
    out = np.empty((len(table), 2 * count), np.int64)
    for rows, own, place in patient_places(table):
        out[rows] = own[neighbour_places(len(own), count)[place]]
    return out


def with_neighbours(x: np.ndarray, table, count: int) -> np.ndarray:
    """A split's slices (table order) with the FLAIR of their neighbours as channels (preprocess.add_neighbours).
    An augmented copy's neighbours get the copy's own flip, rotation and blur (balance.replay), so the planes
    stay aligned with the slice they surround."""
    out = add_neighbours(x, table_neighbours(table, count))
    for row in np.flatnonzero(table["copy"].to_numpy() >= 0):
        out[row, ..., 3:] = replay(out[row, ..., 3:], table["augmentation"].iloc[row])
    return out


def per_output(target, outputs: int):
    """The target once per output of a model with several (doubleunet, deep supervision), else itself."""
    return (target,) * outputs if outputs > 1 else target


class SliceBatches(keras.utils.PyDataset):
    """make_datasets' batches without tf.data: uint8 slices scaled to float32 / 255 and float16 targets to
    float32 as each batch is drawn, reshuffled each epoch when `shuffle_seed` is set, `transform` applied to
    the batch (each mask moved with its slice), the target repeated for a model with several `outputs`.
    `drop_remainder`: full batches only (the last, partial one of each epoch's order is left out).
    Four threads assemble batches ahead of the accelerator."""

    def __init__(self, x, y, batch_size: int, shuffle_seed: int | None = None, transform=None,
                 classifier: bool = False, outputs: int = 1, drop_remainder: bool = False):
        super().__init__(workers=4, use_multiprocessing=False)
        self.x, self.y, self.batch_size, self.outputs = x, y, batch_size, outputs
        self.drop_remainder = drop_remainder
        self.transform = None if transform is None else same_transform(transform, classifier)
        self.order = np.arange(len(x))
        self.rng = None if shuffle_seed is None else np.random.default_rng(shuffle_seed)
        self.on_epoch_end()

    def __len__(self) -> int:
        return len(self.x) // self.batch_size if self.drop_remainder else math.ceil(len(self.x) / self.batch_size)

    def __getitem__(self, i: int):
        rows = np.sort(self.order[i * self.batch_size:(i + 1) * self.batch_size])  # sorted: sequential reads
        # the slices are at model size already: to_model_input only scales, as for evaluation and inference
        image, target = to_model_input(self.x[rows], self.x.shape[1]), self.y[rows].astype(np.float32)
        if self.transform is not None:
            image, target = (keras.ops.convert_to_numpy(t) for t in self.transform(image, target))
        return image, per_output(target, self.outputs)

    def on_epoch_end(self) -> None:
        if self.rng is not None:
            self.rng.shuffle(self.order)


def augmenter(cfg: dict, seed: int) -> Augment | None:
    """train.augment's online transforms (None when it asks for none): Keras' random flip / rotation / zoom
    layers, RandomGamma and RandomMissingSequences.

    Balance's copies are drawn once; these are drawn per slice each epoch, so no two epochs see the same
    training set. Corners that rotation or zoom-out uncover are filled with 0, the scanner's background.
    float32 whatever the mixed-precision policy, so batches match the unaugmented ones and evaluation's input."""
    layers, common = [], {"dtype": "float32"}
    try:
        if cfg.get("flip"):
            layers.append(keras.layers.RandomFlip("horizontal", seed=seed, **common))
        if cfg.get("rotation"):
            layers.append(keras.layers.RandomRotation(cfg["rotation"] / 360, fill_mode="constant", seed=seed + 1,
                                                      **common))
        if cfg.get("zoom"):
            layers.append(keras.layers.RandomZoom(cfg["zoom"], fill_mode="constant", seed=seed + 2, **common))
        # gamma before the copies, so a copied sequence equals its FLAIR exactly, as in the data set
        intensity = [RandomGamma(cfg["gamma"], seed=seed + 3, **common)] if cfg.get("gamma") else []
        if cfg.get("missing"):
            intensity.append(RandomMissingSequences(cfg["missing"], seed=seed + 4, **common))
    except (TypeError, ValueError) as error:
        raise BrainsegError(f"params.yaml: train.augment {cfg} cannot be used ({error}). Fix: flip true or false, "
                            "rotation in degrees (0-360), zoom a fraction below 1, gamma a number above 0, missing "
                            "a probability (0-1), e.g. `dvc exp run -S train.augment.rotation=15 "
                            "-S train.augment.zoom=0.1`") from error
    if not layers and not intensity:
        return None
    return Augment(keras.Sequential(layers, name="augment") if layers else None,
                   keras.Sequential(intensity, name="intensity") if intensity else None)


class Augment:
    """A training batch's online transforms: the geometric ones move each slice and its mask together (one
    draw for both), the intensity one changes the slice alone."""

    def __init__(self, geometric: keras.Sequential | None = None, intensity: keras.layers.Layer | None = None):
        self.geometric, self.intensity = geometric, intensity

    def __call__(self, image, target=None):
        """(image, target) transformed; a target of None (a classifier's label is not a picture) stays None."""
        if self.geometric is not None and target is None:
            image = self.geometric(image, training=True)
        elif self.geometric is not None:
            both = self.geometric(keras.ops.concatenate([image, target], axis=-1), training=True)
            image, target = both[..., :-1], both[..., -1:]
        if self.intensity is not None:
            image = self.intensity(image, training=True)
        return image, target


class RandomGamma(keras.layers.Layer):
    """nnU-Net's gamma augmentation: with probability 0.5, each channel of each slice has its head pixels
    (those above 0, the background) scaled to 0-1 over their own range, raised to a power drawn log-uniformly
    in [1 / (1 + `gamma`), 1 + `gamma`], and scaled back. The range and the background stay; the contrast
    between tissues (tumour and brain included) changes, as it does between scanners and patients."""

    def __init__(self, gamma: float, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if not gamma > 0:
            raise ValueError(f"gamma must be above 0, got {gamma}")
        self.gamma, self.seed = float(gamma), seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=True):
        if not training:
            return images
        ops = keras.ops
        head = images > 0
        low = ops.min(ops.where(head, images, 2.0), axis=(1, 2), keepdims=True)
        high = ops.max(ops.where(head, images, -1.0), axis=(1, 2), keepdims=True)
        span = ops.maximum(high - low, 1e-6)
        draws = (ops.shape(images)[0], 1, 1, ops.shape(images)[3])
        limit = float(np.log1p(self.gamma))
        power = ops.exp(keras.random.uniform(draws, -limit, limit, seed=self.seed_generator))
        power = ops.where(keras.random.uniform(draws, seed=self.seed_generator) < 0.5, power, 1.0)
        scaled = ops.clip((images - low) / span, 0.0, 1.0)
        return ops.where(head, low + span * ops.power(scaled, power), images)

    def get_config(self):
        return {**super().get_config(), "gamma": self.gamma, "seed": self.seed}


class RandomMissingSequences(keras.layers.Layer):
    """The data set's stand-in for a sequence a patient was not scanned with, drawn per training slice: with
    probability `rate` the slice's post-contrast channel becomes a copy of its FLAIR, and in half of those its
    pre-contrast channel too. Kaggle's slices hold such copies for the patients who lack the sequences (7 of
    the dev archive's 61: post-contrast alone for 3, both for 4), so few that the network rarely learns to read
    FLAIR alone. Channels after the third (slice position, neighbours) stay."""

    def __init__(self, rate: float, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if not 0 < rate <= 1:
            raise ValueError(f"missing must be a probability in (0, 1], got {rate}")
        self.rate, self.seed = float(rate), seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=True):
        if not training:
            return images
        ops = keras.ops
        draw = keras.random.uniform((ops.shape(images)[0], 1, 1, 1), seed=self.seed_generator)
        flair = images[..., FLAIR:FLAIR + 1]
        pre = ops.where(draw < self.rate / 2, flair, images[..., :1])
        post = ops.where(draw < self.rate, flair, images[..., 2:3])
        return ops.concatenate([pre, flair, post, images[..., 3:]], axis=-1)

    def get_config(self):
        return {**super().get_config(), "rate": self.rate, "seed": self.seed}


def same_transform(transform: Augment, classifier: bool):
    """`transform` applied to a batch (a classifier's labels left alone): a tf.data map on the TensorFlow backend,
    a SliceBatches step on the others."""
    def apply(image, target):
        if classifier:
            return transform(image)[0], target
        return transform(image, target)
    return apply


def learning_rate(cfg: dict, steps_per_epoch: int):
    schedule = cfg.get("lr_schedule", "constant")
    if schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(cfg["learning_rate"], max(cfg["epochs"] * steps_per_epoch, 1))
    if schedule in ("plateau", "constant"):  # plateau: ReduceLROnPlateau lowers it, see callbacks()
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


class TrainTimer(keras.callbacks.Callback):
    """Seconds spent in training steps, validation excluded, for the slices/s figure."""

    def __init__(self):
        super().__init__()
        self.seconds, self._start = 0.0, None

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_test_begin(self, logs=None):
        self._stop()

    def on_epoch_end(self, epoch, logs=None):
        self._stop()

    def _stop(self):
        if self._start is not None:
            self.seconds += time.perf_counter() - self._start
            self._start = None


MONITORS = {"val_loss": "min", "val_dice_volume": "max"}  # train.monitor: the figure that picks the saved epoch


def monitor(cfg: dict, name: str = "unet") -> str:
    """train.monitor, checked: the validation figure that chooses the epoch saved (val_loss by default)."""
    chosen = cfg.get("monitor") or "val_loss"
    if chosen not in MONITORS:
        raise BrainsegError(f"params.yaml: train.monitor {chosen!r} is not one of {sorted(MONITORS)}; set it with "
                            "`dvc exp run -S train.monitor=val_dice_volume`, or val_loss")
    if chosen == "val_dice_volume" and name in CLASSIFIERS:
        raise BrainsegError(f"params.yaml: train.monitor val_dice_volume scores segmentations, and {name} is a "
                            "tumour classifier; set `-S train.monitor=val_loss`")
    return chosen


class VolumeDice(keras.callbacks.Callback):
    """The headline figure each epoch: the mean per-volume Dice of the validation patients (each patient's slices
    pooled; the prediction thresholded at 0.5, at model size, no post-processing), added to the epoch's logs as
    `val_dice_volume`, so DVCLive plots it and train.monitor can pick the saved epoch by it. `per_patient` keeps
    each patient's Dice per epoch. `x`: model inputs as validation feeds them; `masks`: the matching targets."""

    def __init__(self, x: np.ndarray, masks: np.ndarray, patients, batch_size: int):
        super().__init__()
        self.x, self.truth = x, np.asarray(masks).reshape(len(masks), *np.shape(masks)[1:3]) >= 0.5
        self.patients, self.batch_size = np.asarray(patients), batch_size
        self.per_patient: list[pd.Series] = []

    def on_epoch_end(self, epoch, logs=None):
        out = self.model.predict(self.x, batch_size=self.batch_size, verbose=0)
        probs = np.asarray(out[-1] if isinstance(out, (list, tuple)) else out, np.float32)
        pred = probs.reshape(self.truth.shape) > 0.5
        dice = scores.dice_per_volume(scores.slice_counts(self.truth, pred, self.patients))
        self.per_patient.append(dice)
        if logs is not None:
            logs["val_dice_volume"] = float(dice.mean())

    def table(self) -> pd.DataFrame:
        """epoch (from 1), patient, dice: one row per validation patient and epoch."""
        return pd.DataFrame([(epoch, patient, float(value)) for epoch, dice in enumerate(self.per_patient, 1)
                             for patient, value in dice.items()], columns=["epoch", "patient", "dice"])

    @classmethod
    def of(cls, val_ds, patients, batch_size: int) -> VolumeDice:
        """The callback for a validation dataset (tf.data or SliceBatches, in table order) and its patients."""
        xs, ys = [], []
        for x, y in (val_ds.as_numpy_iterator() if hasattr(val_ds, "as_numpy_iterator") else val_ds):
            xs.append(np.asarray(x))
            ys.append(np.asarray(y[-1] if isinstance(y, (list, tuple)) else y))
        return cls(np.concatenate(xs), np.concatenate(ys), patients, batch_size)


def callbacks(cfg: dict, checkpoint: Path, live=None, volume_dice: VolumeDice | None = None) -> list:
    """Plateau LR (first, so DVCLive logs the new rate), EMA swap, the validation per-volume Dice, early stopping,
    best-epoch checkpoint, DVCLive.

    With `ema`, the averaged weights are swapped in for validation and at each epoch's end, before the Dice,
    early stopping and the checkpoint see the model, so the epoch chosen and the weights saved are the averaged
    ones. The learning-rate plateau and early stopping always follow the validation loss, so train.monitor
    changes only which epoch the checkpoint keeps, never the training itself.
    """
    result = []
    if cfg.get("lr_schedule") == "plateau":
        result.append(keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, min_lr=1e-6, verbose=1,
                                                        patience=max(1, cfg["patience"] // 2)))
    if cfg.get("ema"):
        result.append(keras.callbacks.SwapEMAWeights(swap_on_epoch=True))
    watch = monitor(cfg)
    if volume_dice is not None:
        result.append(volume_dice)
    elif watch != "val_loss":
        raise BrainsegError(f"train.monitor {watch} needs the validation Dice callback (a segmenter with validation "
                            "patients)")
    result += [keras.callbacks.EarlyStopping(monitor="val_loss", patience=cfg["patience"],
                                             restore_best_weights=True, verbose=1),
               keras.callbacks.ModelCheckpoint(str(checkpoint), monitor=watch, mode=MONITORS[watch],
                                               save_best_only=True)]
    if live is not None:
        result.append(live_callback(live))
    return result


def live_callback(live):
    """DVCLive's Keras callback, the prediction's metrics under their plain names (plain_names)."""
    from dvclive.keras import DVCLiveCallback

    class Callback(DVCLiveCallback):
        def on_epoch_end(self, epoch, logs=None):
            super().on_epoch_end(epoch, plain_names(self.model, logs))
    return Callback(live=live)


def plain_names(model: keras.Model, logs: dict | None) -> dict | None:
    """`logs` of a model of several outputs (doubleunet, deep supervision) with the prediction's metrics renamed
    without their output's prefix (dice and val_dice for mask_dice and val_mask_dice), so every segmenter reports
    and plots the same names. Per-output losses keep theirs: `loss` is the total."""
    if not logs or len(model.outputs) < 2:
        return logs
    prefix = f"{model.output_names[-1]}_"
    plain = {}
    for key, value in logs.items():
        head = "val_" if key.startswith("val_") else ""
        if key.startswith(head + prefix) and not key.endswith("_loss"):
            key = head + key[len(head + prefix):]
        plain[key] = value
    return plain


class TimeLimit(keras.callbacks.Callback):
    """Stops training before an epoch that would end past `minutes` (a batch job's wall-clock limit), so the
    best epoch so far is still saved and evaluated.

    The next epoch is estimated as the median step of the one just ended times its steps, plus the shortest
    validation (and callbacks) time seen so far. Medians and minima, not the last epoch's length: on XLA the
    first epoch includes compiling (60-120 s on the H100, against 2-4 s once compiled; the second did too while
    SliceBatches still trained on partial batches), and taking that as the next epoch's length stopped GPU runs
    after their second epoch."""

    def __init__(self, minutes: float):
        super().__init__()
        self.seconds, self.start = 60.0 * minutes, None
        self.epoch_start = self.last_step = self.train_end = None
        self.steps: list[float] = []
        self.overhead = float("inf")
        self.stopped = False

    def on_train_begin(self, logs=None):
        self.start = time.perf_counter()

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_start, self.last_step, self.train_end, self.steps = time.perf_counter(), None, None, []

    def on_train_batch_begin(self, batch, logs=None):  # a begin hook keeps Keras' asynchronous batch dispatch
        now = time.perf_counter()
        if self.last_step is not None:
            self.steps.append(now - self.last_step)
        self.last_step = now

    def on_test_begin(self, logs=None):
        if self.train_end is None:
            self.train_end = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        now = time.perf_counter()
        train_end = self.train_end or now
        self.overhead = min(self.overhead, now - train_end)
        batches = len(self.steps) + 1
        step = float(np.median(self.steps)) if self.steps else train_end - self.epoch_start
        last = epoch + 1 >= (self.params or {}).get("epochs", float("inf"))  # nothing left to stop
        if not last and now - self.start + step * batches + self.overhead > self.seconds:
            print(f"TimeLimit: stopping after epoch {epoch + 1}: another would pass train.max_minutes", flush=True)
            self.model.stop_training = self.stopped = True


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
                            callbacks=[*callbacks(cfg, checkpoint, live, volume_dice), timer, *limit], shuffle=False,
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


def steps_per_epoch(train_ds, n_train: int, batch_size: int) -> int:
    """Training batches per epoch: SliceBatches may leave out a partial last batch, tf.data never does."""
    return len(train_ds) if isinstance(train_ds, SliceBatches) else math.ceil(n_train / batch_size)


def slices_per_epoch(train_ds, n_train: int) -> int:
    """Slices trained on per epoch: all `n_train`, less the partial last batch SliceBatches may leave out."""
    if isinstance(train_ds, SliceBatches) and train_ds.drop_remainder:
        return len(train_ds) * train_ds.batch_size
    return n_train


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
