import zipfile

import keras
import numpy as np
import pytest

from stages import inference, preprocess
from stages.common import BrainsegError


def flair_model(size=None, name="unet"):
    """A 'segmenter' that calls a pixel tumour when its FLAIR (middle) channel is bright: sigmoid(40 x - 20)."""
    inputs = keras.Input((size, size, 3))
    conv = keras.layers.Conv2D(1, 1, activation="sigmoid", name="mask")
    model = keras.Model(inputs, conv(inputs), name=name)
    conv.set_weights([np.array([0.0, 40.0, 0.0]).reshape(1, 1, 3, 1), np.array([-20.0])])
    return model


def left_model(size=16):
    """Depends on position (not mirror-symmetric): probability = the red channel of the pixel to its left."""
    inputs = keras.Input((size, size, 3))
    conv = keras.layers.Conv2D(1, (1, 3), padding="same", use_bias=False, name="mask")
    model = keras.Model(inputs, conv(inputs), name="unet")
    kernel = np.zeros((1, 3, 3, 1))
    kernel[0, 0, 0, 0] = 1.0
    conv.set_weights([kernel])
    return model


def classifier(size=16):
    inputs = keras.Input((size, size, 3))
    x = keras.layers.GlobalAveragePooling2D()(inputs)
    return keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(x), name="cnn")


def images(n=5, size=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 100, (n, size, size, 3), dtype=np.uint8)
    x[:, 4:10, 5:9, 1] = 255
    return x


def test_load_model_round_trip(tmp_path):
    path = tmp_path / "model.keras"
    flair_model(16).save(path)
    model = inference.load_model(path)
    assert model.name == "unet" and preprocess.input_size(model) == 16
    assert inference.model_kind(model) == "segmenter"


def test_missing_model_says_run_dvc_repro(tmp_path):
    with pytest.raises(BrainsegError, match=r"model\.keras.*dvc repro"):
        inference.load_model(tmp_path / "model.keras")


@pytest.mark.parametrize("content", ["garbage", "zip"])
def test_corrupt_model_names_the_file(tmp_path, content):
    path = tmp_path / "model.keras"
    if content == "zip":
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("config.json", "{not json")
    else:
        path.write_bytes(b"not a model")
    with pytest.raises(BrainsegError, match=str(path)):
        inference.load_model(path)


def test_lambda_layer_is_refused(tmp_path):
    path = tmp_path / "model.keras"
    inputs = keras.Input((8, 8, 3))
    keras.Model(inputs, keras.layers.Lambda(lambda x: x * 2)(inputs)).save(path)
    with pytest.raises(BrainsegError, match=f"{path}.*Lambda"):
        inference.load_model(path)


def test_predict_probs_resizes_to_native_and_batches():
    x = images(5, size=32)
    x[:, 8:24, 8:24, 1] = 255
    probs = inference.predict_probs(flair_model(16), x, batch_size=2)
    assert probs.shape == (5, 32, 32) and probs.dtype == np.float32
    assert probs[:, 10:22, 10:22].min() > 0.9 and probs[:, 26:, 26:].max() < 0.1
    one = inference.predict_probs(flair_model(16), x[0])
    assert one.shape == (1, 32, 32)


def test_tta_flip_averages_with_the_mirrored_prediction():
    x = images(3)
    model = left_model()
    plain = inference.predict_probs(model, x)
    mirrored = inference.predict_probs(model, x[:, :, ::-1])[:, :, ::-1]
    assert not np.allclose(plain, mirrored)
    assert np.allclose(inference.predict_probs(model, x, tta_flip=True), (plain + mirrored) / 2)


def test_tta_affine_averages_ten_views_each_taken_back_to_the_slice():
    x = np.zeros((2, 48, 48, 3), np.uint8)
    x[:, 14:30, 18:34, 1] = 255               # a bright FLAIR square off the centre
    model = flair_model()
    views = inference.test_time_views(tta_flip=True, tta_affine=True)
    assert len(views) == 10 and views[0] == (False, None) and views[1] == (True, None)
    per_view = inference.view_probs(model, x, views)
    plain = per_view[0]
    for probs in per_view[1:]:                # a pixelwise model: every view, warped back, finds the same square
        assert probs.shape == plain.shape
        assert probs[:, 17:27, 21:31].min() > 0.9 and probs[:, :8].max() < 0.1 and probs[:, 40:].max() < 0.1
    tta = inference.predict_probs(model, x, tta_flip=True, tta_affine=True)
    assert np.allclose(tta, np.mean(per_view, axis=0), atol=1e-6)
    assert not np.allclose(tta, plain, atol=1e-3)  # the warped views blur the square's edge a little
    assert np.allclose(inference.predict_probs(model, x, tta_affine=True),
                       np.mean([per_view[0], *per_view[2:6]], axis=0), atol=1e-6)  # without tta_flip: 5 views


def test_multi_output_model_uses_the_last_output():
    inputs = keras.Input((16, 16, 3))
    first = keras.layers.Conv2D(1, 1, activation="sigmoid", kernel_initializer="zeros", name="mask1")(inputs)
    second = keras.layers.Conv2D(1, 1, activation="sigmoid", kernel_initializer="zeros",
                                 bias_initializer=keras.initializers.Constant(2.0), name="mask2")(inputs)
    model = keras.Model(inputs, [first, second], name="doubleunet")
    assert inference.model_kind(model) == "segmenter"
    assert np.allclose(inference.predict_probs(model, images(2)), 1 / (1 + np.exp(-2.0)))


def test_classifier_gives_one_probability_per_slice():
    model = classifier()
    assert inference.model_kind(model) == "classifier"
    probs = inference.predict_probs(model, images(3, size=32), tta_flip=True)
    assert probs.shape == (3,)
    present, same = inference.segment(model, images(3, size=32), {"threshold": 0.5})
    assert present.shape == (3,) and present.dtype == bool and np.allclose(same, probs, atol=1e-6)


def test_segment_post_processes_with_params():
    x = images(2)
    x[:, 0, 0, 1] = 255                  # a stray bright pixel
    params = {"threshold": 0.5, "min_component": 5, "largest_3d": False, "tta_flip": False, "batch_size": 4}
    masks, probs = inference.segment(flair_model(), x, params)
    assert masks.dtype == bool and masks.shape == probs.shape == (2, 16, 16)
    assert not masks[:, 0, 0].any() and masks[:, 4:10, 5:9].all() and masks.sum() == 2 * 24


def test_a_volume_normalised_model_standardises_each_patient_on_its_own():
    from stages.models import build_model
    model = build_model("unet", (32, 32, 3), 4, input_norm="volume")
    assert preprocess.volume_normalised(model) and not preprocess.volume_normalised(build_model("unet", (32, 32, 3), 4))
    rng = np.random.default_rng(0)
    a = rng.integers(20, 250, (3, 32, 32, 3), dtype=np.uint8)
    b = (a // 3).astype(np.uint8)  # the same slices from a dimmer scanner
    both = np.concatenate([a, b])
    alone = inference.predict_probs(model, a, engine="keras")
    per_patient = inference.predict_probs(model, both, engine="keras", patients=["A"] * 3 + ["B"] * 3)
    assert np.allclose(per_patient[:3], alone, atol=1e-6)
    assert np.abs(per_patient[3:] - alone).max() < 0.05  # scale removed, up to the uint8 coding
    pooled = inference.predict_probs(model, both, engine="keras")  # one volume: A's statistics are mixed with B's
    assert not np.allclose(pooled[:3], alone, atol=1e-3)


@pytest.mark.parametrize("engine", ["keras", "litert"])
def test_a_slice_position_model_gets_each_slice_place_in_its_own_patients_volume(engine):
    from stages.models import build_model
    model = build_model("unet", (32, 32, 3), 4, input_norm="volume", slice_position=True)
    assert preprocess.slice_positioned(model) and not preprocess.slice_positioned(build_model("unet", (32, 32, 3), 4))
    images = np.random.default_rng(0).integers(20, 250, (5, 32, 32, 3), dtype=np.uint8)
    ids = ["A"] * 3 + ["B"] * 2
    probs = inference.predict_probs(model, images, engine=engine, patients=ids)
    x = np.concatenate([preprocess.standardise_volume(images[:3]), preprocess.standardise_volume(images[3:])])
    x = preprocess.add_position(x, [0, 0.5, 1, 0, 1])
    expected = keras.ops.convert_to_numpy(model(preprocess.to_model_input(x, 32)))[..., 0]
    assert np.allclose(probs, expected, atol=1e-5)
    # the same pixels placed elsewhere in the volume give another prediction: the position reaches the network
    moved = inference.predict_probs(model, images[::-1], engine=engine, patients=ids)[::-1]
    assert not np.allclose(moved, probs, atol=1e-4)


@pytest.mark.parametrize("engine", ["keras", "litert"])
def test_a_neighbours_model_gets_the_flair_of_the_slices_around_each_one_in_its_own_patients_volume(engine):
    from stages.models import build_model
    model = build_model("unet", (32, 32, 3), 4, input_norm="volume", neighbours=1)
    assert preprocess.neighbour_count(model) == 1
    assert preprocess.neighbour_count(build_model("unet", (32, 32, 3), 4)) == 0
    assert inference.lone_slice_note(model) == ("unet also uses the slices around it (train.neighbours), so a lone "
                                                "slice stands in for its own neighbours")
    assert inference.lone_slice_note(build_model("unet", (32, 32, 3), 4)) == ""
    images = np.random.default_rng(0).integers(20, 250, (5, 32, 32, 3), dtype=np.uint8)
    ids = ["A"] * 3 + ["B"] * 2
    probs = inference.predict_probs(model, images, engine=engine, patients=ids)
    x = np.concatenate([preprocess.standardise_volume(images[:3]), preprocess.standardise_volume(images[3:])])
    x = preprocess.add_neighbours(x, [[0, 1], [0, 2], [1, 2], [3, 4], [3, 4]])
    expected = keras.ops.convert_to_numpy(model(preprocess.to_model_input(x, 32)))[..., 0]
    assert np.allclose(probs, expected, atol=1e-5)
    flipped = inference.predict_probs(model, images, engine=engine, patients=ids, tta_flip=True)
    mirrored = keras.ops.convert_to_numpy(model(preprocess.to_model_input(x[:, :, ::-1], 32)))[..., 0][:, :, ::-1]
    assert np.allclose(flipped, 0.5 * (expected + mirrored), atol=1e-5)  # the neighbours are mirrored with the slice


def flair_members(biases, size=16):
    """Segmenters sigmoid(40 FLAIR - bias), one per bias: a lower bias calls fainter pixels tumour."""
    members = []
    for bias in biases:
        member = flair_model(size)
        member.get_layer("mask").set_weights([np.array([0.0, 40.0, 0.0]).reshape(1, 1, 3, 1), np.array([-bias])])
        members.append(member)
    return members


@pytest.mark.parametrize("engine", ["keras", "auto"])
def test_a_cascade_runs_the_other_members_only_on_slices_the_first_calls_tumour_somewhere_and_beside_them(engine):
    from stages.models import average

    x = images(6)
    for i, level in enumerate([0, 40, 80, 120, 160, 255]):
        x[i, 4:10, 5:9, 1] = level  # the FLAIR spot: only the last slice's reaches the first member's 0.5
    members = flair_members([30.0, 10.0, 10.0])
    ensemble = average(members)
    alone = [inference.predict_probs(m, x, engine="keras") for m in members]
    gated = alone[0].reshape(6, -1).max(axis=1) >= 0.5
    assert gated.tolist() == [False] * 5 + [True]

    before = inference.cascade_share(ensemble)
    probs = inference.predict_probs(ensemble, x, batch_size=4, engine=engine, cascade=0.5)
    assert np.subtract(inference.cascade_share(ensemble), before).tolist() == [6, 2]  # the last and its neighbour
    np.testing.assert_allclose(probs[:4], alone[0][:4], atol=1e-5)  # the first member's map stands
    np.testing.assert_allclose(probs[4:], np.mean([a[4:] for a in alone], axis=0), atol=1e-5)
    # a gate of 0 passes every slice on: the ensemble's own mean
    np.testing.assert_allclose(inference.predict_probs(ensemble, x, engine=engine, cascade=0.0),
                               inference.predict_probs(ensemble, x, engine="keras"), atol=1e-5)
    assert inference.predict_probs(ensemble, x[:0], engine=engine, cascade=0.5).shape == (0, 16, 16)
    if engine == "auto":
        from stages import engines

        assert all(engines.engine_in_use(part) == "litert" for part in inference.cascade_parts(ensemble)[:2])


def test_a_cascade_takes_the_neighbours_of_a_screened_slice_within_its_patient_only():
    screened = np.array([False, False, True, False, False, False])
    assert inference.with_neighbours(screened, np.array(["a"] * 3 + ["b"] * 3)).tolist() == \
        [False, True, True, False, False, False]
    assert inference.with_neighbours(screened).tolist() == [False, True, True, True, False, False]
    assert inference.with_neighbours(np.array([True])).tolist() == [True]


def test_a_cascade_leaves_one_network_and_a_classifier_ensemble_as_they_are():
    from stages.models import average

    x = images(4)
    one = flair_model(16)
    np.testing.assert_array_equal(inference.predict_probs(one, x, engine="keras", cascade=0.9),
                                  inference.predict_probs(one, x, engine="keras"))
    assert inference.cascade_parts(one) is None
    classifiers = average([classifier(), classifier()])
    assert inference.cascade_parts(classifiers) is None
    np.testing.assert_array_equal(inference.predict_probs(classifiers, x, engine="keras", cascade=0.9),
                                  inference.predict_probs(classifiers, x, engine="keras"))


@pytest.mark.parametrize("gate", [1.5, -0.1, "high", True])
def test_a_cascade_gate_that_is_not_a_probability_names_the_param(gate):
    with pytest.raises(BrainsegError, match=r"evaluate\.cascade.*params\.yaml"):
        inference.predict_probs(flair_model(16), images(2), engine="keras", cascade=gate)
