import keras
import numpy as np
import pytest

from stages.common import BrainsegError
from stages.models import CLASSIFIERS, SEGMENTERS, build_model
from stages.train import compile_model

CFG = {"loss": "focal_tversky", "learning_rate": 1e-3, "lr_schedule": "constant", "epochs": 1}


def all_layers(model):
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from all_layers(layer)


def check_outputs(model, size):
    if model.name in CLASSIFIERS:
        assert [tuple(o.shape) for o in model.outputs] == [(None, 1)]
    else:
        outputs = 2 if model.name == "doubleunet" else 1
        assert [tuple(o.shape) for o in model.outputs] == [(None, size, size, 1)] * outputs
    assert all(o.dtype == "float32" for o in model.outputs)


@pytest.mark.parametrize("name", SEGMENTERS + CLASSIFIERS)
def test_builds_at_seed_size_without_lambda_layers(name):
    model = build_model(name, (256, 256, 3), filters=16)
    print(f"{name}: {model.count_params():,} parameters at 256x256x3, filters=16")
    assert model.name == name
    check_outputs(model, 256)
    assert not any(isinstance(layer, keras.layers.Lambda) for layer in all_layers(model))


@pytest.mark.parametrize("name", SEGMENTERS + CLASSIFIERS)
def test_trains_one_step_and_reloads_in_safe_mode_with_same_predictions(name, tmp_path):
    model = compile_model(build_model(name, (64, 64, 3), filters=4), CFG)
    model.run_eagerly = True  # tracing the big graphs costs a minute each on 2 cores; test_train covers fit()
    check_outputs(model, 64)
    rng = np.random.default_rng(0)
    x = rng.random((2, 64, 64, 3), dtype=np.float32)
    mask = (rng.random((2, 64, 64, 1)) > 0.7).astype(np.float32)
    y = np.array([[1.0], [0.0]], np.float32) if name in CLASSIFIERS else mask
    logs = model.train_on_batch(x, [y, y] if name == "doubleunet" else y, return_dict=True)
    assert np.isfinite(logs["loss"])

    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    assert loaded.name == name
    for before, after in zip(keras.tree.flatten(model(x, training=False)),
                             keras.tree.flatten(loaded(x, training=False))):
        np.testing.assert_allclose(before, after, atol=1e-5)


def test_output_stays_float32_under_mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = build_model("unet", (32, 32, 3), filters=2)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert model.layers[1].compute_dtype == "float16"
    assert model.outputs[0].dtype == "float32"


def test_safe_mode_refuses_a_lambda_layer(tmp_path):
    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, keras.layers.Lambda(lambda x: x * 2.0)(inputs))
    model.save(tmp_path / "lambda.keras")
    with pytest.raises(ValueError, match="(?i)lambda"):
        keras.models.load_model(tmp_path / "lambda.keras", safe_mode=True)


@pytest.mark.parametrize("name, shape", [("unet", (72, 72, 3)), ("efficientunet", (48, 48, 3)), ("unet", (64, 64, 1))])
def test_rejects_input_shapes_the_architecture_cannot_take(name, shape):
    with pytest.raises(BrainsegError, match="multiples of"):
        build_model(name, shape)


def test_rejects_unknown_model_name():
    with pytest.raises(BrainsegError, match="model 'vnet'"):
        build_model("vnet", (64, 64, 3))


@pytest.mark.parametrize("norm, layer", [("slice", "standardise"), ("volume", "volume_decode")])
def test_input_norm_model_reloads_in_safe_mode(tmp_path, norm, layer):
    model = build_model("unet", (32, 32, 3), filters=4, input_norm=norm)
    assert model.get_layer(layer) is not None
    x = np.random.default_rng(1).random((2, 32, 32, 3), dtype=np.float32)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras", safe_mode=True)
    np.testing.assert_allclose(model(x), loaded(x), atol=1e-6)
    with pytest.raises(BrainsegError, match="input_norm"):
        build_model("unet", (32, 32, 3), filters=4, input_norm="patient")


def test_slice_position_model_normalises_only_the_slice_and_reloads_in_safe_mode(tmp_path):
    model = build_model("unet", (32, 32, 3), filters=4, input_norm="volume", slice_position=True)
    assert model.input_shape == (None, 32, 32, 4)
    x = np.random.default_rng(1).random((2, 32, 32, 4), dtype=np.float32)
    split = keras.Model(model.input, model.get_layer("with_position").output)(x)
    decode = keras.ops.convert_to_numpy(model.get_layer("volume_decode")(x[..., :3]))
    np.testing.assert_allclose(split[..., :3], decode, atol=1e-6)
    np.testing.assert_allclose(split[..., 3], x[..., 3], atol=1e-6)  # the position is passed on as it came
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras", safe_mode=True)
    np.testing.assert_allclose(model(x), loaded(x), atol=1e-6)
    with pytest.raises(BrainsegError, match="slice_position works with unet, resunet, cnn"):
        build_model("efficientunet", (32, 32, 3), filters=4, slice_position=True)


def test_neighbours_model_decodes_the_neighbour_planes_on_their_own_and_reloads_in_safe_mode(tmp_path):
    from stages.layers import PlaneDecode
    model = build_model("unet", (32, 32, 3), filters=4, input_norm="volume", slice_position=True, neighbours=1)
    assert model.input_shape == (None, 32, 32, 6)  # slice, FLAIR below and above, position
    x = np.random.default_rng(2).random((2, 32, 32, 6), dtype=np.float32)
    x[0, :4, :, 3] = 0  # background in a neighbour only: it must not blank the slice's own head
    joined = keras.Model(model.input, model.get_layer("with_position").output)(x)
    decode = keras.ops.convert_to_numpy(model.get_layer("volume_decode")(x[..., :3]))
    np.testing.assert_allclose(joined[..., :3], decode, atol=1e-6)
    np.testing.assert_allclose(joined[..., 3:5], keras.ops.convert_to_numpy(PlaneDecode()(x[..., 3:5])), atol=1e-6)
    assert np.all(np.asarray(joined)[0, :4, :, 3] == 0) and np.all(np.asarray(joined)[0, :4, :, :3] != 0)
    np.testing.assert_allclose(joined[..., 5], x[..., 5], atol=1e-6)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras", safe_mode=True)
    np.testing.assert_allclose(model(x), loaded(x), atol=1e-6)
    assert build_model("cnn", (32, 32, 3), filters=4, neighbours=2).input_shape == (None, 32, 32, 7)
    with pytest.raises(BrainsegError, match="neighbours works with unet, resunet, cnn"):
        build_model("doubleunet", (32, 32, 3), filters=4, neighbours=1)
    with pytest.raises(BrainsegError, match="neighbours needs train.input_norm volume or none"):
        build_model("unet", (32, 32, 3), filters=4, input_norm="slice", neighbours=1)


def test_segmenters_normalise_with_the_fused_layer():
    from stages.layers import FusedBatchNormalization
    for name in ("unet", "resunet"):
        norms = [layer for layer in build_model(name, (32, 32, 3), filters=4).layers
                 if isinstance(layer, keras.layers.BatchNormalization)]
        assert norms and all(isinstance(layer, FusedBatchNormalization) for layer in norms)


@pytest.mark.parametrize("name", ["unet", "resunet", "doubleunet"])
def test_bn_momentum_reaches_every_own_normalisation_and_the_saved_model(name, tmp_path):
    """doubleunet too: its VGG19 encoder has no normalisation of its own (efficientunet's encoder keeps its 0.99)."""
    def momenta(model):
        return {layer.momentum for layer in all_layers(model) if isinstance(layer, keras.layers.BatchNormalization)}

    model = build_model(name, (64, 64, 3), 4, bn_momentum=0.9)
    assert momenta(model) == {0.9}
    model.save(tmp_path / "m.keras")
    assert momenta(keras.saving.load_model(tmp_path / "m.keras", safe_mode=True)) == {0.9}
    assert momenta(build_model(name, (64, 64, 3), 4)) == {0.99}  # Keras' default again for the next build


@pytest.mark.parametrize("momentum", [1.0, -0.1])
def test_bn_momentum_outside_zero_one_names_the_setting(momentum):
    with pytest.raises(BrainsegError, match="train.bn_momentum"):
        build_model("unet", (64, 64, 3), 4, bn_momentum=momentum)


@pytest.mark.parametrize("name", ["unet", "resunet"])
def test_instance_norm_replaces_every_batch_norm_and_normalises_each_slice_alone(name, tmp_path):
    model = build_model(name, (32, 32, 3), 4, norm="instance", deep_supervision=True)
    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.GroupNormalization)]
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers)
    assert len(norms) == len([layer for layer in build_model(name, (32, 32, 3), 4).layers
                              if isinstance(layer, keras.layers.BatchNormalization)])
    # instance normalisation: one group per channel
    assert all(layer.groups == layer.input.shape[-1] for layer in norms)
    x = np.random.default_rng(0).random((4, 32, 32, 3)).astype("float32")
    # in training, batch normalisation mixes the batch's slices; instance normalisation treats each on its own
    alone = keras.ops.convert_to_numpy(model(x[:1], training=True)[-1])
    together = keras.ops.convert_to_numpy(model(x, training=True)[-1])[:1]
    assert np.allclose(alone, together, atol=1e-5) and alone.std() > 1e-4
    batch = build_model(name, (32, 32, 3), 4)
    assert not np.allclose(keras.ops.convert_to_numpy(batch(x[:1], training=True)),
                           keras.ops.convert_to_numpy(batch(x, training=True))[:1], atol=1e-3)
    model.save(tmp_path / "m.keras")
    reloaded = keras.saving.load_model(tmp_path / "m.keras", safe_mode=True)
    assert np.allclose(keras.ops.convert_to_numpy(reloaded(x)[-1]), keras.ops.convert_to_numpy(model(x)[-1]))


@pytest.mark.parametrize("name, norm, match", [("unet", "layer", "train.norm 'layer'"),
                                               ("doubleunet", "instance", "train.norm=batch")])
def test_norm_names_the_setting_when_unknown_or_on_another_model(name, norm, match):
    with pytest.raises(BrainsegError, match=match):
        build_model(name, (64, 64, 3), 4, norm=norm)


@pytest.mark.parametrize("name", ["unet", "resunet", "doubleunet"])
def test_segmenters_are_the_same_network_as_plain_keras_builds_it(name):
    """plain_keras() builds from stock layers only (benchmarks.training's baseline); with the same seed the
    pipeline's layers hold the same weights and compute the same maps."""
    from stages.layers import BilinearUpSampling2D, ConcatConv2D, FusedBatchNormalization
    from stages.models import BATCH_NORM, BILINEAR_UP, CONCAT_CONV, plain_keras

    def built(plain):
        keras.utils.set_random_seed(0)
        if not plain:
            return build_model(name, (32, 32, 3), filters=4)
        with plain_keras():
            return build_model(name, (32, 32, 3), filters=4)

    ours, plain = built(False), built(True)
    # the swap is undone
    assert (BATCH_NORM, CONCAT_CONV, BILINEAR_UP) == (FusedBatchNormalization, ConcatConv2D, BilinearUpSampling2D)
    kinds = lambda model: {type(layer) for layer in all_layers(model)}  # noqa: E731
    ours_only = {ConcatConv2D, FusedBatchNormalization, BilinearUpSampling2D}
    assert ours_only <= kinds(ours)
    assert not ours_only & kinds(plain)
    assert keras.layers.UpSampling2D in kinds(plain)
    assert keras.layers.Concatenate in kinds(plain)
    assert keras.layers.Concatenate not in kinds(ours) or name == "doubleunet"  # its ASPP joins branches
    assert [w.shape for w in ours.weights] == [w.shape for w in plain.weights]
    for a, b in zip(ours.get_weights(), plain.get_weights()):
        np.testing.assert_array_equal(a, b)
    x = np.random.default_rng(0).random((2, 32, 32, 3), dtype=np.float32)
    for a, b in zip(keras.tree.flatten(ours(x, training=False)), keras.tree.flatten(plain(x, training=False))):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("name", ["unet", "resunet"])
def test_deep_supervision_adds_upsampled_heads_before_the_mask_of_the_same_network(name):
    keras.utils.set_random_seed(0)
    plain = build_model(name, (64, 64, 3), 4)
    keras.utils.set_random_seed(0)
    supervised = build_model(name, (64, 64, 3), 4, deep_supervision=True)
    assert supervised.output_names == ["aux_4", "aux_2", "mask"]
    assert all(output.shape == (None, 64, 64, 1) for output in supervised.outputs)
    assert supervised.count_params() == plain.count_params() + (16 + 1) + (8 + 1)  # 1x1 heads on 16 and 8 channels
    x = np.random.default_rng(0).uniform(size=(2, 64, 64, 3)).astype("float32")
    quarter = keras.Model(supervised.input, supervised.get_layer("aux_4_head").output).predict_on_batch(x)
    aux_4, _, mask = supervised.predict_on_batch(x)
    assert quarter.shape == (2, 16, 16, 1) and np.allclose(aux_4, keras.ops.image.resize(quarter, (64, 64)),
                                                             atol=1e-6)
    plain.set_weights([w for layer in supervised.layers if not layer.name.startswith("aux_")
                       for w in layer.get_weights()])
    assert np.allclose(mask, plain.predict_on_batch(x), atol=1e-6)  # the prediction is the plain network's


@pytest.mark.parametrize("name", ["efficientunet", "doubleunet", "cnn"])
def test_deep_supervision_leaves_models_without_a_plain_decoder_as_they_are(name):
    """params.yaml turns it on for every model, so `dvc exp run -S model=...` must still build the others."""
    keras.utils.set_random_seed(0)
    plain = build_model(name, (64, 64, 3), 4)
    keras.utils.set_random_seed(0)
    supervised = build_model(name, (64, 64, 3), 4, deep_supervision=True)
    assert supervised.output_names == plain.output_names and supervised.count_params() == plain.count_params()


@pytest.mark.parametrize("name", ["unet", "resunet"])
def test_bottleneck_dropout_drops_whole_maps_in_training_only_and_survives_saving(name, tmp_path):
    model = build_model(name, (32, 32, 3), 4, dropout=0.5)
    layer = model.get_layer("bottleneck_dropout")
    assert isinstance(layer, keras.layers.SpatialDropout2D) and layer.rate == 0.5
    maps = np.ones((1, 2, 2, 64), np.float32)
    dropped = keras.ops.convert_to_numpy(layer(maps, training=True))
    # every map is either dropped whole or kept whole (scaled by 1 / (1 - rate))
    assert set(np.unique(dropped)) <= {0.0, 2.0} and (dropped == 0).any() and (dropped == 2).any()
    assert np.all(dropped == dropped[:, :1, :1, :])
    x = np.random.default_rng(0).random((2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_array_equal(model.predict(x, verbose=0), model.predict(x, verbose=0))
    model.save(tmp_path / "m.keras")
    assert keras.saving.load_model(tmp_path / "m.keras", safe_mode=True).get_layer("bottleneck_dropout").rate == 0.5
    assert "bottleneck_dropout" not in [layer.name for layer in build_model(name, (32, 32, 3), 4).layers]


def test_dropout_outside_its_range_or_models_names_the_setting():
    with pytest.raises(BrainsegError, match="train.dropout"):
        build_model("unet", (64, 64, 3), 4, dropout=1.0)
    with pytest.raises(BrainsegError, match="train.dropout=0"):
        build_model("cnn", (64, 64, 3), 4, dropout=0.3)


@pytest.mark.parametrize("name, gates", [("unet", 4), ("resunet", 4)])
def test_attention_gates_every_skip_and_survives_saving(name, gates, tmp_path):
    model = build_model(name, (32, 32, 3), 4, attention=True, deep_supervision=True)
    multiplies = [layer for layer in model.layers if isinstance(layer, keras.layers.Multiply)]
    assert len(multiplies) == gates
    assert model.count_params() > build_model(name, (32, 32, 3), 4, deep_supervision=True).count_params()
    x = np.random.default_rng(0).random((2, 32, 32, 3)).astype(np.float32)
    model.save(tmp_path / "m.keras")
    again = keras.saving.load_model(tmp_path / "m.keras", safe_mode=True)
    np.testing.assert_allclose(again.predict(x, verbose=0)[-1], model.predict(x, verbose=0)[-1], atol=1e-6)


@pytest.mark.parametrize("bias, kept", [(-30.0, 0.0), (30.0, 1.0)])
def test_attention_gate_weights_the_skip_by_its_sigmoid(bias, kept):
    from stages.models import attention_gate
    skip, gate = keras.Input((8, 8, 4)), keras.Input((8, 8, 6))
    model = keras.Model([skip, gate], attention_gate(skip, gate))
    weight_conv = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)][-1]
    kernel, _ = weight_conv.get_weights()
    weight_conv.set_weights([np.zeros_like(kernel), np.full((1,), bias, np.float32)])
    rng = np.random.default_rng(1)
    s, g = rng.random((1, 8, 8, 4)).astype(np.float32), rng.random((1, 8, 8, 6)).astype(np.float32)
    np.testing.assert_allclose(model.predict([s, g], verbose=0), kept * s, atol=1e-6)


def test_attention_on_another_model_names_the_setting():
    with pytest.raises(BrainsegError, match="train.attention=false"):
        build_model("cnn", (64, 64, 3), 4, attention=True)
