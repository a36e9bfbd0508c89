import keras
import numpy as np
import pytest

from stages import callbacks
from stages.callbacks import TimeLimit, VolumeDice


def _epoch(limit, epoch, steps_begin, test_begin, end):
    """One epoch as Keras calls the callback, on a fake clock: batch starts, validation start, epoch end."""
    times = iter([steps_begin[0], *steps_begin, test_begin, end])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(callbacks.time, "perf_counter", lambda: next(times))
        limit.model.stop_training = False
        limit.on_epoch_begin(epoch)
        for i in range(len(steps_begin)):
            limit.on_train_batch_begin(i)
        limit.on_test_begin()
        limit.on_epoch_end(epoch)
    return limit.model.stop_training


def test_time_limit_stops_before_an_epoch_would_pass_it():
    limit = TimeLimit(minutes=3)
    limit.set_model(keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)]))
    limit.start = 0.0
    # epoch 1 compiles: its first step takes 50 s, validation 47 s. Estimate: 4 x 1 s (median step) + 47 s,
    # so 100 s elapsed + 51 s fits in 180 s (the epoch's own 100 s would not have: 200 s); then 110 + 4 + 6 s
    assert not _epoch(limit, 0, [0, 50, 51, 52], 53, 100)
    assert not _epoch(limit, 1, [100, 101, 102, 103], 104, 110)
    # steps of 30 s: 235 s elapsed + 4 x 30 s + 5 s passes 180 s
    assert _epoch(limit, 2, [110, 140, 170, 200], 230, 235)


def test_time_limit_leaves_the_last_epoch_alone_and_says_when_it_stopped_training():
    limit = TimeLimit(minutes=1)
    limit.set_model(keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)]))
    limit.set_params({"epochs": 2})
    limit.start = 0.0
    assert not _epoch(limit, 1, [0, 30, 60], 90, 100) and not limit.stopped  # past the budget, but the last epoch
    assert _epoch(limit, 0, [0, 30, 60], 90, 100) and limit.stopped  # a second epoch would have followed


def test_time_limit_without_validation_uses_the_epoch_itself():
    limit = TimeLimit(minutes=1)
    limit.set_model(keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)]))
    limit.start = 0.0
    times = iter([0.0, 20.0, 40.0])  # epoch begins, its only batch begins, epoch ends: 40 s + 40 s > 60 s
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(callbacks.time, "perf_counter", lambda: next(times))
        limit.on_epoch_begin(0)
        limit.on_train_batch_begin(0)
        limit.on_epoch_end(0)
    assert limit.model.stop_training


def test_volume_dice_pools_each_validation_patients_slices_and_logs_the_mean():
    """Identity 'model': the inputs are the probabilities. Patient A's two slices pool to 2*3/(2*3 + 1 + 2) = 2/3
    (one true pixel missed on the first, two false ones on the second); B's empty slice predicted empty scores 1."""
    truth = np.zeros((3, 4, 4, 1), np.float32)
    truth[0, 0, :3] = truth[1, 1, :1] = 1.0
    probs = truth.copy()
    probs[0, 0, 2] = 0.4   # below the threshold: missed
    probs[1, 2, :2] = 0.9  # false positives
    callback = VolumeDice(probs, truth, ["A", "A", "B"], batch_size=2)
    callback.set_model(keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Identity()]))
    logs = {"val_loss": 0.3}
    callback.on_epoch_end(0, logs)
    a = 2 * 3 / (2 * 3 + 1 + 2)
    assert logs == {"val_loss": 0.3, "val_dice_volume": pytest.approx((a + 1.0) / 2)}
    assert callback.table().to_dict("records") == [{"epoch": 1, "patient": "A", "dice": pytest.approx(a)},
                                                   {"epoch": 1, "patient": "B", "dice": 1.0}]
