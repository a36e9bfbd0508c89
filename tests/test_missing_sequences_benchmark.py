import numpy as np
import pandas as pd
import pytest

from benchmarks import missing_sequences
from stages.common import load_params


def slices():
    """Four 16x16 slices of one patient: FLAIR flat over the head, the tumour seen on post-contrast alone, on the
    upper two slices (a model reading post-contrast finds it; with post-contrast from FLAIR nothing shows)."""
    images = np.zeros((4, 16, 16, 3), np.uint8)
    images[:, 2:14, 2:14] = (60, 100, 50)
    images[2:, 5:9, 5:9, 2] = 200
    masks = np.zeros((4, 16, 16), np.uint8)
    masks[2:, 5:9, 5:9] = 1
    return images, masks


def test_flair_copies_replace_the_named_channels_and_leave_the_input():
    images, _ = slices()
    post = missing_sequences.with_flair_copies(images, (2,))
    both = missing_sequences.with_flair_copies(images, (0, 2))
    assert np.array_equal(post[..., 2], images[..., 1]) and np.array_equal(post[..., 0], images[..., 0])
    assert np.array_equal(both[..., 0], images[..., 1]) and np.array_equal(both[..., 2], images[..., 1])
    assert images[2, 6, 6, 2] == 200  # the input as it was
    assert missing_sequences.lacking(images) == ()
    assert missing_sequences.lacking(post) == (2,) and missing_sequences.lacking(both) == (0, 2)
    assert missing_sequences.lacking(np.zeros((2, 4, 4, 3), np.uint8)) == ()  # no head: nothing to tell


def test_each_way_is_scored_with_each_setting_on_the_same_patient(tmp_path):
    import keras

    inputs = keras.Input((16, 16, 3))
    conv = keras.layers.Conv2D(1, 1, activation="sigmoid")
    model = keras.Model(inputs, conv(inputs), name="unet")
    conv.set_weights([np.array([0.0, -40.0, 40.0], np.float32).reshape(1, 1, 3, 1), np.array([-1.0], np.float32)])
    evaluation = {"postprocess": {"threshold": 0.5, "min_component": 4, "min_position": 0.2, "largest_3d": True,
                                  "tta_flip": True, "tta_affine": False, "chosen_on_validation": "tta_flip"}}
    # float32: an int8 graph's ranges, fixed on synthetic volumes, would clip this hand-set model's large logits
    params = {"evaluate": {**load_params("evaluate"), "engine": "litert"}}
    settings = missing_sequences.run_settings(params, evaluation)
    assert settings["chosen"]["tta_flip"] and not settings["threshold"]["tta_flip"]
    assert "chosen_on_validation" not in settings["chosen"]
    scores = missing_sequences.score_patient(model, *slices(), settings)
    assert set(scores) == {(way, s) for way in missing_sequences.WAYS for s in settings}
    assert scores["as given", "threshold"] == pytest.approx(1.0) and scores["as given", "chosen"] == pytest.approx(1.0)
    assert scores["post-contrast from FLAIR", "threshold"] == 0.0
    assert scores["pre- and post-contrast from FLAIR", "chosen"] == 0.0


def test_tables_give_each_ways_loss_against_the_slices_as_given():
    rows = [{"run": run, "patient": p, "way": way, "setting": s, "dice": d - loss}
            for run, d in (("a", 0.8), ("b", 0.6)) for p in ("p1", "p2")
            for way, loss in zip(missing_sequences.WAYS, (0.0, 0.1, 0.3)) for s in ("threshold", "chosen")]
    table = missing_sequences.summary(pd.DataFrame(rows))
    assert table["way"].tolist() == list(missing_sequences.WAYS) * 2
    assert table.columns.tolist() == ["run", "way", "threshold", "chosen", "threshold vs as given",
                                      "chosen vs as given"]
    first = table[table["run"] == "a"].set_index("way")
    assert first["threshold"].tolist() == pytest.approx([0.8, 0.7, 0.5])
    assert first["chosen vs as given"].tolist() == pytest.approx([0.0, -0.1, -0.3])
    over = missing_sequences.overall(pd.DataFrame(rows)).set_index("way")
    assert over.loc["as given", "threshold mean"] == pytest.approx(0.7)
    assert over.loc["pre- and post-contrast from FLAIR", ["chosen min", "chosen max"]].tolist() == pytest.approx(
        [0.3, 0.5])
