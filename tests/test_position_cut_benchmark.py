import numpy as np
import pytest

from benchmarks import position_cut
from stages.common import load_params


def test_volume_dice_follows_the_metrics_convention():
    truth = np.zeros((2, 4, 4), bool)
    assert position_cut.volume_dice(truth, truth) == 1.0  # nothing to find, nothing claimed
    truth[0, :2, :2] = True
    pred = np.zeros_like(truth)
    pred[0, :2, :1] = True
    assert position_cut.volume_dice(truth, pred) == pytest.approx(2 * 2 / 6)


def test_a_cut_removes_a_false_positive_low_in_the_volume_under_every_setting():
    truth = np.zeros((5, 16, 16), bool)
    truth[2:4, 2:11, 2:11] = True             # tumour in the middle of the volume, 81 pixels a slice
    probs = np.where(truth, 0.9, 0.1).astype(np.float32)
    probs[0, 8:, 8:] = 0.9                    # a false positive of 64 pixels on the lowest slice (position 0)
    averages = {(False, False): probs, (True, False): probs.copy(), (True, True): probs.copy()}
    params = {**load_params("evaluate"), "min_position": 0}
    result = position_cut.scores(truth, averages, params, [0.0, 0.2])
    assert set(result[0.0]) == {"threshold", "min_component", "largest_3d", "tta_flip", "tta_affine"}
    assert result[0.0]["threshold"] == pytest.approx(2 * 162 / (162 + 162 + 64))
    assert all(score == 1.0 for score in result[0.2].values())
