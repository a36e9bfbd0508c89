"""How far the headline can be trusted: the per-volume Dice's worst patient and a bootstrap confidence interval of
its mean over patients. Pure numpy / pandas / scipy, no files.

Ten or so test patients make a wide interval (the default's 12 test patients give one 0.14 wide), and two runs or
two papers whose means lie inside each other's intervals are not told apart by their patients. The interval resamples
patients, not slices: the patients are the independent units, and the mean is over patients.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy.stats import bootstrap

LEVEL = 0.95
RESAMPLES = 10_000
SEED = 0  # a fixed draw: the same per-patient scores always give the same interval


def mean_interval(values, level: float = LEVEL, resamples: int = RESAMPLES, seed: int = SEED
                  ) -> tuple[float, float] | tuple[None, None]:
    """The bias-corrected and accelerated (BCa, scipy's default) bootstrap interval of the mean of `values`, whatever
    their order; (None, None) where it is undefined: fewer than two values, or all of them equal."""
    # sorted, so the resamples, and the interval, do not depend on the order the patients come in
    values = np.sort(np.asarray(values, np.float64))
    if len(values) < 2 or np.ptp(values) == 0:
        return None, None
    result = bootstrap((values,), np.mean, n_resamples=resamples, confidence_level=level, method="BCa",
                       random_state=np.random.default_rng(seed))
    low, high = (float(x) for x in result.confidence_interval)
    if not (math.isfinite(low) and math.isfinite(high)):
        return None, None
    return low, high


def interval_text(low: float | None, high: float | None, signed: bool = False) -> str:
    """An interval as the benchmarks print it: "0.714-0.849", or signed for a difference, which may be negative
    ("-0.010 to +0.044"); "-" where it is undefined."""
    if low is None:
        return "-"
    return f"{low:+.3f} to {high:+.3f}" if signed else f"{low:.3f}-{high:.3f}"


def volume_spread(per_volume: pd.Series) -> dict:
    """Beside the mean and median of the per-volume Dice (`per_volume`: one value per patient, indexed by patient):
    its worst patient and score, and the 95% bootstrap interval of its mean over patients."""
    per_volume = per_volume.dropna().sort_index()  # ties: the first patient by name, as per_patient.csv
    low, high = mean_interval(per_volume.to_numpy())
    worst = per_volume.idxmin() if len(per_volume) else None
    return {
        "dice_volume_worst": float(per_volume[worst]) if worst is not None else None,
        "dice_volume_worst_patient": worst,
        "dice_volume_ci95_low": low,
        "dice_volume_ci95_high": high,
    }
