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
