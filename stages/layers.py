"""The custom Keras layers of brainseg's models, each registered under the package name `brainseg`, so a saved
model names it and loads with safe_mode=True once this module is imported (stages.models and stages.inference
import it).

Two kinds: layers that prepare a slice inside the model, so training, evaluation, the predict CLI and the web app
feed it the same way (ReverseChannels, BrainStandardise, VolumeDecode, SplitPosition, SplitNeighbours, PlaneDecode;
inference looks for VolumeDecode, SplitPosition and SplitNeighbours to know what a model needs besides the slice),
and drop-in versions of stock Keras layers, the same function and weights, that TensorFlow computes faster
(FusedBatchNormalization, ConcatConv2D, BilinearUpSampling2D; `python -m benchmarks.training` measures them against
stock Keras).
"""
from __future__ import annotations

import itertools

import keras
from keras import layers, ops

from stages.preprocess import HEAD, Z_STEP, Z_ZERO


@keras.saving.register_keras_serializable(package="brainseg")
class ReverseChannels(layers.Layer):
    """RGB -> BGR, the channel order of keras' VGG ImageNet weights."""

    def call(self, x):
        return ops.flip(x, axis=-1)


@keras.saving.register_keras_serializable(package="brainseg")
class BrainStandardise(layers.Layer):
    """Per slice and channel, z-score the head pixels (any channel above `threshold`) and zero the rest.

    MRI intensities have no absolute scale: the same tissue is brighter or dimmer by scanner, institution and
    slice. Standardising inside the model puts every slice on one scale wherever the model is used (training,
    evaluation, the predict CLI, the web app) without a separate preprocessing step to keep in sync.
    """

    def __init__(self, threshold=10 / 255, **kwargs):
        super().__init__(**kwargs)
        self.threshold = float(threshold)

    def call(self, x):
        head = ops.cast(ops.max(x, axis=-1, keepdims=True) > self.threshold, x.dtype)
        count = ops.maximum(ops.sum(head, axis=(1, 2), keepdims=True), 1.0)
        mean = ops.sum(x * head, axis=(1, 2), keepdims=True) / count
        var = ops.sum(ops.square((x - mean) * head), axis=(1, 2), keepdims=True) / count
        return (x - mean) * ops.rsqrt(var + 1e-6) * head

    def get_config(self):
        return {**super().get_config(), "threshold": self.threshold}


@keras.saving.register_keras_serializable(package="brainseg")
class VolumeDecode(layers.Layer):
    """Inputs already standardised per patient volume by preprocess.standardise_volume (uint8 code / 255 in,
    z-scores out, non-head pixels 0). Its presence tells inference to standardise each volume first."""

    def call(self, x):
        # the coding's constants come from preprocess, so the two sides cannot drift apart
        head = ops.cast(ops.max(x, axis=-1, keepdims=True) > HEAD / 255, x.dtype)
        return (x * 255.0 - Z_ZERO) / Z_STEP * head


@keras.saving.register_keras_serializable(package="brainseg")
class SplitPosition(layers.Layer):
    """(H, W, 4) inputs -> the slice's three channels and the plane holding its place in the volume
    (preprocess.add_position). Its presence tells inference to add that plane."""

    def call(self, x):
        return x[..., :-1], x[..., -1:]


@keras.saving.register_keras_serializable(package="brainseg")
class SplitNeighbours(layers.Layer):
    """(H, W, 3 + 2*count) inputs -> the slice's three channels and the FLAIR planes of its `count` neighbours
    below and above (preprocess.add_neighbours). Its presence tells inference to add those planes."""

    def __init__(self, count=1, **kwargs):
        super().__init__(**kwargs)
        self.count = int(count)

    def call(self, x):
        return x[..., :3], x[..., 3:3 + 2 * self.count]

    def get_config(self):
        return {**super().get_config(), "count": self.count}


@keras.saving.register_keras_serializable(package="brainseg")
class PlaneDecode(layers.Layer):
    """VolumeDecode for single planes (a neighbour's FLAIR): each plane's coded head pixels back to z-scores,
    the rest 0, the head taken from the plane itself."""

    def call(self, x):
        head = ops.cast(x > HEAD / 255, x.dtype)
        return (x * 255.0 - Z_ZERO) / Z_STEP * head


@keras.saving.register_keras_serializable(package="brainseg")
class FusedBatchNormalization(layers.BatchNormalization):
    """keras.layers.BatchNormalization, the same weights and arithmetic, computed on TensorFlow by its fused
    kernel (one op forward, one backward) instead of Keras 3's dozen elementwise ops and reductions.

    tf.keras 2 used the fused kernel by default; Keras 3 does not, and on the CPU U-Net's thin layers those ops
    took a third of each training step (a tf.profiler trace; `python -m benchmarks.training` measures the gain).
    Other backends, masks, renorm, synchronised statistics and anything but channels-last 4D inputs take Keras'
    own path.
    """

    def call(self, inputs, training=None, mask=None):
        if (keras.backend.backend() != "tensorflow" or mask is not None or self.renorm or self.synchronized
                or len(inputs.shape) != 4 or list(self._reduction_axes) != [0, 1, 2]):
            return super().call(inputs, training=training, mask=mask)
        import tensorflow as tf

        # statistics in float32 as Keras' own layer does (its fused bfloat16 gradient is slow on oneDNN CPUs)
        x = tf.cast(inputs, tf.float32)
        channels = x.shape[-1]
        gamma = self.gamma if self.scale else tf.ones((channels,))
        beta = self.beta if self.center else tf.zeros((channels,))
        if training and self.trainable:
            y, mean, variance = tf.compat.v1.nn.fused_batch_norm(x, gamma, beta, epsilon=self.epsilon,
                                                                 is_training=True)[:3]
            # the kernel returns the unbiased variance; Keras' moving variance follows the biased one
            count = tf.cast(tf.size(x) // channels, tf.float32)
            variance = variance * (count - 1.0) / count
            self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
            self.moving_variance.assign(self.moving_variance * self.momentum + variance * (1.0 - self.momentum))
        else:
            y = tf.compat.v1.nn.fused_batch_norm(x, gamma, beta, mean=self.moving_mean,
                                                 variance=self.moving_variance, epsilon=self.epsilon,
                                                 is_training=False)[0]
        return tf.cast(y, self.compute_dtype)


@keras.saving.register_keras_serializable(package="brainseg")
class ConcatConv2D(layers.Conv2D):
    """keras.layers.Conv2D over the channel concatenation of a list of inputs, with the same kernel (its input
    channels in list order), computed on TensorFlow as the sum of each input's convolution with its slice of
    the kernel.

    A decoder stage convolves its upsampled map joined to the encoder's skips. TensorFlow's gradient of that
    join copies strided slices of the stage's widest tensors, and the join itself copies them once more; the
    sum has neither (`python -m benchmarks.training` measures the gain). Other backends join the inputs and
    convolve once, as Keras would: the GPU recipe runs on JAX, where the join's cost was not measured.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.input_spec = None  # a list of inputs; build checks their shapes

    @property
    def _channel_axis(self):
        return -1 if self.data_format == "channels_last" else 1

    def _joined(self, input_shapes):
        shape = list(input_shapes[0])
        shape[self._channel_axis] = sum(s[self._channel_axis] for s in input_shapes)
        return tuple(shape)

    def build(self, input_shape):
        if not isinstance(input_shape[0], (list, tuple)):
            raise ValueError(f"ConcatConv2D takes a list of inputs, got one of shape {input_shape}")
        self.channels = [int(s[self._channel_axis]) for s in input_shape]
        super().build(self._joined(input_shape))
        self.input_spec = None

    def compute_output_shape(self, input_shape):
        if isinstance(input_shape[0], (list, tuple)):
            input_shape = self._joined(input_shape)
        return super().compute_output_shape(input_shape)

    def convolution_op(self, inputs, kernel):
        if keras.backend.backend() != "tensorflow":
            return super().convolution_op(ops.concatenate(inputs, axis=self._channel_axis), kernel)
        # split, not sliced: the gradient of a split joins the small kernel pieces, a slice's pads each to full size
        bounds = list(itertools.accumulate(self.channels[:-1]))
        outputs = None
        for x, piece in zip(inputs, ops.split(kernel, bounds, axis=2)):
            y = super().convolution_op(x, piece)
            outputs = y if outputs is None else ops.add(outputs, y)
        return outputs


@keras.saving.register_keras_serializable(package="brainseg")
class BilinearUpSampling2D(layers.UpSampling2D):
    """keras.layers.UpSampling2D(interpolation="bilinear"), the same function, computed on TensorFlow in float32
    and cast back to the compute dtype plainly.

    Under mixed_bfloat16, Keras' layer goes through tf.image.resize, which saturates its float32 result back to
    bfloat16 with clip_by_value: elementwise ops and their gradients on the decoder's widest maps, an eighth of a
    training step's op time on a CPU with AMX (a tf.profiler trace; `python -m benchmarks.training` measures
    the gain). Bilinear interpolation mixes its inputs with weights that sum to 1, so it cannot leave their range
    and the clip never changes a value. In float32 the two are the same ops. Other backends, data formats and
    interpolations take Keras' own path.
    """

    def __init__(self, size=(2, 2), interpolation="bilinear", **kwargs):
        super().__init__(size, interpolation=interpolation, **kwargs)

    def call(self, inputs):
        if (keras.backend.backend() != "tensorflow" or self.interpolation != "bilinear"
                or self.data_format != "channels_last"):
            return super().call(inputs)
        import tensorflow as tf

        size = tf.shape(inputs)[1:3] * tf.constant(self.size, tf.int32)
        resized = tf.image.resize(tf.cast(inputs, tf.float32), size, method="bilinear")
        return tf.cast(resized, self.compute_dtype)
