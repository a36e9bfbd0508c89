"""Online augmentation for training (train.augment): transforms drawn per slice each epoch, unlike balance's copies,
which are drawn once. stages.datasets applies them to training batches only."""
from __future__ import annotations

import keras
import numpy as np

from stages.common import BrainsegError
from stages.preprocess import FLAIR


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
