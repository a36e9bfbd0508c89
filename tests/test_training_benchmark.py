"""benchmarks/training.py: the FLOP count behind its share-of-peak figure, the --filters override, and the
plain baseline's stock layers."""
import argparse

import keras

from benchmarks.training import child_command, conv_flops, cpu_summary, profile_config, train_rate
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


def test_the_width_and_policy_reach_the_measuring_process():
    wide = argparse.Namespace(steps=5, profile="cpu", filters=12)
    command = child_command("recipe", wide, "mixed_bfloat16")
    assert command[command.index("--filters") + 1] == "12"
    assert command[command.index("--policy") + 1] == "mixed_bfloat16"
    assert command[command.index("--child") + 1] == "recipe" and command[command.index("--steps") + 1] == "5"
    default = child_command("plain", argparse.Namespace(steps=5, profile="cpu", filters=None))
    assert "--filters" not in default and "--policy" not in default


def test_cpu_summary_names_the_model_and_the_instruction_sets_that_pick_kernels():
    avx2 = "model name\t: AMD EPYC\nflags\t\t: fpu sse2 avx2 fma\n"
    avx512 = "model name\t: AMD EPYC\nflags\t\t: fpu avx2 fma avx512f avx512_vnni avx512_bf16\n"
    assert cpu_summary(avx2) == "AMD EPYC (avx2 fma)"
    assert cpu_summary(avx512) == "AMD EPYC (avx2 fma avx512f avx512_vnni avx512_bf16)"
    assert cpu_summary("") == "unknown CPU (no AVX2)"


def test_the_plain_baseline_is_built_from_keras_own_layers_and_the_swap_is_undone(monkeypatch):
    import stages.models
    import stages.train
    from stages.layers import ConcatConv2D, FusedBatchNormalization

    norms, joins, compile_model = [], [], stages.train.compile_model

    def recording(model, cfg):
        norms.append({type(layer) for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)})
        joins.append({type(layer) for layer in model.layers} & {ConcatConv2D, keras.layers.Concatenate})
        return compile_model(model, cfg)

    monkeypatch.setattr(stages.train, "compile_model", recording)
    cfg = profile_config(load_params(), "demo", None)
    for plain in (True, False):
        rate, gflop = train_rate("unet", cfg, 2, "float32", False, plain_layers=plain)
        assert rate > 0 and gflop > 0
    assert norms == [{keras.layers.BatchNormalization}, {FusedBatchNormalization}]
    assert joins == [{keras.layers.Concatenate}, {ConcatConv2D}]
    assert stages.models.BATCH_NORM is FusedBatchNormalization
    assert stages.models.CONCAT_CONV is ConcatConv2D


def test_a_mixed_precision_measurement_carries_its_own_precision_s_matmul_peak(monkeypatch):
    """The share of peak printed for mixed_bfloat16 is taken against a bfloat16 product's peak, not float32's;
    a float32 measurement times its product once."""
    import benchmarks.training
    from benchmarks.training import child
    peaks = {"float32": 300.0, "bfloat16": 1200.0}
    timed = []

    def fake_peak(tf, n=2048, repeats=5, dtype="float32"):
        timed.append(dtype)
        return peaks[dtype]

    monkeypatch.setattr(benchmarks.training, "matmul_peak_gflops", fake_peak)
    result = child("recipe", 2, "demo", "mixed_bfloat16")
    assert result["policy"] == "mixed_bfloat16" and result["compute_dtype"] == "bfloat16" and result["rate"] > 0
    assert (result["peak"], result["peak_compute"]) == (300.0, 1200.0)
    timed.clear()
    result = child("recipe", 2, "demo", "float32")
    assert (result["compute_dtype"], result["peak"], result["peak_compute"]) == ("float32", 300.0, 300.0)
    assert timed == ["float32"]
    assert keras.mixed_precision.global_policy().name == "float32"  # the measurement puts the policy back


def test_the_inference_measured_is_the_served_one_a_seed_ensemble_where_the_profile_trains_one():
    from benchmarks.training import served_model
    from stages.models import build_model

    params = load_params()
    cpu, demo = profile_config(params, "cpu", None), profile_config(params, "demo", None)
    assert demo["members"] is None and len(cpu["members"]) > 1  # params.yaml's defaults
    ensemble = served_model("unet", cpu, cpu["members"])
    nested = [layer for layer in ensemble.layers if isinstance(layer, keras.Model)]
    assert ensemble.name == "unet" and len(nested) == len(cpu["members"])
    assert ensemble.input_shape == (None, cpu["image_size"], cpu["image_size"], 3)
    assert ensemble.count_params() == len(nested) * nested[0].count_params()
    one = served_model("unet", demo)
    assert not any(isinstance(layer, keras.Model) for layer in one.layers)
    built = build_model("unet", (demo["image_size"],) * 2 + (3,), demo["filters"], input_norm=demo.get("input_norm"))
    assert one.count_params() == built.count_params()


def test_the_graph_alone_is_timed_on_model_size_batches(monkeypatch, tmp_path):
    import stages.engines
    from benchmarks.training import graph_rate, served_model

    monkeypatch.setenv("BRAINSEG_CACHE", str(tmp_path))
    shapes = []
    runner = stages.engines.LiteRTRunner
    call = runner.__call__
    monkeypatch.setattr(runner, "__call__", lambda self, x: shapes.append(x.shape) or call(self, x))
    model = served_model("unet", profile_config(load_params(), "demo", None))
    assert graph_rate(model, n=32, batch=16, repeats=2) > 0
    assert set(shapes) == {(16, 64, 64, 3)} and len(shapes) == 1 + 2 * 2  # the warm-up, then 2 repeats of 32
