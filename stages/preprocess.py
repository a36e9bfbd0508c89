"""The one preprocessing shared by training, evaluation, the predict CLI and the web app."""
from __future__ import annotations

import cv2
import numpy as np


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


HEAD = 10  # uint8: a pixel is head when any channel is above it (models.BrainStandardise's threshold)
Z_ZERO, Z_STEP = 128, 32  # standardise_volume's uint8 code: z = (value - 128) / 32, head pixels 1..255, rest 0


def volume_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per channel mean and standard deviation of the head pixels of a patient's uint8 slices (N,H,W,3)."""
    images = np.asarray(images)
    head = images.max(axis=-1) > HEAD
    v = images[head].astype(np.float32) if head.any() else np.zeros((1, 3), np.float32)
    return v.mean(axis=0), np.maximum(v.std(axis=0), 1.0)


def standardise_volume(images: np.ndarray, stats=None) -> np.ndarray:
    """uint8 slices z-scored per channel over a volume's head pixels (`stats` from volume_stats, default the
    slices' own), stored back as uint8 (32 levels per standard deviation, +-4 sd) so every later step
    (resizing, augmented copies, batches) stays as for raw slices; non-head pixels 0."""
    images = np.asarray(images)
    mean, std = volume_stats(images) if stats is None else stats
    head = images.max(axis=-1, keepdims=True) > HEAD
    z = (images.astype(np.float32) - mean) / std
    return np.where(head, np.clip(np.rint(Z_ZERO + Z_STEP * z), 1, 255), 0).astype(np.uint8)
