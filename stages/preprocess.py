"""The one preprocessing shared by training, evaluation, the predict CLI and the web app."""
from __future__ import annotations

from typing import TYPE_CHECKING

import cv2
import numpy as np

if TYPE_CHECKING:
    import keras


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 slices (N,H,W,3) -> uint8 (N,size,size,3); area interpolation when shrinking."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    n, h, w, _ = images.shape
    if (h, w) != (size, size):
        interp = cv2.INTER_AREA if size < max(h, w) else cv2.INTER_LINEAR
        images = np.stack([cv2.resize(im, (size, size), interpolation=interp) for im in images])
    return images


def to_model_input(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 slices (N,H,W,3) -> float32 (N,size,size,3) in [0,1]: resize_images, then scaled."""
    return resize_images(images, size).astype(np.float32) / 255.0


def mask_to_model_size(masks: np.ndarray, size: int) -> np.ndarray:
    """Binary masks (N,H,W) -> float32 (N,size,size,1); area interpolation keeps soft edges at low resolution."""
    masks = np.asarray(masks, dtype=np.float32)
    if masks.shape[1:3] != (size, size):
        masks = np.stack([cv2.resize(m, (size, size), interpolation=cv2.INTER_AREA) for m in masks])
    return masks[..., None]


def to_native(probs: np.ndarray, height: int, width: int) -> np.ndarray:
    """Probability maps (N,s,s[,1]) -> float32 (N,height,width), bilinear."""
    probs = np.asarray(probs, dtype=np.float32)
    if probs.ndim == 4:
        probs = probs[..., 0]
    if probs.shape[1:] == (height, width):
        return probs
    return np.stack([cv2.resize(p, (width, height), interpolation=cv2.INTER_LINEAR) for p in probs])


def warp_slices(slices: np.ndarray, angle: float, scale: float, inverse: bool = False) -> np.ndarray:
    """Slices (N,H,W[,C]) rotated by `angle` degrees and zoomed by `scale` about their centre (bilinear, zero
    outside), or with `inverse` the warp that undoes it: test-time views and their way back (inference)."""
    slices = np.asarray(slices)
    h, w = slices.shape[1:3]
    matrix = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), angle, scale)
    if inverse:
        matrix = cv2.invertAffineTransform(matrix)
    out = np.empty_like(slices)
    for i, plane in enumerate(slices):
        out[i] = cv2.warpAffine(np.ascontiguousarray(plane), matrix, (w, h), flags=cv2.INTER_LINEAR,
                                borderMode=cv2.BORDER_CONSTANT, borderValue=0).reshape(plane.shape)
    return out


HEAD = 10  # uint8: a pixel is head when any channel is above it (layers.BrainStandardise's threshold)
Z_ZERO, Z_STEP = 128, 32  # standardise_volume's uint8 code: z = (value - 128) / 32, head pixels 1..255, rest 0


def _planes(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 slices (N,H,W,3) as one (N*H, W, 3) image for OpenCV, and its head mask (uint8 255 where any channel
    is above HEAD, else 0)."""
    flat = np.ascontiguousarray(images).reshape(-1, images.shape[-2], 3)
    # one OpenCV pass over the interleaved channels (numpy's per-channel maximum took 0.09 ms a slice)
    return flat, cv2.bitwise_not(cv2.inRange(flat, (0, 0, 0), (HEAD, HEAD, HEAD)))


def volume_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per channel mean and standard deviation of the head pixels of a patient's uint8 slices (N,H,W,3)."""
    return _stats(*_planes(np.asarray(images)))


def _stats(flat: np.ndarray, head: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    values = np.arange(256, dtype=np.float64)
    mean, std = np.zeros(3, np.float32), np.ones(3, np.float32)
    for c in range(3):
        # the head pixels' histogram gives exact sums without gathering them
        counts = cv2.calcHist([flat], [c], head, [256], [0, 256]).ravel().astype(np.float64)
        if counts.sum():
            m = counts @ values / counts.sum()
            mean[c], std[c] = m, max(np.sqrt(counts @ (values - m) ** 2 / counts.sum()), 1.0)
    return mean, std


def standardise_volume(images: np.ndarray, stats=None) -> np.ndarray:
    """uint8 slices z-scored per channel over a volume's head pixels (`stats` from volume_stats, default the
    slices' own), stored back as uint8 (32 levels per standard deviation, +-4 sd) so every later step
    (resizing, augmented copies, batches) stays as for raw slices; non-head pixels 0."""
    images = np.asarray(images)
    if images.size == 0:
        return images.copy()
    flat, head = _planes(images)
    mean, std = _stats(flat, head) if stats is None else stats
    z = (np.arange(256, dtype=np.float32)[:, None] - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    table = np.clip(np.rint(Z_ZERO + Z_STEP * z), 1, 255).astype(np.uint8)  # one lookup per channel
    coded = cv2.LUT(flat, table.reshape(1, 256, 3))
    return cv2.bitwise_and(coded, coded, mask=head).reshape(images.shape)


def slice_positions(patients) -> np.ndarray:
    """Each slice's place in its patient's volume, 0 (the lowest slice: Kaggle numbers them from the bottom of
    the head) to 1 (the top), from one id per slice with each patient's slices in slice order; a patient of a
    single slice gets 0.5, the middle, since nothing says where it lies."""
    ids = np.asarray(patients)
    positions = np.full(len(ids), 0.5, np.float32)
    for patient in dict.fromkeys(ids.tolist()):
        rows = np.flatnonzero(ids == patient)
        if len(rows) > 1:
            positions[rows] = np.arange(len(rows)) / (len(rows) - 1)
    return positions


def add_position(images: np.ndarray, positions) -> np.ndarray:
    """uint8 slices (N,H,W,3) with a fourth channel, constant over each slice: its place in the volume (0-1,
    slice_positions) as uint8 0-255, so resizing, augmented copies and batches treat it like the pixels."""
    images = np.asarray(images)
    positions = np.asarray(positions, np.float32)
    if len(positions) != len(images):
        raise ValueError(f"{len(positions)} slice positions for {len(images)} slices")
    plane = np.broadcast_to(np.rint(255 * np.clip(positions, 0, 1)).astype(np.uint8)[:, None, None, None],
                            (*images.shape[:3], 1))
    return np.concatenate([images, plane], axis=-1)


FLAIR = 1  # the Kaggle slices' channels: pre-contrast, FLAIR, post-contrast


def neighbour_places(length: int, count: int) -> np.ndarray:
    """(length, 2*count) places of each slice's neighbours in a volume of `length` slices: the `count` below
    (farthest first), then the `count` above (nearest first); past an end of the volume the end slice repeats."""
    offsets = np.r_[np.arange(-count, 0), np.arange(1, count + 1)]
    return np.clip(np.arange(length)[:, None] + offsets, 0, max(length - 1, 0))


def neighbour_rows(patients, count: int) -> np.ndarray:
    """neighbour_places as rows of the whole batch, from one id per slice with each patient's slices in slice
    order (as slice_positions); a lone slice is its own neighbour."""
    ids = np.asarray(patients)
    rows = np.empty((len(ids), 2 * count), np.int64)
    for patient in dict.fromkeys(ids.tolist()):
        own = np.flatnonzero(ids == patient)
        rows[own] = own[neighbour_places(len(own), count)]
    return rows


def add_neighbours(images: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """uint8 slices (N,H,W,3) with 2*count more channels: the FLAIR of the slices `rows` names (neighbour_rows),
    so a 2D network sees the tumour's extent above and below the slice (2.5D input)."""
    images = np.asarray(images)
    rows = np.asarray(rows)
    if len(rows) != len(images):
        raise ValueError(f"{len(rows)} neighbour rows for {len(images)} slices")
    return np.concatenate([images, np.moveaxis(images[rows, ..., FLAIR], 1, -1)], axis=-1)


# What input a trained model takes: its layers say it (stages.layers), so the predict CLI, the app and evaluation
# prepare slices as its training did without being told


def input_size(model: keras.Model) -> int | None:
    """The square input size the model was built for; None if it accepts any size."""
    return model.inputs[0].shape[1]


def all_layers(model: keras.Model) -> list:
    """Every layer of the model, those of nested models too (an ensemble wraps its members whole, and what
    input a model expects is decided by layers inside them)."""
    return list(model._flatten_layers(include_self=False, recursive=True))


def volume_normalised(model: keras.Model) -> bool:
    """Whether the model expects each patient's slices standardised together (train.input_norm: volume)."""
    return any(type(layer).__name__ == "VolumeDecode" for layer in all_layers(model))


def slice_positioned(model: keras.Model) -> bool:
    """Whether the model takes each slice's place in its volume as a fourth channel (train.slice_position)."""
    return any(type(layer).__name__ == "SplitPosition" for layer in all_layers(model))


def neighbour_count(model: keras.Model) -> int:
    """How many slices below and above a model takes the FLAIR of (train.neighbours; 0 for a 2D model)."""
    return max([layer.count for layer in all_layers(model) if type(layer).__name__ == "SplitNeighbours"],
               default=0)


def network_input(model: keras.Model, images: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """uint8 slices as the model's training saw them, before resizing: standardised per patient volume, with
    the neighbours' FLAIR and the slice's place as more channels, as the model asks (one id per slice, each
    patient's slices in slice order; see stages.inference.predict_probs)."""
    if volume_normalised(model):
        patients = dict.fromkeys(ids)
        if len(patients) == 1:  # evaluation's case, a patient at a time: no copies in and out
            images = standardise_volume(images)
        else:
            standardised = np.empty_like(images)
            for patient in patients:
                rows = np.flatnonzero(ids == patient)
                standardised[rows] = standardise_volume(images[rows])
            images = standardised
    if neighbour_count(model):
        images = add_neighbours(images, neighbour_rows(ids, neighbour_count(model)))
    if slice_positioned(model):
        images = add_position(images, slice_positions(ids))
    return images
