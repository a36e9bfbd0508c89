"""benchmarks/training.py: the FLOP count behind its share-of-peak figure, and the --filters override."""
import keras

from benchmarks.training import conv_flops, cpu_summary, profile_config
from stages.common import load_params


def test_conv_flops_counts_two_flops_per_multiply_add_of_each_convolution():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    x = keras.layers.Conv2DTranspose(2, 2, strides=2)(x)
    model = keras.Model(inputs, x)
    conv = 2 * 8 * 8 * 3 * 3 * 3 * 4
    transpose = 2 * 8 * 8 * 2 * 2 * 4 * 2  # every input pixel meets the whole 2x2 kernel
    assert conv_flops(model) == conv + transpose


def test_filters_override_changes_only_the_width():
    params = load_params()
    default = profile_config(params, "cpu", None)
    wide = profile_config(params, "cpu", default["filters"] + 4)
    assert wide["filters"] == default["filters"] + 4
    assert {k: v for k, v in wide.items() if k != "filters"} == {k: v for k, v in default.items() if k != "filters"}


def test_cpu_summary_names_the_model_and_the_instruction_sets_that_pick_kernels():
    avx2 = "model name\t: AMD EPYC\nflags\t\t: fpu sse2 avx2 fma\n"
    avx512 = "model name\t: AMD EPYC\nflags\t\t: fpu avx2 fma avx512f avx512_vnni avx512_bf16\n"
    assert cpu_summary(avx2) == "AMD EPYC (avx2 fma)"
    assert cpu_summary(avx512) == "AMD EPYC (avx2 fma avx512f avx512_vnni avx512_bf16)"
    assert cpu_summary("") == "unknown CPU (no AVX2)"
