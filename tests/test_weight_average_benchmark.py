import json

import keras
import numpy as np

from benchmarks import weight_average
from tests.conftest import set_params, write_prepared


def test_weights_are_averaged_element_by_element():
    epochs = [[np.array([1.0, 2.0], np.float32), np.array([[0.0]], np.float32)],
              [np.array([3.0, 6.0], np.float32), np.array([[1.0]], np.float32)]]
    mean = weight_average.average_weights(epochs)
    assert np.array_equal(mean[0], [2.0, 4.0]) and np.array_equal(mean[1], [[0.5]])
    assert mean[0].dtype == np.float32


def test_batch_norm_statistics_become_the_mean_of_the_batches_statistics():
    inputs = keras.Input((2,))
    norm = keras.layers.BatchNormalization(momentum=0.99)
    model = keras.Model(inputs, norm(inputs))
    rng = np.random.default_rng(0)
    batches = [(rng.normal(loc, 1.0, (8, 2)).astype(np.float32), None) for loc in (0.0, 4.0, 8.0)]
    assert weight_average.recompute_batch_norm(model, batches) == 3
    means = np.mean([b[0].mean(axis=0) for b in batches], axis=0)
    variances = np.mean([b[0].var(axis=0) for b in batches], axis=0)
    assert np.allclose(norm.moving_mean.numpy(), means, atol=1e-5)
    assert np.allclose(norm.moving_variance.numpy(), variances, atol=1e-4)
    assert norm.momentum == 0.99  # the layer's own momentum is given back


def test_variants_average_the_last_epochs_trained():
    found = weight_average.variants({"epochs": 18, "best_epoch": 13}, [5, 30])
    assert found["best epoch"] == ([13], False) and found["last epoch"] == ([18], False)
    assert found["last 5"] == ([14, 15, 16, 17, 18], True) and found["last 5-nobn"] == ([14, 15, 16, 17, 18], False)
    assert found["last 30"][0] == list(range(1, 19))  # no more epochs than were trained


def test_a_short_run_is_trained_and_scored(project, tmp_path):
    """Two epochs of the demo profile on a tiny prepared split: each epoch's weights kept, each variant scored on
    the validation patients."""
    write_prepared(project / "data")
    set_params(project, profile="demo", **{"profiles.demo.epochs": 2, "profiles.demo.filters": 4})
    weight_average.main(["--workdir", str(tmp_path / "run"), "--last", "2"])
    saved = sorted(p.name for p in (tmp_path / "run").glob("e*.weights.h5"))
    assert saved == ["e01.weights.h5", "e02.weights.h5"]
    rows = json.loads((tmp_path / "run/weight_average.json").read_text())
    assert [r["weights"] for r in rows] == ["best epoch", "last epoch", "last 2", "last 2-nobn"]
    assert all(0 <= r["chosen Dice"] <= 1 and r["val_loss"] > 0 for r in rows)
    assert rows[2]["epochs"] == "1-2"
