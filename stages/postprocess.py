"""Probability maps -> binary tumour masks, driven by the `evaluate` section of params.yaml.

Steps, in order (each one off when its key is 0 / false, so `dvc exp run -S evaluate.KEY=VALUE` measures it):
threshold -> drop small 2D components (`min_component`) -> drop every prediction on the slices in the lowest
part of each patient's volume (`min_position`, on by default: 0.2, where no training tumour lies) -> keep the
largest 3D component per patient (`largest_3d`). Test-time averaging over the mirrored slice (`tta_flip`) and
over rotated and zoomed views (`tta_affine`) happens before, in stages.inference, because it needs the model.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from scipy import ndimage

from stages.preprocess import slice_positions

# the evaluate keys that evaluation may choose on validation patients (stages.evaluate.compare_settings)
POSTPROCESS_STEPS = ("min_component", "largest_3d", "tta_flip", "tta_affine")

# 8-connectivity in 2D and 26-connectivity in 3D: a tumour that shifts by a pixel from one slice to the
# next, or touches itself only diagonally, is still one object.
STRUCTURE_2D = ndimage.generate_binary_structure(2, 2)
STRUCTURE_3D = ndimage.generate_binary_structure(3, 3)


def threshold(probs: np.ndarray, level: float = 0.5) -> np.ndarray:
    """Probability maps -> bool masks: a pixel is tumour when its probability exceeds `level`."""
    return np.asarray(probs) > level


def remove_small_components(masks: np.ndarray, min_size: int) -> np.ndarray:
    """Drop the 2D connected components with fewer than `min_size` pixels from each slice of (N,H,W)."""
    masks = np.asarray(masks, dtype=bool)
    if min_size <= 0:
        return masks
    out = np.zeros_like(masks)
    for i, mask in enumerate(masks):
        labels, n = ndimage.label(mask, structure=STRUCTURE_2D)
        if n:
            sizes = np.bincount(labels.ravel())
            keep = sizes >= min_size
            keep[0] = False
            out[i] = keep[labels]
    return out


def keep_largest_3d(volume: np.ndarray) -> np.ndarray:
    """Keep only the largest 3D connected component of one patient's stacked slices (S,H,W)."""
    volume = np.asarray(volume, dtype=bool)
    labels, n = ndimage.label(volume, structure=STRUCTURE_3D)
    if n <= 1:
        return volume
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == sizes.argmax()


def largest_3d_per_patient(masks: np.ndarray, patients=None) -> np.ndarray:
    """Apply keep_largest_3d to each patient's slices.

    `patients` gives each row's patient; a patient's rows must be in slice order (they need not be
    consecutive). With patients=None every slice is its own volume (it keeps the largest 2D component):
    unrelated uploads are never joined into one volume.
    """
    masks = np.asarray(masks, dtype=bool)
    if patients is None:
        return np.stack([keep_largest_3d(m[None])[0] for m in masks]) if len(masks) else masks
    patients = np.asarray(patients)
    out = np.zeros_like(masks)
    for patient in dict.fromkeys(patients.tolist()):
        rows = np.flatnonzero(patients == patient)
        out[rows] = keep_largest_3d(masks[rows])
    return out


def drop_low_slices(masks: np.ndarray, patients, min_position: float) -> np.ndarray:
    """Empty the slices that lie below `min_position` of their patient's volume (0 the lowest slice, 1 the top:
    stages.preprocess.slice_positions; a patient's rows in slice order). With patients=None, or for a patient of
    one slice, nothing says where a slice lies and nothing is dropped."""
    masks = np.asarray(masks, dtype=bool)
    if patients is None or not min_position:
        return masks
    low = slice_positions(patients) < min_position
    return np.where(low[:, None, None], False, masks) if low.any() else masks


def tumour_present(masks: np.ndarray, params: dict) -> np.ndarray:
    """Slice-level detection from masks (N,H,W): True where the predicted area is non-zero and reaches
    `detection_min_area`, given in pixels of a 256x256 slice and scaled to the slices' size."""
    masks = np.asarray(masks, dtype=bool)
    area = masks.reshape(len(masks), -1).sum(axis=1)
    min_area = params.get("detection_min_area", 1) * masks.shape[1] * masks.shape[2] / (256 * 256)
    return (area > 0) & (area >= min_area)


def postprocess(probs: np.ndarray, params: dict, patients=None) -> np.ndarray:
    """Probability maps (N,H,W) -> bool masks (N,H,W) with the steps `params` (the evaluate section) turns on.

    Keys used: threshold (default 0.5), min_component (pixels, 0 = off), min_position (0-1, 0 = off),
    largest_3d (bool). See largest_3d_per_patient for `patients`.
    """
    masks = threshold(probs, params.get("threshold", 0.5))
    masks = remove_small_components(masks, int(params.get("min_component", 0) or 0))
    masks = drop_low_slices(masks, patients, float(params.get("min_position", 0) or 0))
    if params.get("largest_3d", False):
        masks = largest_3d_per_patient(masks, patients)
    return masks


def recorded_settings(params: dict, recorded: dict) -> dict:
    """`params` with the post-processing steps an evaluation recorded (eval.json's `postprocess`)."""
    # an evaluation made before tta_affine existed did not choose it
    applied = {"tta_affine": False, **recorded}
    return {**params, **{k: applied[k] for k in POSTPROCESS_STEPS}}


def serving_settings(params: dict, eval_json: Path | str = Path("metrics/eval.json")) -> dict:
    """The `evaluate` params to predict with: with `choose_on_validation`, the post-processing the last
    evaluation chose on the validation patients (recorded in metrics/eval.json), so the predict CLI and
    the app segment the way the reported scores were measured; otherwise `params` as set."""
    if not params.get("choose_on_validation"):
        return params
    try:
        return recorded_settings(params, json.loads(Path(eval_json).read_text())["postprocess"])
    except (OSError, ValueError, KeyError, TypeError):  # no evaluation yet (or a classifier's): as set
        return params
