import numpy as np
import pandas as pd
import pytest

from stages import intervals


def test_the_interval_of_many_patients_is_the_normal_one():
    # 400 patients: the bootstrap interval of the mean is close to mean +- 1.96 sd / sqrt(n)
    values = np.random.default_rng(1).normal(0.8, 0.1, 400)
    low, high = intervals.mean_interval(values)
    half = 1.96 * values.std(ddof=1) / np.sqrt(len(values))
    assert low == pytest.approx(values.mean() - half, abs=0.1 * half)
    assert high == pytest.approx(values.mean() + half, abs=0.1 * half)


def test_fewer_patients_give_a_wider_interval_around_the_mean():
    values = np.random.default_rng(2).uniform(0.5, 1.0, 48)
    few = intervals.mean_interval(values[:12])
    many = intervals.mean_interval(values)
    assert few[0] < values[:12].mean() < few[1] and many[0] < values.mean() < many[1]
    assert few[1] - few[0] > 1.5 * (many[1] - many[0])


def test_a_low_outlier_stretches_the_interval_downwards():
    # per-volume Dice is skewed by a missed patient; BCa follows the skew where a symmetric interval would not
    values = np.array([0.9, 0.88, 0.91, 0.86, 0.92, 0.89, 0.87, 0.9, 0.85, 0.2])
    low, high = intervals.mean_interval(values)
    assert values.mean() - low > high - values.mean()


def test_the_interval_is_the_same_every_time():
    values = [0.53, 0.67, 0.67, 0.72, 0.74, 0.82, 0.85, 0.87, 0.88, 0.9, 0.92, 0.93]
    assert intervals.mean_interval(values) == intervals.mean_interval(values)
    assert intervals.mean_interval(values) != intervals.mean_interval(values, seed=1)
    # evaluate takes the patients in the order of the data, per_patient.csv worst first: the same interval
    assert intervals.mean_interval(values[::-1]) == intervals.mean_interval(values)


@pytest.mark.parametrize("values", [[], [0.8], [0.7, 0.7, 0.7]])
def test_no_interval_without_two_different_patients(values):
    assert intervals.mean_interval(values) == (None, None)


def test_volume_spread_names_the_worst_patient():
    per_volume = pd.Series({"TCGA_B": 0.4, "TCGA_C": 0.9, "TCGA_A": 0.4, "TCGA_D": 0.8})
    spread = intervals.volume_spread(per_volume)
    assert (spread["dice_volume_worst"], spread["dice_volume_worst_patient"]) == (0.4, "TCGA_A")  # ties: by name
    assert spread["dice_volume_ci95_low"] < per_volume.mean() < spread["dice_volume_ci95_high"]
    assert intervals.volume_spread(pd.Series(dtype=float)) == {
        "dice_volume_worst": None, "dice_volume_worst_patient": None, "dice_volume_ci95_low": None,
        "dice_volume_ci95_high": None}
