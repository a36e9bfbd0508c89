"""Segmentation and detection scores: pure numpy / pandas / scikit-learn, no model, no files.

Everything starts from per-slice pixel counts (tp, fp, fn), so a split of any size is scored from a
small table (stages.evaluate streams patients through the model and keeps only counts).

Conventions (the same everywhere, so the numbers are comparable between models and with the papers):
- Dice = 2 TP / (2 TP + FP + FN). When truth and prediction are both empty the Dice is 1 (nothing to
  find and nothing claimed); truth empty but something predicted gives 0, as does tumour missed entirely.
- Dice per volume (headline, Buda et al. 2019): each patient's slices are pooled into one volume, one Dice
  per patient, then the mean and median over patients.
- Dice per slice: the mean over all slices (the empty-slice rule above matters a lot here: about two thirds
  of LGG slices have no tumour) and the mean over tumour slices only (truth not empty).
- Pixel scores pool every pixel of the split: Dice, IoU, precision, recall and the seed article's Tversky
  index TI = TP / (TP + 0.7 FN + 0.3 FP). A score whose denominator is 0 is 1 when the split has neither
  tumour nor prediction, else 0.
- Detection (is there a tumour on this slice?): accuracy, sensitivity, specificity from a yes/no decision,
  ROC AUC from a continuous score; AUC is None when the split holds only one class.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score, roc_curve

TVERSKY_ALPHA = 0.7  # weight of false negatives (missed tumour)
TVERSKY_BETA = 0.3   # weight of false positives
_CHUNK = 256         # slices per chunk when counting, to bound memory on large splits


def _finite(x) -> float | None:
    """A float for JSON: NaN / inf (an undefined score) become None."""
    x = float(x)
    return x if math.isfinite(x) else None


def slice_counts(truth: np.ndarray, pred: np.ndarray, patients=None) -> pd.DataFrame:
    """Per-slice pixel counts of binary masks (N,H,W): columns tp, fp, fn (int64), plus patient if given."""
    truth, pred = np.asarray(truth), np.asarray(pred)
    if truth.shape != pred.shape:
        raise ValueError(f"truth {truth.shape} and prediction {pred.shape} differ in shape")
    if truth.ndim == 2:
        truth, pred = truth[None], pred[None]
    pixels = int(np.prod(truth.shape[1:]))
    parts = {"tp": [], "fp": [], "fn": []}
    for start in range(0, len(truth), _CHUNK):
        t = truth[start:start + _CHUNK].astype(bool).reshape(-1, pixels)
        p = pred[start:start + _CHUNK].astype(bool).reshape(-1, pixels)
        parts["tp"].append((t & p).sum(axis=1))
        parts["fp"].append((~t & p).sum(axis=1))
        parts["fn"].append((t & ~p).sum(axis=1))
    counts = pd.DataFrame({k: np.concatenate(v).astype(np.int64) if v else np.zeros(0, np.int64)
                           for k, v in parts.items()})
    if patients is not None:
        counts.insert(0, "patient", np.asarray(patients))
    return counts


def dice_from_counts(tp, fp, fn):
    """Dice from pixel counts (scalars or arrays); both masks empty -> 1."""
    tp, fp, fn = (np.asarray(x, dtype=np.float64) for x in (tp, fp, fn))
    den = 2 * tp + fp + fn
    out = np.where(den > 0, 2 * tp / np.where(den > 0, den, 1), 1.0)
    return float(out) if out.ndim == 0 else out


def dice_per_slice(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """One Dice per slice of (N,H,W) masks (empty-vs-empty = 1, truth empty but predicted = 0)."""
    c = slice_counts(truth, pred)
    return dice_from_counts(c.tp, c.fp, c.fn)


def dice_per_volume(counts: pd.DataFrame) -> pd.Series:
    """One Dice per patient from slice_counts(..., patients): the patient's slices pooled as one volume.

    Indexed by patient, in order of first appearance.
    """
    sums = counts.groupby("patient", sort=False)[["tp", "fp", "fn"]].sum()
    return pd.Series(dice_from_counts(sums.tp, sums.fp, sums.fn), index=sums.index, name="dice")


def _ratio(num: float, den: float, all_empty: bool) -> float:
    return num / den if den > 0 else float(all_empty)


def pixel_scores(tp: int, fp: int, fn: int) -> dict:
    """Pooled pixel scores: dice_pixel, iou, precision, recall, tversky (alpha 0.7 on FN, beta 0.3 on FP)."""
    tp, fp, fn = int(tp), int(fp), int(fn)
    empty = tp + fp + fn == 0
    return {
        "dice_pixel": _ratio(2 * tp, 2 * tp + fp + fn, empty),
        "iou": _ratio(tp, tp + fp + fn, empty),
        "precision": _ratio(tp, tp + fp, empty),
        "recall": _ratio(tp, tp + fn, empty),
        "tversky": _ratio(tp, tp + TVERSKY_ALPHA * fn + TVERSKY_BETA * fp, empty),
    }


def segmentation_scores(counts: pd.DataFrame) -> dict:
    """All segmentation scores of a split from slice_counts(truth, pred, patients).

    Keys: dice_volume_mean, dice_volume_median, dice_slice_mean, dice_slice_tumour_mean
    (None if no slice has tumour), dice_pixel, iou, precision, recall, tversky.
    """
    per_volume = dice_per_volume(counts)
    per_slice = dice_from_counts(counts.tp, counts.fp, counts.fn)
    tumour = (counts.tp + counts.fn).to_numpy() > 0
    return {
        "dice_volume_mean": _finite(per_volume.mean()),
        "dice_volume_median": _finite(per_volume.median()),
        "dice_slice_mean": _finite(np.mean(per_slice)) if len(counts) else None,
        "dice_slice_tumour_mean": _finite(np.mean(per_slice[tumour])) if tumour.any() else None,
        **pixel_scores(counts.tp.sum(), counts.fp.sum(), counts.fn.sum()),
    }


def per_patient_table(counts: pd.DataFrame) -> pd.DataFrame:
    """One row per patient, worst Dice first: patient, slices, dice, true_volume, predicted_volume (pixels)."""
    g = counts.groupby("patient", sort=False)
    table = pd.DataFrame({
        "slices": g.size(),
        "dice": dice_per_volume(counts),
        "true_volume": g.tp.sum() + g.fn.sum(),
        "predicted_volume": g.tp.sum() + g.fp.sum(),
    }).rename_axis("patient").reset_index()
    return table.sort_values(["dice", "patient"], kind="stable").reset_index(drop=True)


def detection_scores(present, predicted, score) -> dict:
    """Slice-level tumour detection.

    present: true tumour per slice (bool), predicted: the yes/no decision, score: a continuous score for
    the ROC AUC (higher = more likely tumour). Keys: accuracy, sensitivity, specificity, roc_auc
    (None when only one class is present; sensitivity / specificity None without positives / negatives),
    and the confusion counts tp, fp, fn, tn.
    """
    present = np.asarray(present, dtype=bool)
    predicted = np.asarray(predicted, dtype=bool)
    tp = int(np.sum(present & predicted))
    tn = int(np.sum(~present & ~predicted))
    fp = int(np.sum(~present & predicted))
    fn = int(np.sum(present & ~predicted))
    two_classes = 0 < present.sum() < len(present)
    return {
        "accuracy": _finite((tp + tn) / len(present)) if len(present) else None,
        "sensitivity": _finite(tp / (tp + fn)) if tp + fn else None,
        "specificity": _finite(tn / (tn + fp)) if tn + fp else None,
        "roc_auc": _finite(roc_auc_score(present, score)) if two_classes else None,
        "tp": tp, "fp": fp, "fn": fn, "tn": tn,
    }


def roc_points(present, score) -> pd.DataFrame:
    """ROC curve as a table (fpr, tpr) for DVC plots; empty when only one class is present."""
    present = np.asarray(present, dtype=bool)
    if not 0 < present.sum() < len(present):
        return pd.DataFrame({"fpr": [], "tpr": []})
    fpr, tpr, _ = roc_curve(present, np.asarray(score, dtype=np.float64))
    return pd.DataFrame({"fpr": fpr, "tpr": tpr})


def confusion_rows(present, predicted) -> pd.DataFrame:
    """One row per slice (actual, predicted) with labels 'tumour' / 'no tumour', for DVC's confusion plot."""
    label = np.array(["no tumour", "tumour"])
    return pd.DataFrame({"actual": label[np.asarray(present, dtype=int)],
                         "predicted": label[np.asarray(predicted, dtype=int)]})
