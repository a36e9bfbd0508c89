import keras
import numpy as np
import pytest

from stages import engines, inference
from stages.common import BrainsegError
from tests.test_inference import flair_model, images, left_model


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
    assert engines.engine_in_use(model, "litert_int8") == "litert_int8"
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
    monkeypatch.setattr(engines, "INT8_MEASURED", ("doubleunet",))  # as if auto took int8 for it
    with pytest.warns(UserWarning, match="as litert_int8.*its float32 graph"):
        probs = inference.predict_probs(model, images(2, size=32))
    assert engines.engine_in_use(model) == "litert" and probs.shape == (2, 32, 32)


def test_int8_calibration_is_synthetic_volumes_as_the_network_takes_them():
    from stages.models import build_model

    model = build_model("unet", (32, 32, 3), 4, input_norm="volume")
    x = engines.calibration_inputs(model)
    c = engines.CALIBRATION
    assert x.shape == (c["patients"] * c["slices"] // c["every"], 32, 32, 3) and x.dtype == np.float32
    assert np.array_equal(x, engines.calibration_inputs(model))  # the same every time: the same graph
    from stages import preprocess, synthetic

    volume, _ = synthetic.make_volume(np.random.default_rng(c["seed"]), c["slices"])
    np.testing.assert_array_equal(x[0], preprocess.to_model_input(preprocess.standardise_volume(volume)[:1], 32)[0])


def test_litert_engine_takes_any_size_for_a_size_free_model():
    model = flair_model()
    for size in (16, 24):
        assert np.allclose(inference.predict_probs(model, images(3, size=size), engine="litert"),
                           inference.predict_probs(model, images(3, size=size), engine="keras"), atol=1e-5)


def test_auto_engine_is_litert_int8_on_cpu_for_float32_and_keras_for_mixed_precision(int8_cpu):
    assert engines.pick_engine(flair_model(16)) == "litert_int8"
    assert engines.pick_engine(flair_model(16), "litert") == "litert"
    assert engines.pick_engine(flair_model(16, name="resunet")) == "litert"  # int8 not measured on it
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        mixed = flair_model(16)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert engines.pick_engine(mixed) == "keras"
    with pytest.raises(BrainsegError, match="engine 'tpu'"):
        engines.pick_engine(mixed, "tpu")


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
    assert engines.int8_dot_product(cpuinfo) is expected


def test_auto_engine_keeps_the_float32_graph_on_a_cpu_without_int8_dot_products(monkeypatch):
    monkeypatch.setenv("BRAINSEG_INT8_DOT", "0")
    assert engines.pick_engine(flair_model(16)) == "litert"
    assert engines.pick_engine(flair_model(16), "litert_int8") == "litert_int8"  # asked for, it is given
    monkeypatch.setenv("BRAINSEG_INT8_DOT", "1")
    assert engines.pick_engine(flair_model(16)) == "litert_int8"


def test_auto_engine_is_keras_on_other_keras_backends(monkeypatch):
    """LiteRT's converter needs TensorFlow, which a JAX / PyTorch GPU machine may not have."""
    model = flair_model(16)
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    assert engines.pick_engine(model) == "keras" and engines.pick_engine(model, "litert") == "litert"
    assert engines.pick_engine(model, "litert_int8") == "litert_int8"


def test_auto_engine_falls_back_to_keras_when_litert_cannot_convert(monkeypatch):
    def refuse(model, int8=False):
        raise RuntimeError("unsupported op")

    monkeypatch.setattr(engines, "LiteRTRunner", refuse)
    model, x = flair_model(16), images(2)
    with pytest.warns(UserWarning, match="LiteRT cannot run"):
        probs = inference.predict_probs(model, x, engine="auto")
    assert engines.engine_in_use(model, "auto") == "keras"
    assert np.allclose(probs, inference.predict_probs(model, x, engine="keras"))
    for engine in ("litert", "litert_int8"):
        with pytest.raises(BrainsegError, match="evaluate.engine: keras"):
            inference.predict_probs(model, x, engine=engine)


def test_auto_engine_falls_back_from_int8_to_the_float32_graph(int8_cpu, monkeypatch):
    real = engines.LiteRTRunner

    def no_int8(model, int8=False):
        if int8:
            raise RuntimeError("failed to prepare")
        return real(model)

    monkeypatch.setattr(engines, "LiteRTRunner", no_int8)
    model, x = flair_model(16), images(2)
    with pytest.warns(UserWarning, match="as litert_int8.*its float32 graph"):
        probs = inference.predict_probs(model, x)
    assert engines.engine_in_use(model) == "litert"
    np.testing.assert_allclose(probs, inference.predict_probs(model, x, engine="keras"), atol=1e-5)


def test_converted_graph_is_cached_by_weights_and_survives_a_bad_cache(tmp_path, monkeypatch):
    """The CLI's next run reads the converted graph instead of converting again (~5 s); other weights are
    another graph; a garbage or unwritable cache costs a conversion, never a wrong or failed prediction."""
    monkeypatch.setenv("BRAINSEG_CACHE", str(tmp_path))
    cache = tmp_path / "litert"
    assert engines.cache_dir() == cache
    left_model().save(tmp_path / "model.keras")
    model, x = inference.load_model(tmp_path / "model.keras"), images(3)
    expected = inference.predict_probs(model, x, engine="keras")
    first = engines.LiteRTRunner(model)
    assert not first.cached and len(list(cache.glob("*.tflite"))) == 1
    again = engines.LiteRTRunner(model)
    batch = x.astype(np.float32) / 255
    assert again.cached and np.array_equal(again(batch), first(batch))

    int8 = engines.LiteRTRunner(model, int8=True)  # the quantised graph is another file
    assert not int8.cached and engines.LiteRTRunner(model, int8=True).cached
    assert len(list(cache.glob("*.tflite"))) == 2
    other = inference.load_model(tmp_path / "model.keras")  # the same architecture and names, other weights
    other.set_weights([w * 2 for w in model.get_weights()])
    assert not engines.LiteRTRunner(other).cached and len(list(cache.glob("*.tflite"))) == 3

    for cached in cache.glob("*.tflite"):
        cached.write_bytes(b"not a flatbuffer")
    fresh = inference.load_model(tmp_path / "model.keras")  # a new model object, as in the CLI's next run
    assert np.allclose(inference.predict_probs(fresh, x, engine="litert"), expected, atol=1e-5)
    assert engines.LiteRTRunner(model).cached  # the garbage was replaced by the graph
    assert not engines.LiteRTRunner(other).cached and engines.LiteRTRunner(other).cached

    blocked = tmp_path / "file"
    blocked.write_text("a file where the cache folder would be")
    runner = engines.LiteRTRunner(model, blocked / "litert")
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
