import zipfile

import keras
import numpy as np
import pytest

from stages.layers import BilinearUpSampling2D, BrainStandardise, ConcatConv2D, FusedBatchNormalization, VolumeDecode
from stages.models import build_model


def test_brain_standardise_zscores_the_head_and_zeroes_the_background():
    rng = np.random.default_rng(0)
    x = np.zeros((2, 16, 16, 3), np.float32)
    x[:, 4:12, 4:12] = rng.uniform(0.2, 0.9, (2, 8, 8, 3))
    x[1] *= 0.3  # a dimmer scan of the same kind of slice
    out = keras.ops.convert_to_numpy(BrainStandardise()(x))
    head = out[:, 4:12, 4:12].reshape(2, -1, 3)
    np.testing.assert_allclose(head.mean(axis=1), 0, atol=1e-5)
    np.testing.assert_allclose(head.std(axis=1), 1, atol=1e-3)
    assert not out[:, :4].any() and not out[:, 12:].any()
    empty = keras.ops.convert_to_numpy(BrainStandardise()(np.zeros((1, 8, 8, 3), np.float32)))
    assert np.isfinite(empty).all() and not empty.any()


def test_volume_decode_gives_z_scores_inside_the_head_and_zero_outside():
    code = np.array([[0, 0, 0], [128, 160, 96], [5, 5, 200]], np.float32).reshape(1, 1, 3, 3) / 255
    z = np.asarray(VolumeDecode()(code))[0, 0]
    np.testing.assert_allclose(z, [[0, 0, 0], [0, 1, -1], [(5 - 128) / 32, (5 - 128) / 32, 72 / 32]], atol=1e-5)


def batch_norm_step(layer, x):
    """One training-mode pass of `layer` (gamma and beta set away from 1 and 0): its output, the gradients of a
    loss with respect to the input, gamma and beta, the moving statistics after it, and its inference output."""
    import tensorflow as tf

    layer.build(x.shape)
    layer.gamma.assign(np.linspace(0.5, 2.0, x.shape[-1]))
    layer.beta.assign(np.linspace(-1.0, 1.0, x.shape[-1]))
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True)
        loss = tf.reduce_sum(y * tf.sin(x))
    grads = tape.gradient(loss, [x, layer.gamma, layer.beta])
    return [np.asarray(v) for v in [y, *grads, layer.moving_mean, layer.moving_variance, layer(x, training=False)]]


@pytest.mark.parametrize("shape", [(4, 8, 8, 5), (1, 1, 1, 3), (6, 5)])
def test_fused_batch_normalization_computes_what_keras_own_layer_does(shape):
    """Same output, gradients and moving statistics (Keras' biased variance, not the kernel's unbiased one) in
    training, same output in inference; also for one value a channel (DoubleU-Net's pooled ASPP branch at batch
    1, where the kernel's unbiased variance divides by zero); a 2D input takes Keras' own path."""
    x = np.random.default_rng(0).normal(2.0, 3.0, shape).astype(np.float32)
    ours = batch_norm_step(FusedBatchNormalization(momentum=0.9), x)
    keras_own = batch_norm_step(keras.layers.BatchNormalization(momentum=0.9), x)
    for a, b in zip(ours, keras_own):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-5)
    # the moving mean took a tenth of the step towards the batch's mean (it starts at 0)
    np.testing.assert_allclose(ours[4], 0.1 * x.reshape(-1, shape[-1]).mean(axis=0), rtol=1e-4)


def test_fused_batch_normalization_runs_the_fused_kernel_on_tensorflow_only(monkeypatch):
    import tensorflow as tf

    layer = FusedBatchNormalization()
    layer.build((2, 4, 4, 3))
    graph = tf.function(lambda x: layer(x, training=True)).get_concrete_function(
        tf.TensorSpec((2, 4, 4, 3), tf.float32)).graph
    assert any(op.type.startswith("FusedBatchNorm") for op in graph.get_operations())
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")  # JAX / PyTorch: Keras' own arithmetic
    graph = tf.function(lambda x: layer(x, training=True)).get_concrete_function(
        tf.TensorSpec((2, 4, 4, 3), tf.float32)).graph
    assert not any(op.type.startswith("FusedBatchNorm") for op in graph.get_operations())


def concat_conv_step(inputs, kernel, bias, joined):
    """Output of a 3x3 convolution with bias and ReLU over the channel join of `inputs`, and the gradients of a
    loss with respect to every input, the kernel and the bias: by ConcatConv2D, or by Concatenate then Conv2D."""
    import tensorflow as tf

    if joined:
        join, conv = keras.layers.Concatenate(), keras.layers.Conv2D(kernel.shape[-1], 3, padding="same",
                                                                     activation="relu")
        conv.build(join.compute_output_shape([x.shape for x in inputs]))
        layer = lambda xs: conv(join(xs))  # noqa: E731
    else:
        conv = ConcatConv2D(kernel.shape[-1], 3, padding="same", activation="relu")
        conv.build([x.shape for x in inputs])
        layer = conv
    conv.kernel.assign(kernel)
    conv.bias.assign(bias)
    xs = [tf.constant(x) for x in inputs]
    with tf.GradientTape() as tape:
        tape.watch(xs)
        y = layer(xs)
        loss = tf.reduce_sum(y * tf.cos(y))
    grads = tape.gradient(loss, [*xs, conv.kernel, conv.bias])
    return [np.asarray(v) for v in [y, *grads]]


@pytest.mark.parametrize("channels", [(3, 5), (4, 2, 6)])
def test_concat_conv_computes_what_concatenate_then_conv2d_does(channels):
    rng = np.random.default_rng(0)
    inputs = [rng.normal(size=(2, 6, 6, c)).astype(np.float32) for c in channels]
    kernel = rng.normal(0.0, 0.1, size=(3, 3, sum(channels), 4)).astype(np.float32)
    bias = rng.normal(size=4).astype(np.float32)
    ours, keras_own = (concat_conv_step(inputs, kernel, bias, joined) for joined in (False, True))
    assert len(ours) == len(channels) + 3
    for a, b in zip(ours, keras_own):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_concat_conv_joins_nothing_on_tensorflow_and_joins_elsewhere(monkeypatch):
    import tensorflow as tf

    layer = ConcatConv2D(2, 3, padding="same")
    layer.build([(1, 4, 4, 3), (1, 4, 4, 2)])
    assert tuple(layer.kernel.shape) == (3, 3, 5, 2)
    spec = [tf.TensorSpec((1, 4, 4, 3)), tf.TensorSpec((1, 4, 4, 2))]

    def joins():
        """The 4D shapes that the traced step (output and gradients) joins tensors into."""
        def step(a, b):
            with tf.GradientTape() as tape:
                tape.watch([a, b])
                y = layer([a, b])
            return tape.gradient(y, [a, b, layer.kernel])
        graph = tf.function(step).get_concrete_function(*spec).graph
        assert any(op.type == "Conv2D" for op in graph.get_operations())
        shapes = {tuple(op.outputs[0].shape) for op in graph.get_operations() if op.type == "ConcatV2"}
        return {shape for shape in shapes if len(shape) == 4}  # not the small shape vectors

    assert joins() <= {(3, 3, 5, 2)}  # at most the kernel's gradient, from its pieces; never the inputs
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")  # there it joins and convolves once
    assert (1, 4, 4, 5) in joins()
    with pytest.raises(ValueError, match="takes a list of inputs"):
        ConcatConv2D(2, 3).build((1, 4, 4, 5))


def upsampling_step(layer, x, policy):
    """Output and input gradient of a loss through `layer` under a Keras dtype policy, in float32."""
    import tensorflow as tf

    keras.mixed_precision.set_global_policy(policy)
    try:
        layer = layer()
        x = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(tf.cast(x, layer.compute_dtype))
            loss = tf.reduce_sum(tf.cast(y, tf.float32) * tf.sin(tf.cast(y, tf.float32)))
        assert y.dtype == layer.compute_dtype
        return [np.asarray(tf.cast(v, tf.float32)) for v in (y, tape.gradient(loss, x))]
    finally:
        keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
@pytest.mark.parametrize("size", [2, (2, 3), 4])
def test_bilinear_upsampling_computes_what_keras_own_layer_does(policy, size):
    """The same map and gradient as UpSampling2D(interpolation="bilinear"), in float32 and in bfloat16 (values
    well outside [0, 1] too: nothing is clipped that Keras' layer would keep)."""
    x = np.random.default_rng(0).normal(0.0, 50.0, (2, 5, 7, 3)).astype(np.float32)
    ours = upsampling_step(lambda: BilinearUpSampling2D(size), x, policy)
    keras_own = upsampling_step(lambda: keras.layers.UpSampling2D(size, interpolation="bilinear"), x, policy)
    factors = (size, size) if isinstance(size, int) else size
    assert ours[0].shape == (2, 5 * factors[0], 7 * factors[1], 3)
    for a, b in zip(ours, keras_own):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_bilinear_upsampling_does_not_clip_its_bfloat16_result_on_tensorflow(monkeypatch):
    """Keras' layer saturates tf.image.resize's float32 result back to bfloat16 (Minimum and Maximum, and their
    gradients in training); this one casts plainly. Other backends take Keras' own path."""
    import tensorflow as tf

    def op_types(layer):
        spec = tf.TensorSpec((2, 4, 4, 3), tf.bfloat16)
        return {op.type for op in tf.function(layer).get_concrete_function(spec).graph.get_operations()}

    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        ours, keras_own = BilinearUpSampling2D(), keras.layers.UpSampling2D(interpolation="bilinear")
        assert "ResizeBilinear" in op_types(ours) and "ResizeBilinear" in op_types(keras_own)
        assert {"Minimum", "Maximum"} <= op_types(keras_own)
        assert not {"Minimum", "Maximum"} & op_types(ours)
        monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
        assert {"Minimum", "Maximum"} <= op_types(BilinearUpSampling2D())
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_models_saved_when_the_layers_lived_in_stages_models_still_load(tmp_path):
    """Models name each custom layer by its registered name (brainseg>...) and by the module that defined it; the
    layers moved from stages.models to stages.layers, and models saved before must load as they are."""
    model = build_model("unet", (32, 32, 3), filters=4, input_norm="volume", deep_supervision=True)
    model.save(tmp_path / "new.keras")
    with zipfile.ZipFile(tmp_path / "new.keras") as new, zipfile.ZipFile(tmp_path / "old.keras", "w") as old:
        for item in new.infolist():
            data = new.read(item)
            if item.filename == "config.json":
                config = data.decode()
                assert '"module": "stages.layers"' in config and '"registered_name": "brainseg>VolumeDecode"' in config
                data = config.replace('"module": "stages.layers"', '"module": "stages.models"').encode()
            old.writestr(item, data)
    loaded = keras.models.load_model(tmp_path / "old.keras", safe_mode=True)
    x = np.random.default_rng(0).random((2, 32, 32, 3), dtype=np.float32)
    for a, b in zip(keras.tree.flatten(model(x)), keras.tree.flatten(loaded(x))):
        np.testing.assert_allclose(a, b, atol=1e-6)
