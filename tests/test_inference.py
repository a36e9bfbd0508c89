import zipfile

import keras
import numpy as np
import pytest

from stages import inference
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
    assert model.name == "unet" and inference.input_size(model) == 16
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


@pytest.mark.parametrize("name, options", [("unet", {}), ("doubleunet", {}), ("cnn", {}),
                                           ("unet", {"attention": True, "dropout": 0.3, "deep_supervision": True}),
                                           ("resunet", {"norm": "instance"})])
def test_litert_engine_matches_keras(name, options):
    from stages.models import build_model

    keras.utils.set_random_seed(1)
    model = build_model(name, (32, 32, 3), 4, **options)
    x = images(5, size=48)
    keras_probs = inference.predict_probs(model, x, batch_size=2, engine="keras", tta_flip=True)
    lite_probs = inference.predict_probs(model, x, batch_size=2, engine="litert", tta_flip=True)
    assert lite_probs.shape == keras_probs.shape
    assert np.abs(lite_probs - keras_probs).max() < 1e-4
    assert lite_probs.std() > 1e-4  # not a constant map that any output would match


@pytest.mark.parametrize("name", ["unet", "cnn"])
def test_litert_int8_engine_stays_close_to_float32_and_ignores_the_rest_of_its_batch(name):
    """Weights and activations in int8, the activations' ranges fixed once (on synthetic volumes), so a slice's
    prediction is the same whatever else shares its batch."""
    from stages.models import build_model

    keras.utils.set_random_seed(1)
    model = build_model(name, (32, 32, 3), 4)
    x = images(6, size=48)
    float32 = inference.predict_probs(model, x, batch_size=6, engine="litert")
    int8 = inference.predict_probs(model, x, batch_size=6, engine="litert_int8")
    assert inference.engine_in_use(model, "litert_int8") == "litert_int8"
    assert int8.shape == float32.shape and not np.array_equal(int8, float32)  # another graph ran
    assert np.abs(int8 - float32).max() < 0.05 and np.abs(int8 - float32).mean() < 0.01
    alone = np.concatenate([inference.predict_probs(model, x[i:i + 1], engine="litert_int8") for i in range(6)])
    np.testing.assert_array_equal(alone, int8)


def test_a_graph_litert_cannot_run_fails_when_made_with_a_fix_to_name_or_auto_falls_back(int8_cpu, monkeypatch):
    """XNNPACK cannot prepare doubleunet's int8 graph: the runner says so at once, not mid-evaluation. Its
    squeeze-and-excite blocks are what XNNPACK refuses, for some weights' ranges: three of them with these weights
    (seed 1) fail as doubleunet does, in a second instead of a minute."""
    from keras import layers

    from stages.models import squeeze_excite

    keras.utils.set_random_seed(1)
    inputs = x = keras.Input((32, 32, 3))
    for _ in range(3):
        x = squeeze_excite(layers.Conv2D(8, 3, padding="same")(x))
    model = keras.Model(inputs, layers.Conv2D(1, 1, activation="sigmoid")(x), name="doubleunet")
    with pytest.raises(BrainsegError, match="cannot run on LiteRT.*evaluate.engine: keras"):
        inference.predict_probs(model, images(2, size=32), engine="litert_int8")
    monkeypatch.setattr(inference, "INT8_MEASURED", ("doubleunet",))  # as if auto took int8 for it
    with pytest.warns(UserWarning, match="as litert_int8.*its float32 graph"):
        probs = inference.predict_probs(model, images(2, size=32))
    assert inference.engine_in_use(model) == "litert" and probs.shape == (2, 32, 32)


def test_int8_calibration_is_synthetic_volumes_as_the_network_takes_them():
    from stages.models import build_model

    model = build_model("unet", (32, 32, 3), 4, input_norm="volume")
    x = inference.calibration_inputs(model)
    c = inference.CALIBRATION
    assert x.shape == (c["patients"] * c["slices"] // c["every"], 32, 32, 3) and x.dtype == np.float32
    assert np.array_equal(x, inference.calibration_inputs(model))  # the same every time: the same graph
    from stages import preprocess, synthetic

    volume, _ = synthetic.make_volume(np.random.default_rng(c["seed"]), c["slices"])
    np.testing.assert_array_equal(x[0], preprocess.to_model_input(preprocess.standardise_volume(volume)[:1], 32)[0])


def test_litert_engine_takes_any_size_for_a_size_free_model():
    model = flair_model()
    for size in (16, 24):
        assert np.allclose(inference.predict_probs(model, images(3, size=size), engine="litert"),
                           inference.predict_probs(model, images(3, size=size), engine="keras"), atol=1e-5)


def test_auto_engine_is_litert_int8_on_cpu_for_float32_and_keras_for_mixed_precision(int8_cpu):
    assert inference.pick_engine(flair_model(16)) == "litert_int8"
    assert inference.pick_engine(flair_model(16), "litert") == "litert"
    assert inference.pick_engine(flair_model(16, name="resunet")) == "litert"  # int8 not measured on it
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        mixed = flair_model(16)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert inference.pick_engine(mixed) == "keras"
    with pytest.raises(BrainsegError, match="engine 'tpu'"):
        inference.pick_engine(mixed, "tpu")


AVX2 = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 fma\n"


@pytest.mark.parametrize("cpuinfo, expected", [
    (AVX2, False),
    (AVX2.replace("fma", "fma avx512f avx512_vnni"), True),
    (AVX2.replace("fma", "fma avx_vnni"), True),
    (AVX2.replace("fma", "fma amx_bf16 amx_int8 amx_tile"), True),
    ("processor\t: 0\nFeatures\t: fp asimd crc32 atomics asimddp\n", True),  # Arm with dotprod
    ("processor\t: 0\nFeatures\t: fp asimd crc32\n", False),
    ("", True),  # nothing to go on: assumed, as before
], ids=["avx2", "avx512_vnni", "avx_vnni", "amx", "arm-dotprod", "arm", "unknown"])
def test_int8_dot_products_are_read_from_cpuinfo(cpuinfo, expected):
    assert inference.int8_dot_product(cpuinfo) is expected


def test_auto_engine_keeps_the_float32_graph_on_a_cpu_without_int8_dot_products(monkeypatch):
    monkeypatch.setenv("BRAINSEG_INT8_DOT", "0")
    assert inference.pick_engine(flair_model(16)) == "litert"
    assert inference.pick_engine(flair_model(16), "litert_int8") == "litert_int8"  # asked for, it is given
    monkeypatch.setenv("BRAINSEG_INT8_DOT", "1")
    assert inference.pick_engine(flair_model(16)) == "litert_int8"


def test_auto_engine_is_keras_on_other_keras_backends(monkeypatch):
    """LiteRT's converter needs TensorFlow, which a JAX / PyTorch GPU machine may not have."""
    model = flair_model(16)
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    assert inference.pick_engine(model) == "keras" and inference.pick_engine(model, "litert") == "litert"
    assert inference.pick_engine(model, "litert_int8") == "litert_int8"


def test_auto_engine_falls_back_to_keras_when_litert_cannot_convert(monkeypatch):
    def refuse(model, int8=False):
        raise RuntimeError("unsupported op")

    monkeypatch.setattr(inference, "LiteRTRunner", refuse)
    model, x = flair_model(16), images(2)
    with pytest.warns(UserWarning, match="LiteRT cannot run"):
        probs = inference.predict_probs(model, x, engine="auto")
    assert inference.engine_in_use(model, "auto") == "keras"
    assert np.allclose(probs, inference.predict_probs(model, x, engine="keras"))
    for engine in ("litert", "litert_int8"):
        with pytest.raises(BrainsegError, match="evaluate.engine: keras"):
            inference.predict_probs(model, x, engine=engine)


def test_auto_engine_falls_back_from_int8_to_the_float32_graph(int8_cpu, monkeypatch):
    real = inference.LiteRTRunner

    def no_int8(model, int8=False):
        if int8:
            raise RuntimeError("failed to prepare")
        return real(model)

    monkeypatch.setattr(inference, "LiteRTRunner", no_int8)
    model, x = flair_model(16), images(2)
    with pytest.warns(UserWarning, match="as litert_int8.*its float32 graph"):
        probs = inference.predict_probs(model, x)
    assert inference.engine_in_use(model) == "litert"
    np.testing.assert_allclose(probs, inference.predict_probs(model, x, engine="keras"), atol=1e-5)


def test_converted_graph_is_cached_by_weights_and_survives_a_bad_cache(tmp_path, monkeypatch):
    """The CLI's next run reads the converted graph instead of converting again (~5 s); other weights are
    another graph; a garbage or unwritable cache costs a conversion, never a wrong or failed prediction."""
    monkeypatch.setenv("BRAINSEG_CACHE", str(tmp_path))
    cache = tmp_path / "litert"
    assert inference.cache_dir() == cache
    left_model().save(tmp_path / "model.keras")
    model, x = inference.load_model(tmp_path / "model.keras"), images(3)
    expected = inference.predict_probs(model, x, engine="keras")
    first = inference.LiteRTRunner(model)
    assert not first.cached and len(list(cache.glob("*.tflite"))) == 1
    again = inference.LiteRTRunner(model)
    batch = x.astype(np.float32) / 255
    assert again.cached and np.array_equal(again(batch), first(batch))

    int8 = inference.LiteRTRunner(model, int8=True)  # the quantised graph is another file
    assert not int8.cached and inference.LiteRTRunner(model, int8=True).cached
    assert len(list(cache.glob("*.tflite"))) == 2
    other = inference.load_model(tmp_path / "model.keras")  # the same architecture and names, other weights
    other.set_weights([w * 2 for w in model.get_weights()])
    assert not inference.LiteRTRunner(other).cached and len(list(cache.glob("*.tflite"))) == 3

    for cached in cache.glob("*.tflite"):
        cached.write_bytes(b"not a flatbuffer")
    fresh = inference.load_model(tmp_path / "model.keras")  # a new model object, as in the CLI's next run
    assert np.allclose(inference.predict_probs(fresh, x, engine="litert"), expected, atol=1e-5)
    assert inference.LiteRTRunner(model).cached  # the garbage was replaced by the graph
    assert not inference.LiteRTRunner(other).cached and inference.LiteRTRunner(other).cached

    blocked = tmp_path / "file"
    blocked.write_text("a file where the cache folder would be")
    runner = inference.LiteRTRunner(model, blocked / "litert")
    assert not runner.cached and np.array_equal(runner(batch), first(batch))


def test_jax_batches_are_padded_to_a_power_of_two_without_changing_predictions(monkeypatch):
    """XLA compiles once per batch shape; padding keeps the shapes few and drops the blank rows again."""
    model = flair_model(16)
    x = images(3, size=16)
    plain = inference.predict_probs(model, x, engine="keras")
    shapes = []
    predict = model.predict_on_batch
    monkeypatch.setattr(model, "predict_on_batch", lambda batch: shapes.append(len(batch)) or predict(batch))
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    padded = inference.predict_probs(model, x, engine="keras")
    assert shapes == [4] and padded.shape == plain.shape and np.allclose(padded, plain, atol=1e-6)
    shapes.clear()
    inference.predict_probs(model, images(5, size=16), batch_size=4, engine="keras")
    assert shapes == [4, 1]


def test_a_volume_normalised_model_standardises_each_patient_on_its_own():
    from stages.models import build_model
    model = build_model("unet", (32, 32, 3), 4, input_norm="volume")
    assert inference.volume_normalised(model) and not inference.volume_normalised(build_model("unet", (32, 32, 3), 4))
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
    from stages import preprocess
    from stages.models import build_model
    model = build_model("unet", (32, 32, 3), 4, input_norm="volume", slice_position=True)
    assert inference.slice_positioned(model) and not inference.slice_positioned(build_model("unet", (32, 32, 3), 4))
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
    from stages import preprocess
    from stages.models import build_model
    model = build_model("unet", (32, 32, 3), 4, input_norm="volume", neighbours=1)
    assert inference.neighbour_count(model) == 1 and inference.neighbour_count(build_model("unet", (32, 32, 3), 4)) == 0
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
