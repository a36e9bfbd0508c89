"""The Keras callbacks of a training run: the epoch saved (train.monitor), the validation patients' per-volume Dice
each epoch, early stopping, the learning-rate plateau, DVCLive's curves, the wall-clock limit and the step timer."""
from __future__ import annotations

import time
from pathlib import Path

import keras
import numpy as np
import pandas as pd

from stages import metrics as scores
from stages.common import BrainsegError
from stages.models import CLASSIFIERS


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


def fit_callbacks(cfg: dict, checkpoint: Path, live=None, volume_dice: VolumeDice | None = None) -> list:
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
