import keras
import numpy as np
import pytest

from stages.common import BrainsegError
from stages.losses import BCEDice, Dice, DiceLoss, FocalTversky, FocalTverskyBCE, TverskyIndex, get_loss

# One 2x2 slice: tumour in the first two pixels.
TRUE = np.array([1, 1, 0, 0], np.float32).reshape(1, 2, 2, 1)
PRED = np.array([0.9, 0.4, 0.2, 0.0], np.float32).reshape(1, 2, 2, 1)
BETTER = np.array([0.95, 0.9, 0.05, 0.0], np.float32).reshape(1, 2, 2, 1)
# By hand: TP = 0.9 + 0.4 = 1.3, FN = 0.1 + 0.6 = 0.7, FP = 0.2.
TI = 1.3 / (1.3 + 0.7 * 0.7 + 0.3 * 0.2)  # 0.70270
DICE = 2 * 1.3 / (2 * 1.3 + 0.7 + 0.2)  # 0.74286


def value(loss, y_pred=PRED, y_true=TRUE):
    return float(loss(y_true, y_pred))


def test_focal_tversky_matches_hand_value_and_prefers_better_prediction():
    assert value(FocalTversky()) == pytest.approx((1 - TI) ** 0.75, rel=1e-5)  # 0.40263
    assert value(FocalTversky(), BETTER) < value(FocalTversky())


def test_focal_tversky_alpha_penalises_missed_tumour_more_than_false_alarm():
    missed = np.array([1, 0, 0, 0], np.float32).reshape(1, 2, 2, 1)  # FN = 1
    false_alarm = np.array([1, 1, 1, 0], np.float32).reshape(1, 2, 2, 1)  # FP = 1
    assert value(FocalTversky(), missed) > value(FocalTversky(), false_alarm)


def test_focal_tversky_is_zero_for_a_perfect_prediction():
    assert value(FocalTversky(), TRUE) == pytest.approx(0.0, abs=1e-4)


def test_dice_and_bce_dice_match_hand_values():
    assert value(DiceLoss()) == pytest.approx(1 - DICE, rel=1e-5)  # 0.25714
    bce = -(np.log(0.9) + np.log(0.4) + np.log(0.8) + np.log(1.0)) / 4  # 0.31120
    assert value(BCEDice()) == pytest.approx(bce + 1 - DICE, rel=1e-4)
    assert value(BCEDice(), BETTER) < value(BCEDice())


def test_focal_tversky_bce_adds_cross_entropy_which_charges_false_positives_on_a_tumour_free_slice():
    bce = -(np.log(0.9) + np.log(0.4) + np.log(0.8) + np.log(1.0)) / 4
    assert value(FocalTverskyBCE()) == pytest.approx((1 - TI) ** 0.75 + bce, rel=1e-4)
    # a batch of the example slice and a tumour-free slice with one confident false positive: focal Tversky
    # sees one more FP pixel in the batch's sums, cross-entropy sees a pixel wrong by -log(0.01)
    batch_true = np.concatenate([TRUE, np.zeros_like(TRUE)])
    clean = np.concatenate([PRED, np.zeros_like(PRED)])
    alarm = np.concatenate([PRED, np.array([0.99, 0, 0, 0], np.float32).reshape(1, 2, 2, 1)])
    ft_rise = value(FocalTversky(), alarm, batch_true) - value(FocalTversky(), clean, batch_true)
    mixed_rise = value(FocalTverskyBCE(), alarm, batch_true) - value(FocalTverskyBCE(), clean, batch_true)
    assert mixed_rise - ft_rise == pytest.approx(-np.log(0.01) / 8, rel=1e-3) and mixed_rise > 3 * ft_rise


def test_metrics_pool_pixels_over_batches():
    dice, tversky = Dice(), TverskyIndex()
    for metric in (dice, tversky):
        metric.update_state(TRUE, PRED)
        metric.update_state(np.zeros_like(TRUE), np.zeros_like(PRED))  # an empty slice adds nothing
    assert float(dice.result()) == pytest.approx(DICE, rel=1e-5)
    assert float(tversky.result()) == pytest.approx(TI, rel=1e-5)
    dice.reset_state()
    dice.update_state(TRUE, TRUE)
    assert float(dice.result()) == pytest.approx(1.0)


def test_get_loss_reads_params_and_rejects_unknown_names():
    loss = get_loss({"loss": "focal_tversky", "alpha": 0.6, "beta": 0.4, "gamma": 1.0})
    assert (loss.alpha, loss.beta, loss.gamma) == (0.6, 0.4, 1.0)
    assert isinstance(get_loss({"loss": "dice"}), DiceLoss)
    assert isinstance(get_loss({"loss": "bce_dice"}), BCEDice)
    mixed = get_loss({"loss": "focal_tversky_bce", "alpha": 0.6})
    assert isinstance(mixed, FocalTverskyBCE) and (mixed.alpha, mixed.beta) == (0.6, 0.3)
    with pytest.raises(BrainsegError, match="train.loss"):
        get_loss({"loss": "hinge"})


@pytest.mark.parametrize("obj", [FocalTversky(0.6, 0.4, 2.0), FocalTverskyBCE(0.6, 0.4, 2.0), DiceLoss(),
                                  BCEDice(), Dice(), TverskyIndex(0.8, 0.2)])
def test_losses_and_metrics_round_trip_through_keras_serialization(obj):
    config = keras.saving.serialize_keras_object(obj)
    assert config["registered_name"].startswith("brainseg>")
    clone = keras.saving.deserialize_keras_object(config, safe_mode=True)
    assert type(clone) is type(obj) and clone.get_config() == obj.get_config()
