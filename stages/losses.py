"""Segmentation losses and overlap metrics (Keras, registered so saved models reload in safe mode).

Sums run over the whole batch (every pixel of every slice), as in the seed article's Kaggle notebook: a
per-slice ratio is undefined on the many tumour-free slices, while a batch-wide one stays well behaved.
"""
from __future__ import annotations

import keras
from keras import ops

from stages.common import BrainsegError

PACKAGE = "brainseg"
SMOOTH = 1e-6


def _overlap(y_true, y_pred):
    """Soft true positives, false negatives and false positives summed over the batch."""
    y_true = ops.cast(y_true, "float32")
    y_pred = ops.cast(y_pred, "float32")
    tp = ops.sum(y_true * y_pred)
    fn = ops.sum(y_true * (1.0 - y_pred))
    fp = ops.sum((1.0 - y_true) * y_pred)
    return tp, fn, fp


def _pixel_bce(y_true, y_pred):
    """Binary cross-entropy, the mean over every pixel of the batch."""
    return ops.mean(keras.losses.binary_crossentropy(ops.cast(y_true, "float32"), ops.cast(y_pred, "float32")))


def tversky_index(tp, fn, fp, alpha, beta, smooth=SMOOTH):
    """TI = (TP + s) / (TP + alpha*FN + beta*FP + s); alpha = beta = 0.5 gives the Dice coefficient."""
    return (tp + smooth) / (tp + alpha * fn + beta * fp + smooth)


@keras.saving.register_keras_serializable(package=PACKAGE)
class FocalTversky(keras.losses.Loss):
    """Focal Tversky loss (Abraham & Khan 2019): loss = (1 - TI)^gamma with
    TI = (TP + s) / (TP + alpha*FN + beta*FP + s).

    alpha weights false negatives and beta false positives: the defaults (0.7, 0.3) favour recall of
    small tumours, like the seed notebook's tp / (tp + alpha*fn + (1-alpha)*fp). gamma < 1 raises the
    gradient of slices that are already fairly well segmented.
    """

    def __init__(self, alpha=0.7, beta=0.3, gamma=0.75, smooth=SMOOTH, name="focal_tversky", **kwargs):
        super().__init__(name=name, **kwargs)
        self.alpha, self.beta, self.gamma, self.smooth = alpha, beta, gamma, smooth

    def call(self, y_true, y_pred):
        ti = tversky_index(*_overlap(y_true, y_pred), self.alpha, self.beta, self.smooth)
        return ops.power(ops.maximum(1.0 - ti, 0.0), self.gamma)

    def get_config(self):
        return {**super().get_config(), "alpha": self.alpha, "beta": self.beta, "gamma": self.gamma,
                "smooth": self.smooth}


@keras.saving.register_keras_serializable(package=PACKAGE)
class FocalTverskyBCE(FocalTversky):
    """Focal Tversky plus pixel-mean binary cross-entropy. Focal Tversky's sums run over the batch, so false
    positives on a tumour-free slice weigh only beta / (the batch's tumour); cross-entropy charges every wrong
    pixel on its own, wherever it is."""

    def __init__(self, alpha=0.7, beta=0.3, gamma=0.75, smooth=SMOOTH, name="focal_tversky_bce", **kwargs):
        super().__init__(alpha, beta, gamma, smooth, name=name, **kwargs)

    def call(self, y_true, y_pred):
        return super().call(y_true, y_pred) + _pixel_bce(y_true, y_pred)


@keras.saving.register_keras_serializable(package=PACKAGE)
class DiceLoss(keras.losses.Loss):
    """Soft Dice loss: 1 - (2*TP + s) / (2*TP + FN + FP + s)."""

    def __init__(self, smooth=SMOOTH, name="dice_loss", **kwargs):
        super().__init__(name=name, **kwargs)
        self.smooth = smooth

    def call(self, y_true, y_pred):
        return 1.0 - tversky_index(*_overlap(y_true, y_pred), 0.5, 0.5, self.smooth)

    def get_config(self):
        return {**super().get_config(), "smooth": self.smooth}


@keras.saving.register_keras_serializable(package=PACKAGE)
class BCEDice(DiceLoss):
    """Pixel-mean binary cross-entropy plus the soft Dice loss."""

    def __init__(self, smooth=SMOOTH, name="bce_dice", **kwargs):
        super().__init__(smooth=smooth, name=name, **kwargs)

    def call(self, y_true, y_pred):
        return _pixel_bce(y_true, y_pred) + super().call(y_true, y_pred)


@keras.saving.register_keras_serializable(package=PACKAGE)
class TverskyIndex(keras.metrics.Metric):
    """Soft Tversky index over all pixels seen in the epoch (not a mean of per-batch values)."""

    def __init__(self, alpha=0.7, beta=0.3, smooth=SMOOTH, name="tversky", **kwargs):
        super().__init__(name=name, **kwargs)
        self.alpha, self.beta, self.smooth = alpha, beta, smooth
        self.tp, self.fn, self.fp = (self.add_variable((), initializer="zeros", name=n) for n in ("tp", "fn", "fp"))

    def update_state(self, y_true, y_pred, sample_weight=None):
        for total, value in zip((self.tp, self.fn, self.fp), _overlap(y_true, y_pred)):
            total.assign_add(value)

    def result(self):
        return tversky_index(self.tp, self.fn, self.fp, self.alpha, self.beta, self.smooth)

    def reset_state(self):
        for total in (self.tp, self.fn, self.fp):
            total.assign(0.0)

    def get_config(self):
        return {**super().get_config(), "alpha": self.alpha, "beta": self.beta, "smooth": self.smooth}


@keras.saving.register_keras_serializable(package=PACKAGE)
class Dice(TverskyIndex):
    """Soft Dice coefficient over all pixels seen in the epoch: the Tversky index with alpha = beta = 0.5."""

    def __init__(self, smooth=SMOOTH, name="dice", **kwargs):
        super().__init__(alpha=0.5, beta=0.5, smooth=smooth, name=name, **kwargs)

    def get_config(self):
        config = super().get_config()
        del config["alpha"], config["beta"]
        return config


LOSSES = ("focal_tversky", "focal_tversky_bce", "dice", "bce_dice")


def get_loss(cfg: dict) -> keras.losses.Loss:
    """The loss named by params.yaml `train.loss`, with train.alpha / beta / gamma for focal Tversky."""
    name = cfg.get("loss", "focal_tversky")
    if name in ("focal_tversky", "focal_tversky_bce"):
        loss = FocalTversky if name == "focal_tversky" else FocalTverskyBCE
        return loss(cfg.get("alpha", 0.7), cfg.get("beta", 0.3), cfg.get("gamma", 0.75))
    if name == "dice":
        return DiceLoss()
    if name == "bce_dice":
        return BCEDice()
    raise BrainsegError(f"params.yaml: train.loss '{name}' is not one of {LOSSES}; "
                        "set it with `dvc exp run -S train.loss=focal_tversky`")


def segmentation_metrics() -> list:
    return [Dice(), TverskyIndex()]
