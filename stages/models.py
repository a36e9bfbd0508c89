"""Model architectures: four tumour segmenters and two tumour/no-tumour slice classifiers.

Every model takes float32 (H, W, 3) slices in [0, 1] (stages.preprocess.to_model_input) and ends in a
float32 sigmoid, so mixed precision never reaches the probabilities. Segmenters output an (H, W, 1) tumour
probability map; `doubleunet` outputs [mask1, mask2] and its prediction is mask2, and with deep supervision unet
and resunet output [aux_4, aux_2, mask] (supervised_heads), the prediction last. Classifiers output (1,),
the probability that the slice shows tumour. Pretrained encoders receive the input range their ImageNet
weights expect through Rescaling layers, never Lambda layers, so saved models load with safe_mode=True
once this module is imported (it imports stages.layers, which registers the custom layers, and stages.losses,
which registers the losses). With `slice_position`, unet, resunet and cnn take (H, W, 4): the fourth channel is
the slice's place in its volume; with `neighbours` k, 2k FLAIR planes of the slices around it come before that
(H, W, 3 + 2k [+ 1]).
"""
from __future__ import annotations

import contextlib

import keras
from keras import layers

import stages.losses  # noqa: F401  registers the losses and metrics a saved model's compile config names
from stages.common import BrainsegError
from stages.layers import (BilinearUpSampling2D, BrainStandardise, ConcatConv2D, FusedBatchNormalization, PlaneDecode,
                           ReverseChannels, SplitNeighbours, SplitPosition, VolumeDecode)

SEGMENTERS = ("unet", "resunet", "efficientunet", "doubleunet")
CLASSIFIERS = ("cnn", "xception")
# Input side must be a multiple of the encoder's total downsampling so skips line up with upsampled maps.
DOWNSAMPLING = {"unet": 16, "resunet": 16, "efficientunet": 32, "doubleunet": 16, "cnn": 16, "xception": 1}
XCEPTION_MIN_SIZE = 71  # keras.applications.Xception refuses smaller inputs
VGG_BGR_MEAN = (103.939, 116.779, 123.68)  # Caffe-style ImageNet preprocessing of keras' VGG weights


# how conv_bn_relu and residual_block normalise, what convolves a decoder stage's inputs (None: join them with
# Concatenate first) and what upsamples its map; plain_keras() swaps in stock Keras for benchmarks.training's baseline
BATCH_NORM = FusedBatchNormalization
CONCAT_CONV = ConcatConv2D
BILINEAR_UP = BilinearUpSampling2D
# how normalise() normalises: BATCH_NORM with this momentum of its moving statistics, or, with INSTANCE, each
# slice's maps by their own statistics; build_model sets both (normalisation) while it builds
BN_MOMENTUM = 0.99
INSTANCE = False


@contextlib.contextmanager
def plain_keras():
    """Within it, networks are built from stock Keras layers only, as plain Keras would build them:
    keras.layers.BatchNormalization, Concatenate followed by Conv2D in the decoders, and UpSampling2D."""
    global BATCH_NORM, CONCAT_CONV, BILINEAR_UP
    saved = BATCH_NORM, CONCAT_CONV, BILINEAR_UP
    BATCH_NORM, CONCAT_CONV, BILINEAR_UP = layers.BatchNormalization, None, layers.UpSampling2D
    try:
        yield
    finally:
        BATCH_NORM, CONCAT_CONV, BILINEAR_UP = saved


@contextlib.contextmanager
def normalisation(momentum: float, instance: bool = False):
    """Within it, normalise() layers keep their moving statistics with this momentum, or, with `instance`, are
    instance normalisation."""
    global BN_MOMENTUM, INSTANCE
    saved = BN_MOMENTUM, INSTANCE
    BN_MOMENTUM, INSTANCE = float(momentum), bool(instance)
    try:
        yield
    finally:
        BN_MOMENTUM, INSTANCE = saved


# ---------------------------------------------------------------- shared blocks

def conv2d(x, filters, kernel_size, **kwargs):
    """Conv2D of a tensor; of a list (a decoder stage's upsampled map and skips), CONCAT_CONV."""
    conv = CONCAT_CONV if isinstance(x, list) else layers.Conv2D
    return conv(filters, kernel_size, **kwargs)(x)


def normalise(x):
    if INSTANCE:
        # nnU-Net's instance normalisation (Ulyanov et al. 2016): each map of each slice by its own mean and variance,
        # so training and inference normalise alike and no statistic depends on the batch's mix of slices
        return layers.GroupNormalization(groups=-1)(x)
    return BATCH_NORM(momentum=BN_MOMENTUM)(x)


def conv_bn_relu(x, filters, kernel_size=3, dilation_rate=1):
    x = conv2d(x, filters, kernel_size, padding="same", dilation_rate=dilation_rate, use_bias=False)
    x = normalise(x)
    return layers.Activation("relu")(x)


def conv_block(x, filters):
    """The U-Net double convolution."""
    x = conv_bn_relu(x, filters)
    return conv_bn_relu(x, filters)


def residual_block(x, filters):
    """The seed ResUNet's block: 1x1 -> 3x3 convolutions plus a 1x1-projected shortcut."""
    shortcut = conv2d(x, filters, 1, use_bias=False)
    shortcut = normalise(shortcut)
    x = conv_bn_relu(x, filters, kernel_size=1)
    x = layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
    x = normalise(x)
    x = layers.Add()([x, shortcut])
    return layers.Activation("relu")(x)


def squeeze_excite(x, ratio=8):
    """Reweight channels by a gate computed from their global average."""
    channels = x.shape[-1]
    se = layers.GlobalAveragePooling2D(keepdims=True)(x)
    se = layers.Dense(max(channels // ratio, 1), activation="relu", use_bias=False)(se)
    se = layers.Dense(channels, activation="sigmoid", use_bias=False)(se)
    return layers.Multiply()([x, se])


def conv_se_block(x, filters):
    """DoubleU-Net's block: the double convolution followed by squeeze-and-excite."""
    return squeeze_excite(conv_block(x, filters))


def aspp(x, filters):
    """Atrous spatial pyramid pooling: image-level features plus dilations 1, 6, 12, 18."""
    height, width = x.shape[1:3]
    pooled = layers.GlobalAveragePooling2D(keepdims=True)(x)
    pooled = conv_bn_relu(pooled, filters, kernel_size=1)
    pooled = layers.UpSampling2D((height, width))(pooled)
    branches = [conv_bn_relu(x, filters, kernel_size=1)]
    branches += [conv_bn_relu(x, filters, dilation_rate=rate) for rate in (6, 12, 18)]
    x = layers.Concatenate()([pooled, *branches])
    return conv_bn_relu(x, filters, kernel_size=1)


def encoder(x, widths, block):
    """`block` then 2x2 max pooling per stage; returns the bottom and the pre-pooling skips."""
    skips = []
    for width in widths:
        x = block(x, width)
        skips.append(x)
        x = layers.MaxPooling2D()(x)
    return x, skips


def attention_gate(skip, gate):
    """Oktay et al. 2018's additive attention gate: each pixel of an encoder skip weighted by a sigmoid of it and of
    the decoder's upsampled map at that place, so the decoder can mute skip features away from the tumour. Computed
    at the skip's resolution (Oktay et al. at the coarser one, then upsampled): cheap at 8-64 channels."""
    inter = max(skip.shape[-1] // 2, 1)
    theta = layers.Conv2D(inter, 1, use_bias=False)(skip)
    phi = layers.Conv2D(inter, 1)(gate)
    weight = layers.Conv2D(1, 1, activation="sigmoid")(layers.Activation("relu")(layers.Add()([theta, phi])))
    return layers.Multiply()([skip, weight])


def decoder_stages(x, widths, block, *skip_lists, attention=False):
    """Per stage, deepest first: upsample x2, then `block` over that joined to the same-resolution skips of every
    encoder (the block's first convolutions take the list: CONCAT_CONV), each skip through an attention_gate first
    when `attention`. Returns every stage's output."""
    stages = []
    for width, skips in zip(widths, reversed(list(zip(*skip_lists)))):
        x = BILINEAR_UP(interpolation="bilinear")(x)
        if attention:
            skips = [attention_gate(skip, x) for skip in skips]
        x = [x, *skips] if CONCAT_CONV else layers.Concatenate()([x, *skips])
        x = block(x, width)
        stages.append(x)
    return stages


def decoder(x, widths, block, *skip_lists):
    """decoder_stages' last, full-resolution output."""
    return decoder_stages(x, widths, block, *skip_lists)[-1]


def mask_head(x, name="mask"):
    return layers.Conv2D(1, 1, activation="sigmoid", dtype="float32", name=name)(x)


def supervised_heads(stages, deep_supervision=False):
    """The mask head on the last decoder stage. With deep supervision (nnU-Net's), also a head on each of the
    AUXILIARY_HEADS stages before it, its probabilities upsampled to full size so it trains on the same mask:
    [coarsest, ..., mask], the prediction last, as inference expects."""
    if not deep_supervision:
        return mask_head(stages[-1])
    heads = []
    for x in stages[-1 - AUXILIARY_HEADS:-1]:
        factor = stages[-1].shape[1] // x.shape[1]
        name = f"aux_{factor}"
        x = layers.Conv2D(1, 1, activation="sigmoid", dtype="float32", name=f"{name}_head")(x)
        heads.append(BILINEAR_UP(factor, interpolation="bilinear", dtype="float32", name=name)(x))
    return [*heads, mask_head(stages[-1])]


def tumour_head(x):
    return layers.Dense(1, activation="sigmoid", dtype="float32", name="tumour")(x)


def pretrained(application, input_shape, weights):
    """A keras.applications backbone without its classifier; a clear error when ImageNet weights can't load."""
    try:
        return application(include_top=False, weights=weights, input_shape=input_shape)
    except Exception as err:  # keras.utils.get_file raises a bare Exception when offline
        if weights != "imagenet":
            raise
        raise BrainsegError(
            f"could not load ImageNet weights for {application.__name__}: {err}. Run once with network "
            "access (Keras caches them in ~/.keras/models) or set `train.weights: null` in params.yaml") from err


def feature_extractor(base, names):
    """The backbone as one layer returning the named layers' outputs (skips first, bottom last)."""
    return keras.Model(base.input, [base.get_layer(n).output for n in names], name=f"{base.name}_encoder")


# ---------------------------------------------------------------- segmenters

def bottleneck_dropout(x, rate):
    """Whole feature maps of the bottleneck dropped while training: the original U-Net's dropout at the end of the
    contracting path, as SpatialDropout2D because neighbouring pixels of one map are too alike for pixel dropout."""
    return layers.SpatialDropout2D(rate, name="bottleneck_dropout")(x) if rate else x


def unet(inputs, filters, weights=None, deep_supervision=False, dropout=0.0, attention=False):
    """Ronneberger et al. 2015: four encoder stages (f, 2f, 4f, 8f), a 16f bottleneck, a mirrored decoder; with
    `attention`, Oktay et al. 2018's Attention U-Net."""
    widths = [filters * 2**i for i in range(4)]
    x, skips = encoder(inputs, widths, conv_block)
    x = bottleneck_dropout(conv_block(x, filters * 16), dropout)
    return supervised_heads(decoder_stages(x, widths[::-1], conv_block, skips, attention=attention), deep_supervision)


def resunet(inputs, filters, weights=None, deep_supervision=False, dropout=0.0, attention=False):
    """The seed article's ResUNet: a U-Net whose stages after the first are residual blocks."""
    widths = [filters * 2**i for i in range(4)]
    first = conv_block(inputs, widths[0])
    x, skips = encoder(layers.MaxPooling2D()(first), widths[1:], residual_block)
    x = bottleneck_dropout(residual_block(x, filters * 16), dropout)
    return supervised_heads(decoder_stages(x, widths[::-1], residual_block, [first, *skips], attention=attention),
                            deep_supervision)


def efficientunet(inputs, filters, weights=None):
    """U-Net decoder on an EfficientNetB0 encoder; the raw input is the full-resolution skip."""
    names = ["block2a_expand_activation", "block3a_expand_activation", "block4a_expand_activation",
             "block6a_expand_activation", "top_activation"]
    base = pretrained(keras.applications.EfficientNetB0, inputs.shape[1:], weights)
    # EfficientNetB0 rescales and normalises internally and expects pixels in 0-255.
    *skips, x = feature_extractor(base, names)(layers.Rescaling(255.0)(inputs))
    x = decoder(x, [filters * 2**i for i in range(4, -1, -1)], conv_block, [inputs, *skips])
    return mask_head(x)


def doubleunet(inputs, filters, weights=None):
    """DoubleU-Net (Jha et al. 2020). Network 1: VGG19 encoder, ASPP, decoder -> mask1. Network 2 sees the
    input multiplied by mask1: its own encoder, ASPP, and a decoder fed by the skips of both encoders -> mask2.

    `filters` scales every non-VGG width; the paper's widths are filters=32.
    """
    widths = [filters * 2**i for i in range(4)]
    names = ["block1_conv2", "block2_conv2", "block3_conv4", "block4_conv4", "block5_conv4"]
    base = pretrained(keras.applications.VGG19, inputs.shape[1:], weights)
    x = ReverseChannels()(inputs)
    x = layers.Rescaling(255.0, offset=[-m for m in VGG_BGR_MEAN])(x)
    *skips1, x = feature_extractor(base, names)(x)
    x = aspp(x, filters * 2)
    mask1 = mask_head(decoder(x, widths[::-1], conv_se_block, skips1), name="mask1")

    x = layers.Multiply()([inputs, mask1])
    x, skips2 = encoder(x, widths, conv_se_block)
    x = aspp(x, filters * 2)
    mask2 = mask_head(decoder(x, widths[::-1], conv_se_block, skips1, skips2), name="mask2")
    return [mask1, mask2]


# ---------------------------------------------------------------- classifiers

def cnn(inputs, filters, weights=None):
    """The seed's simple classifier: two convolutions (each followed by 4x4 pooling), flatten, dense."""
    x = layers.Conv2D(filters, 3, padding="same", activation="relu")(inputs)
    x = layers.MaxPooling2D(4)(x)
    x = layers.Conv2D(filters * 2, 3, padding="same", activation="relu")(x)
    x = layers.MaxPooling2D(4)(x)
    return tumour_head(layers.Flatten()(x))


def xception(inputs, filters=None, weights=None):
    """Xception backbone, global average pooling, dense. Inputs under 71 px are upsampled to 71 px."""
    x = inputs
    size = max(inputs.shape[1], inputs.shape[2])
    if size < XCEPTION_MIN_SIZE:
        x = layers.Resizing(XCEPTION_MIN_SIZE, XCEPTION_MIN_SIZE)(x)
    x = layers.Rescaling(2.0, offset=-1.0)(x)  # Xception's ImageNet weights expect [-1, 1]
    base = pretrained(keras.applications.Xception, x.shape[1:], weights)
    x = layers.GlobalAveragePooling2D()(base(x))
    return tumour_head(layers.Dropout(0.2)(x))


BUILDERS = {"unet": unet, "resunet": resunet, "efficientunet": efficientunet, "doubleunet": doubleunet,
            "cnn": cnn, "xception": xception}


# the others' ImageNet encoders take exactly three channels: slice_position and neighbours are for these
POSITION_MODELS = ("unet", "resunet", "cnn")
# deep supervision: heads on the decoder stages at 1/4 and 1/2 of the input size; each weighs half the next
AUXILIARY_HEADS = 2
# deep supervision, bottleneck dropout and attention gates: for the U-Nets without a pretrained encoder
SUPERVISED_MODELS = ("unet", "resunet")


def build_model(name: str, input_shape=(128, 128, 3), filters: int = 16, weights: str | None = None,
                input_norm: str | None = None, slice_position: bool = False, neighbours: int = 0,
                deep_supervision: bool = False, bn_momentum: float = 0.99, dropout: float = 0.0,
                attention: bool = False, norm: str = "batch") -> keras.Model:
    """A freshly initialised `name` model (model.name == name). `weights` ("imagenet" or None) only
    concerns the pretrained encoders of efficientunet, doubleunet and xception. `input_norm="slice"` puts
    BrainStandardise in front of the network, `"volume"` VolumeDecode (ImageNet encoders then no longer see the
    range they expect). `slice_position` adds a fourth input channel, the slice's place in the volume, which
    bypasses the normalisation and joins the normalised slice at the network's first layer. `neighbours` > 0 adds
    the FLAIR of that many slices below and above as channels before it (2.5D input), decoded as the slice is.
    `deep_supervision` adds auxiliary outputs before the mask of unet and resunet (supervised_heads); the other
    models ignore it. `bn_momentum` is the moving statistics' momentum of the network's own batch normalisation
    (Keras' default 0.99; PyTorch's default, as Buda et al. trained, is 0.9 in Keras' terms); pretrained encoders
    keep theirs. `dropout` > 0 drops that fraction of the bottleneck's feature maps while training, `attention`
    gates every skip joined by the decoder (attention_gate), and `norm="instance"` puts instance normalisation in
    place of every batch normalisation (normalise; `bn_momentum` is then unused): all three unet and resunet only."""
    if name not in BUILDERS:
        raise BrainsegError(f"params.yaml: model '{name}' is not one of {SEGMENTERS + CLASSIFIERS}; "
                            "set it with `dvc exp run -S model=unet`")
    height, width, channels = input_shape
    step = DOWNSAMPLING[name]
    if height % step or width % step or channels != 3:
        raise BrainsegError(f"{name} needs (H, W, 3) inputs with H and W multiples of {step}, got {input_shape}; "
                            "fix image_size in params.yaml's profiles")
    if not 0 <= bn_momentum < 1:
        raise BrainsegError(f"params.yaml: train.bn_momentum {bn_momentum} is not in [0, 1); Keras' default is 0.99")
    if input_norm not in (None, "none", "slice", "volume"):
        raise BrainsegError(f"params.yaml: train.input_norm '{input_norm}' is not none, slice or volume")
    if norm not in ("batch", "instance"):
        raise BrainsegError(f"params.yaml: train.norm '{norm}' is not batch or instance")
    if not 0 <= dropout < 1:
        raise BrainsegError(f"params.yaml: train.dropout {dropout} is not in [0, 1); 0 turns it off")
    for option, value, models, off in (("slice_position", slice_position, POSITION_MODELS, "false"),
                                       ("neighbours", neighbours, POSITION_MODELS, "0"),
                                       ("dropout", dropout, SUPERVISED_MODELS, "0"),
                                       ("attention", attention, SUPERVISED_MODELS, "false"),
                                       ("norm", norm == "instance", SUPERVISED_MODELS, "batch")):
        if value and name not in models:
            raise BrainsegError(f"params.yaml: train.{option} works with {', '.join(models)}, not {name}; "
                                f"set `-S train.{option}={off}`")
    if neighbours and input_norm == "slice":
        raise BrainsegError("params.yaml: train.neighbours needs train.input_norm volume or none (a neighbour's "
                            "plane has no slice statistics of its own to standardise with); set one of them")
    inputs = keras.Input((height, width, 3 + 2 * neighbours + bool(slice_position)), name="image")
    x = inputs
    if slice_position:
        x, position = SplitPosition(dtype="float32", name="slice_position")(inputs)
    if neighbours:
        x, around = SplitNeighbours(neighbours, dtype="float32", name="neighbours")(x)
    if input_norm == "slice":
        x = BrainStandardise(dtype="float32", name="standardise")(x)
    elif input_norm == "volume":
        x = VolumeDecode(dtype="float32", name="volume_decode")(x)
    if neighbours:
        if input_norm == "volume":
            around = PlaneDecode(dtype="float32", name="neighbours_decode")(around)
        x = layers.Concatenate(name="with_neighbours")([x, around])
    if slice_position:
        x = layers.Concatenate(name="with_position")([x, position])
    # the other models have no decoder stages of their own to supervise, so they train as they are
    extra = {"deep_supervision": True} if deep_supervision and name in SUPERVISED_MODELS else {}
    if dropout:
        extra["dropout"] = float(dropout)
    if attention:
        extra["attention"] = True
    with normalisation(bn_momentum, instance=norm == "instance"):
        outputs = BUILDERS[name](x, filters=filters, weights=weights, **extra)
    return keras.Model(inputs, outputs, name=name)


def average(members: list[keras.Model]) -> keras.Model:
    """A seed ensemble: one model whose output is the mean of the members' final outputs, named as the members
    so evaluation and its checks see the architecture it averages. The members are nested whole, so inference
    still finds the input layers inside them (stages.preprocess.all_layers)."""
    name = members[0].name
    inputs = keras.Input(members[0].inputs[0].shape[1:], name="image")
    outputs = []
    for i, member in enumerate(members):
        member.name = f"member_{i}"  # nested models need distinct names
        y = member(inputs)
        outputs.append(y[-1] if isinstance(y, (list, tuple)) else y)
    mean = outputs[0] if len(outputs) == 1 else layers.Average(dtype="float32", name="average")(outputs)
    return keras.Model(inputs, mean, name=name)
