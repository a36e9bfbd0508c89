import json
import shutil
import subprocess
import sys

import keras
import numpy as np
import pandas as pd
import pytest

import stages.prepared as prepared_data
import stages.train as train_stage
from stages import datasets
from stages.callbacks import VolumeDice, fit_callbacks
from stages.common import ROOT, BrainsegError, load_params, train_config
from stages.datasets import make_datasets
from stages.models import build_model
from stages.train import compile_model, learning_rate, summarize, train
from tests.conftest import SIZE, write_prepared


@pytest.mark.parametrize("options", [{}, {"deep_supervision": True, "ema": 0.99}])
def test_fit_traces_the_train_step_once(prepared, cfg, options):
    """The optimizer's slots and the metrics' state exist before fit: TensorFlow traces the step once, not twice."""
    model, train_ds, val_ds, _ = train_stage.build("unet", {**cfg, **options}, 0, prepared)
    traced = []
    step = model.train_step
    model.train_step = lambda data: traced.append(1) or step(data)
    model.fit(train_ds, validation_data=val_ds, epochs=2, verbose=0)
    assert len(traced) == 1


def test_train_saves_a_loadable_best_model_summary_and_live_plots(prepared, cfg, tmp_path):
    model_path = tmp_path / "models/model.keras"
    summary = train("unet", cfg, 0, prepared, model_path, tmp_path / "live")

    model = keras.models.load_model(model_path, safe_mode=True)
    assert model.name == "unet" and model.input_shape == (None, SIZE, SIZE, 3)
    assert summary["model"] == "unet" and summary["profile"] == "demo"
    assert summary["params"] == model.count_params() and summary["train_slices"] == 8
    assert summary["epochs"] == summary["best_epoch"] == 1 and summary["time_limited"] is False
    assert 0 <= summary["best_val_dice"] <= 1 and np.isfinite(summary["best_val_loss"])
    assert summary["train_slices_per_s"] > 0
    assert [p.name for p in model_path.parent.iterdir()] == ["model.keras"]  # no temp folder left behind
    plots = tmp_path / "live/plots/metrics"
    for name in ("train/loss.tsv", "train/dice.tsv", "eval/loss.tsv", "eval/dice.tsv", "eval/tversky.tsv",
                 "train/learning_rate.tsv"):
        assert (plots / name).is_file(), name


def test_main_writes_metrics_with_data_source_and_restores_float32(prepared, cfg, tmp_path, monkeypatch):
    params = load_params()
    params.update(model="cnn", profile="demo")
    params["profiles"]["demo"].update(epochs=1, filters=4, image_size=SIZE, batch_size=4,
                                      mixed_precision="mixed_float16")
    source = tmp_path / "SOURCE.json"
    source.write_text('{"source": "synthetic"}')
    for name, value in dict(DATA=prepared, MODEL=tmp_path / "model.keras", SELECTION=tmp_path / "selection.keras",
                            LIVE=tmp_path / "live", METRICS=tmp_path / "train.json", SOURCE=source,
                            load_params=lambda: params).items():
        monkeypatch.setattr(train_stage, name, value)

    train_stage.main()

    metrics = json.loads((tmp_path / "train.json").read_text())
    assert metrics["model"] == "cnn" and metrics["data_source"] == {"source": "synthetic"}
    assert {"best_val_loss", "best_val_accuracy", "best_val_auc", "train_seconds"} <= metrics.keys()
    assert keras.mixed_precision.global_policy().name == "float32"
    # Inference loads uncompiled: a mixed-precision run saved a loss-scaling optimizer float32 Adam can't take.
    assert keras.models.load_model(tmp_path / "model.keras", safe_mode=True, compile=False).name == "cnn"
    assert metrics["seed"] == params["seed"]  # train.seed null: the top-level seed
    # without train.refit the model served is the one validation chose, byte for byte
    assert (tmp_path / "model.keras").read_bytes() == (tmp_path / "selection.keras").read_bytes()
    assert "refit" not in metrics and "learning_rates" not in metrics


def test_train_seed_overrides_the_top_level_seed(monkeypatch, tmp_path):
    params = load_params()
    params["train"].update(seed=7, members=None)  # one network: beside an ensemble's members it is refused
    seen = {}
    monkeypatch.setattr(train_stage, "load_params", lambda: params)
    def fake_train(name, cfg, seed, data, model_path, *args):
        seen["seed"] = seed
        model_path.write_bytes(b"model")
        return {"learning_rates": None}

    monkeypatch.setattr(train_stage, "train", fake_train)
    monkeypatch.setattr(train_stage, "SELECTION", tmp_path / "selection.keras")
    monkeypatch.setattr(train_stage, "MODEL", tmp_path / "model.keras")
    monkeypatch.setattr(train_stage, "METRICS", tmp_path / "train.json")
    monkeypatch.setattr(train_stage, "SOURCE", tmp_path / "missing.json")
    train_stage.main()
    assert seen["seed"] == 7 and json.loads((tmp_path / "train.json").read_text())["seed"] == 7


def test_interrupted_training_keeps_the_previous_model(prepared, cfg, tmp_path, monkeypatch):
    model_path = tmp_path / "model.keras"
    model_path.write_bytes(b"previous model")

    class Kill(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):  # after ModelCheckpoint has written its file
            raise KeyboardInterrupt

    monkeypatch.setattr(train_stage, "fit_callbacks", lambda *args: [*fit_callbacks(*args), Kill()])
    with pytest.raises(KeyboardInterrupt):
        train("cnn", cfg, 0, prepared, model_path, None)
    assert model_path.read_bytes() == b"previous model"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".train.")] == []


def test_learning_rate_schedules_and_optimizer_checks(cfg, tmp_path):
    cosine = learning_rate({**cfg, "lr_schedule": "cosine", "epochs": 3}, steps_per_epoch=10)
    assert isinstance(cosine, keras.optimizers.schedules.CosineDecay) and cosine.decay_steps == 30
    assert learning_rate({**cfg, "lr_schedule": "constant"}, 10) == cfg["learning_rate"]
    kinds = [type(c).__name__ for c in fit_callbacks({**cfg, "lr_schedule": "plateau"}, tmp_path / "m.keras")]
    assert kinds == ["ReduceLROnPlateau", "EarlyStopping", "ModelCheckpoint"]
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, activation="sigmoid")], name="cnn")
    for key, value, match in [("lr_schedule", "step", "lr_schedule"), ("optimizer", "sgd", "optimizer")]:
        with pytest.raises(BrainsegError, match=match):
            compile_model(model, {**cfg, key: value})


def test_ema_weights_are_validated_chosen_and_saved(prepared, cfg, tmp_path):
    """Momentum 1 freezes the average at the first step's weights: each epoch validates the same weights (the
    cnn has no batch-norm statistics that could move them), and the saved model is those weights."""
    kinds = [type(c).__name__
             for c in fit_callbacks({**cfg, "lr_schedule": "plateau", "ema": 0.99}, tmp_path / "m.keras")]
    assert kinds == ["ReduceLROnPlateau", "SwapEMAWeights", "EarlyStopping", "ModelCheckpoint"]
    losses = {}
    for ema in (None, 1.0):
        run = tmp_path / f"ema{ema}"
        summary = train("cnn", {**cfg, "epochs": 3, "ema": ema, "learning_rate": 0.01, "patience": 5}, 0,
                        prepared, run / "model.keras", run / "live")
        losses[ema] = pd.read_csv(run / "live/plots/metrics/eval/loss.tsv", sep="\t")["loss"].to_numpy()
        if ema:
            model = keras.models.load_model(run / "model.keras")
            _, val_ds, _ = make_datasets(prepared, SIZE, 4, classifier=True, input_norm=cfg.get("input_norm"))
            compile_model(model, cfg)
            assert model.evaluate(val_ds, verbose=0, return_dict=True)["loss"] == pytest.approx(
                summary["best_val_loss"], rel=1e-5)
    assert np.ptp(losses[1.0]) < 1e-6 < np.ptp(losses[None])


def test_summary_reports_doubleunet_total_loss_and_mask2_metrics(cfg):
    history = {"loss": [2.0, 1.5], "val_loss": [1.8, 1.2], "val_mask1_loss": [0.9, 0.7],
               "val_mask2_loss": [0.9, 0.5], "val_mask2_dice": [0.2, 0.6]}
    inputs = keras.Input((2,))
    model = keras.Model(inputs, [keras.layers.Dense(1, name=name)(inputs) for name in ("mask1", "mask2")])
    summary = summarize("doubleunet", cfg, model, history, n_train=10, seconds=4.0, train_step_seconds=2.0)
    assert summary["best_epoch"] == 2 and summary["best_val_loss"] == 1.2 and summary["best_val_dice"] == 0.6
    assert summary["train_slices_per_s"] == 10.0 and "best_val_mask1_loss" not in summary


def test_deep_supervision_weighs_each_auxiliary_loss_by_its_downsampling_and_serves_the_mask(prepared, cfg,
                                                                                              tmp_path):
    model_path = tmp_path / "model.keras"
    summary = train("unet", {**cfg, "deep_supervision": True}, 0, prepared, model_path, tmp_path / "live")
    assert {"best_val_loss", "best_val_dice", "best_val_tversky"} <= set(summary)
    assert not any(key.startswith(("best_val_mask_", "best_val_aux")) for key in summary)
    for curve in ("train/dice.tsv", "eval/dice.tsv", "train/loss.tsv", "eval/loss.tsv"):  # dvc.yaml's plots
        assert (tmp_path / "live/plots/metrics" / curve).is_file()
    saved = keras.models.load_model(model_path, safe_mode=True)
    assert saved.name == "unet" and saved.output_names == ["mask"]  # the plain network is served

    keras.utils.set_random_seed(0)
    model = build_model("unet", (SIZE, SIZE, 3), 4, input_norm=cfg["input_norm"], deep_supervision=True)
    compile_model(model, cfg)
    assert model.output_names == ["aux_4", "aux_2", "mask"]
    x, y = make_datasets(prepared, SIZE, 4, splits=("val",))[0].take(1).get_single_element()
    scores = model.evaluate(x, (y, y, y), return_dict=True, verbose=0)
    assert scores["loss"] == pytest.approx(scores["mask_loss"] + scores["aux_2_loss"] / 2 + scores["aux_4_loss"] / 4,
                                           rel=1e-5)
    plain = train_stage.served(model)
    assert np.array_equal(plain.predict_on_batch(x), model.predict_on_batch(x)[-1])


def test_mirrored_strategy_trains_on_two_logical_cpus(prepared, cfg, tmp_path):
    script = """
import json, sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from stages.train import train
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
summary = train("unet", json.loads(sys.argv[1]), 0, sys.argv[2], sys.argv[3], None, strategy)
print("replicas", strategy.num_replicas_in_sync, "epochs", summary["epochs"])
"""
    small = {**cfg, "image_size": 32, "filters": 2, "augment": {"flip": True, "rotation": 10}}
    result = subprocess.run([sys.executable, "-c", script, json.dumps(small), str(prepared),
                             str(tmp_path / "model.keras")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "replicas 2 epochs 1" in result.stdout
    assert (tmp_path / "model.keras").is_file()


def test_members_share_the_budget_so_minutes_one_leaves_go_to_the_next(monkeypatch, tmp_path):
    share, clock = train_stage.budget_share, [30.0]
    monkeypatch.setattr(train_stage.time, "perf_counter", lambda: clock[0])
    assert share({"max_minutes": 3}, 30.0, 3)["max_minutes"] * 60 == pytest.approx(60)  # 180 s, three trainings left
    assert share({"max_minutes": 3}, 0.0, 2)["max_minutes"] * 60 == pytest.approx(75)  # 30 s gone: 150 s for two
    # spent: a share of 1 s, so one epoch, then TimeLimit stops
    assert share({"max_minutes": 3}, -200.0, 1)["max_minutes"] * 60 == pytest.approx(1)
    assert share({"max_minutes": None}, 0.0, 3) == {"max_minutes": None}

    class Done(Exception):
        pass

    given = []

    def fake_train(name, cfg, seed, *args, **kwargs):
        given.append(round(cfg["max_minutes"] * 60))
        if seed == 3:
            raise Done  # averaging the members is another test's business
        clock[0] += {1: 30, 2: 100}[seed]  # member 1 ends early, member 2 takes more than its share
        return {"learning_rates": None}

    clock[0] = 0.0
    monkeypatch.setattr(train_stage, "train", fake_train)
    monkeypatch.setattr(train_stage.prepared, "member_table", lambda data_dir, seed: "train")
    with pytest.raises(Done):
        train_stage.train_members("cnn", {"max_minutes": 3}, [1, 2, 3], model_path=tmp_path / "m.keras",
                                  started=0.0, after=1)
    # a student follows (train.distil): four trainings share 180 s, 45 each; then 150 s for three, 50 for two
    assert given == [45, 50, 25]


def test_max_minutes_ends_training_early_and_keeps_the_best_epoch(prepared, cfg, tmp_path):
    summary = train("cnn", {**cfg, "epochs": 3, "max_minutes": 1e-6}, 0, prepared, tmp_path / "m.keras", None)
    assert summary["epochs"] == 1 and summary["time_limited"] and (tmp_path / "m.keras").is_file()


def test_main_trains_without_dvclive_where_it_is_not_installed(prepared, cfg, tmp_path, monkeypatch, capsys):
    seen = {}
    find_spec = train_stage.importlib.util.find_spec
    monkeypatch.setattr(train_stage.importlib.util, "find_spec",
                        lambda name, *a: None if name == "dvclive" else find_spec(name, *a))
    def fake_train(name, cfg, seed, data, model_path, live):
        seen.update(live=live)
        model_path.write_bytes(b"model")
        return {}

    params = {**load_params(), "profile": "demo"}
    monkeypatch.setattr(train_stage, "load_params", lambda: params)
    monkeypatch.setattr(train_stage, "train", fake_train)
    monkeypatch.setattr(train_stage, "SELECTION", tmp_path / "selection.keras")
    monkeypatch.setattr(train_stage, "MODEL", tmp_path / "model.keras")
    monkeypatch.setattr(train_stage, "METRICS", tmp_path / "train.json")
    monkeypatch.setattr(train_stage, "SOURCE", tmp_path / "missing.json")
    train_stage.main()
    out = capsys.readouterr().out
    assert seen == {"live": None} and "dvclive is not installed" in out
    assert "profile demo: members None (profiles.demo.members) in place of train.members [42, 7, 1]" in out


def test_train_with_slice_position_saves_a_four_channel_model(prepared, cfg, tmp_path):
    model_path = tmp_path / "model.keras"
    train("unet", {**cfg, "slice_position": True}, 0, prepared, model_path, None)
    from stages.inference import load_model
    from stages.preprocess import slice_positioned
    model = load_model(model_path)
    assert model.input_shape[-1] == 4 and slice_positioned(model)


def test_train_dropout_attention_and_instance_norm_reach_the_saved_model(prepared, cfg, tmp_path):
    model_path = tmp_path / "model.keras"
    train("unet", {**cfg, "dropout": 0.3, "attention": True, "norm": "instance"}, 0, prepared, model_path, None)
    model = keras.models.load_model(model_path, safe_mode=True)
    assert model.get_layer("bottleneck_dropout").rate == 0.3
    assert sum(isinstance(layer, keras.layers.Multiply) for layer in model.layers) == 4
    assert sum(isinstance(layer, keras.layers.GroupNormalization) for layer in model.layers) == 18
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers)


def test_train_with_neighbours_saves_a_model_that_asks_for_them(prepared, cfg, tmp_path):
    model_path = tmp_path / "model.keras"
    train("unet", {**cfg, "neighbours": 1}, 0, prepared, model_path, None)
    from stages.inference import load_model
    from stages.preprocess import neighbour_count
    model = load_model(model_path)
    assert model.input_shape[-1] == 5 and neighbour_count(model) == 1


def write_refit_prepared(folder):
    """write_prepared with a refit table too: four more slices, as balance writes the validation patients'."""
    return write_prepared(folder, (("train", 8), ("val", 4), ("refit", 4)))


def test_refit_trains_on_training_and_validation_patients_for_the_epochs_given_replaying_rates(cfg, tmp_path,
                                                                                              monkeypatch):
    data = write_refit_prepared(tmp_path)
    built = {}
    build = train_stage.build
    monkeypatch.setattr(train_stage, "build", lambda *a, **k: built.setdefault("out", build(*a, **k)))
    summary = train_stage.refit("unet", cfg, 0, 2, [1e-3, 2.5e-4, 1e-4], data, tmp_path / "m.keras")

    model = built["out"][0]
    assert summary["epochs"] == 2 and summary["train_slices"] == 8 + 4  # train + refit tables, no validation
    assert np.isfinite(summary["final_loss"]) and 0 <= summary["final_dice"] <= 1
    assert float(model.optimizer.learning_rate) == pytest.approx(2.5e-4)  # the second epoch's rate, replayed
    assert keras.models.load_model(tmp_path / "m.keras", compile=False).name == "unet"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".train.")] == []

    summary = train_stage.refit("unet", {**cfg, "deep_supervision": True}, 0, 1, [1e-3], data, tmp_path / "ds.keras")
    assert keras.models.load_model(tmp_path / "ds.keras", compile=False).output_names == ["mask"]
    assert 0 <= summary["final_dice"] <= 1


def test_refit_with_fewer_logged_rates_than_epochs_names_the_fix(cfg, tmp_path):
    data = write_refit_prepared(tmp_path)
    with pytest.raises(BrainsegError, match="2 learning rates.*dvc repro train"):
        train_stage.refit("unet", {**cfg, "lr_schedule": "plateau"}, 0, 3, [1e-3, 1e-3], data, tmp_path / "m.keras")
    with pytest.raises(BrainsegError, match="logged 0 learning rates"):  # a first run that logged none
        train_stage.refit("unet", {**cfg, "lr_schedule": "plateau"}, 0, 1, None, data, tmp_path / "m.keras")


def test_refit_that_does_not_finish_keeps_the_previous_model(cfg, tmp_path, monkeypatch):
    data = write_refit_prepared(tmp_path)
    (tmp_path / "m.keras").write_bytes(b"previous model")
    monkeypatch.setattr(train_stage.TrainTimer, "on_epoch_end", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        train_stage.refit("unet", cfg, 0, 1, [1e-3], data, tmp_path / "m.keras")
    assert (tmp_path / "m.keras").read_bytes() == b"previous model"


def test_main_with_refit_serves_the_refit_and_keeps_the_chosen_epoch_beside_it(cfg, tmp_path, monkeypatch):
    data = write_refit_prepared(tmp_path)
    params = load_params()
    params.update(model="unet", profile="demo")
    params["profiles"]["demo"].update(epochs=2, filters=4, image_size=SIZE, batch_size=4)
    params["train"]["refit"] = True
    for name, value in dict(DATA=data, MODEL=tmp_path / "model.keras", SELECTION=tmp_path / "selection.keras",
                            LIVE=None, METRICS=tmp_path / "train.json", SOURCE=tmp_path / "none.json",
                            load_params=lambda: params).items():
        monkeypatch.setattr(train_stage, name, value)
    monkeypatch.setattr(train_stage.importlib.util, "find_spec", lambda name, *a: None)  # no DVCLive

    train_stage.main()

    metrics = json.loads((tmp_path / "train.json").read_text())
    assert metrics["refit"]["epochs"] == metrics["best_epoch"] and metrics["refit"]["train_slices"] == 12
    assert metrics["train_slices"] == 8 and "learning_rates" not in metrics
    served, chosen = (keras.models.load_model(tmp_path / f"{n}.keras", compile=False) for n in ("model", "selection"))
    assert not all(np.array_equal(a, b) for a, b in zip(served.get_weights(), chosen.get_weights()))


def test_adamw_decays_the_kernels_only(cfg):
    """One step with a zero loss gradient: Adam leaves every weight alone; AdamW shrinks the kernels by
    learning_rate x weight_decay and leaves biases and the normalisation's gamma and beta alone."""
    def step(optimizer):
        keras.utils.set_random_seed(0)
        inputs = keras.Input((4, 4, 2))
        x = keras.layers.Conv2D(3, 3, padding="same")(inputs)
        x = keras.layers.BatchNormalization()(x)
        model = compile_model(keras.Model(inputs, keras.layers.Conv2D(1, 1, activation="sigmoid")(x), name="unet"),
                              {**cfg, "optimizer": optimizer, "weight_decay": 0.5, "learning_rate": 0.1,
                               "lr_schedule": "constant", "ema": None})
        before = {v.path: np.array(v) for v in model.trainable_variables}
        zeros = [keras.ops.zeros_like(v) for v in model.trainable_variables]
        model.optimizer.apply_gradients(zip(zeros, model.trainable_variables))
        return {v.path: (before[v.path], np.array(v)) for v in model.trainable_variables}

    for path, (before, after) in step("adam").items():
        np.testing.assert_allclose(after, before, err_msg=path)
    decayed = step("adamw")
    kernels = [p for p in decayed if p.endswith("kernel")]
    assert len(kernels) == 2 and len(decayed) == 6
    for path, (before, after) in decayed.items():
        np.testing.assert_allclose(after, before * (1 - 0.1 * 0.5) if path in kernels else before, rtol=1e-6,
                                   err_msg=path)


def ensemble_stage(monkeypatch, prepared, tmp_path, **train) -> dict:
    """params.yaml under the demo profile, shrunk to one epoch of a 4-filter model, with `train` set (a seed
    ensemble's keys), which stages.train's main() then reads, writing its outputs under tmp_path."""
    params = load_params()
    params.update(model="unet", profile="demo")
    params["profiles"]["demo"].update(epochs=1, filters=4, image_size=SIZE, batch_size=4)
    del params["profiles"]["demo"]["members"]  # the demo profile's one network would win over train.members
    params["train"].update(train)
    for name, value in dict(DATA=prepared, MODEL=tmp_path / "model.keras", SELECTION=tmp_path / "selection.keras",
                            LIVE=tmp_path / "live", METRICS=tmp_path / "train.json", SOURCE=tmp_path / "none.json",
                            load_params=lambda: params).items():
        monkeypatch.setattr(train_stage, name, value)
    return params


def test_members_train_as_runs_of_their_seeds_on_their_copies_and_the_served_model_averages_them(cfg, prepared,
                                                                                                tmp_path, monkeypatch):
    from stages import engines, inference, preprocess

    # balance.seed members: the second member's copies are other slices' (train_seed2), as a run of seed 2 draws them
    table = pd.read_csv(prepared / "prepared/train.csv")
    table.loc[table["copy"] >= 0, "row"] = [4, 6]
    table.to_csv(prepared / "prepared/train_seed2.csv", index=False)
    images, masks = (np.load(prepared / f"slices/{kind}.npy") for kind in ("images", "masks"))
    for kind, array in (("images", images), ("masks", masks)):
        np.save(prepared / f"prepared/train_seed2_copies_{kind}.npy", array[[4, 6]])
    prepared_data.write_record(prepared / "prepared", prepared, len(images), [1, 2])
    params = ensemble_stage(monkeypatch, prepared, tmp_path, members=[1, 2])

    train_stage.main()

    metrics = json.loads((tmp_path / "train.json").read_text())
    assert metrics["seed"] == [1, 2] and [m["seed"] for m in metrics["members"]] == [1, 2]
    assert metrics["train_seconds"] == pytest.approx(sum(m["train_seconds"] for m in metrics["members"]), abs=0.11)
    assert metrics["best_val_dice"] == pytest.approx(np.mean([m["best_val_dice"] for m in metrics["members"]]))
    assert (tmp_path / "model.keras").read_bytes() == (tmp_path / "selection.keras").read_bytes()
    assert metrics["members_time_limited"] == 0 and not any(m["time_limited"] for m in metrics["members"])
    assert (tmp_path / "live/plots/metrics/eval/dice.tsv").is_file()  # the first member's curves
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no member left behind

    ensemble = inference.load_model(tmp_path / "model.keras")
    assert ensemble.name == "unet" and preprocess.volume_normalised(ensemble)
    assert metrics["params"] == ensemble.count_params() == 2 * metrics["members"][0]["params"]
    # the second member is, weight for weight, what a run with train.seed 2 alone trains on its own copies
    keras.backend.clear_session()
    alone = train("unet", train_config(params), 2, prepared, tmp_path / "alone.keras", None, train_split="train_seed2")
    assert alone["best_val_loss"] == metrics["members"][1]["best_val_loss"]
    single = keras.models.load_model(tmp_path / "alone.keras", compile=False)
    member = ensemble.get_layer("member_1")
    assert all(np.array_equal(a, b) for a, b in zip(member.get_weights(), single.get_weights()))
    # which are not the first member's: train's slices differ from train_seed2's
    seen = {split: sorted(np.asarray(x).reshape(len(x), -1).sum(axis=1).tolist())
            for split in ("train", "train_seed2")
            for x, _ in make_datasets(prepared, SIZE, 16, splits=(split, "val"))[0].take(1)}
    assert seen["train"] != seen["train_seed2"]
    x = np.random.default_rng(0).random((2, SIZE, SIZE, 3)).astype("float32")
    mean = (ensemble.get_layer("member_0")(x) + member(x)) / 2
    np.testing.assert_allclose(ensemble.predict(x, verbose=0), mean, atol=1e-6)
    np.testing.assert_allclose(engines.runner(ensemble, "litert")(x), mean, atol=1e-4)


def test_a_classifier_trains_as_a_seed_ensemble_too(cfg, prepared, tmp_path, monkeypatch):
    from stages import inference

    params = ensemble_stage(monkeypatch, prepared, tmp_path, members=[1, 2], max_minutes=1e-6)
    params["model"], params["profiles"]["demo"]["epochs"] = "cnn", 2
    train_stage.main()
    metrics = json.loads((tmp_path / "train.json").read_text())
    # the budget spent, each member still trains one epoch, then stops: the best epoch so far is its model
    assert metrics["members_time_limited"] == 2 and [m["epochs"] for m in metrics["members"]] == [1, 1]
    ensemble = inference.load_model(tmp_path / "model.keras")
    assert ensemble.name == "cnn" and ensemble.output_shape == (None, 1)
    x = np.random.default_rng(0).random((2, SIZE, SIZE, 3)).astype("float32")
    mean = (ensemble.get_layer("member_0")(x) + ensemble.get_layer("member_1")(x)) / 2
    np.testing.assert_allclose(ensemble.predict(x, verbose=0), mean, atol=1e-6)


@pytest.mark.parametrize("members, fix", [([7], "two or more"), ([7, 7], "distinct"), ("7,1", "list"),
                                          ([7, 1.5], "integer"), ([7, True], "integer")])
def test_members_that_are_not_distinct_seeds_name_the_fix(members, fix):
    with pytest.raises(BrainsegError, match=f"train.members .*{fix}.*train.members=\\[42,7,1\\]"):
        train_stage.member_seeds({"members": members})


def test_members_with_refit_or_a_training_seed_are_refused_and_null_trains_one_network():
    assert train_stage.member_seeds({"members": None}) == [] == train_stage.member_seeds({})
    with pytest.raises(BrainsegError, match="train.refit=false"):
        train_stage.member_seeds({"members": [42, 7], "refit": True})
    # `-S train.seed=7` on the ensemble default would otherwise train seeds 42 and 7 and call it seed 7's run
    with pytest.raises(BrainsegError, match="train.seed 7 is set beside .* \\[42, 1\\].*train.members=null"):
        train_stage.member_seeds({"members": [42, 1], "seed": 7})


def test_the_default_trains_a_seed_ensemble_on_the_cpu_profile_and_one_network_on_demo_and_gpu():
    from stages.common import ROOT, load_params, profile_overrides, train_config, training_seeds

    params = load_params(path=ROOT / "params.yaml")
    assert training_seeds(params) == [42, 7, 1] and params["balance"]["seed"] == "members"
    for profile in ("demo", "gpu"):
        assert training_seeds({**params, "profile": profile}) == [params["seed"]]
        assert training_seeds({**params, "profile": profile, "train": {**params["train"], "seed": 5}}) == [5]
    assert train_config({**params, "train": {**params["train"], "members": [3, 5]}})["members"] == [3, 5]
    # what a `-S train.members=...` cannot change under a profile is said (stages.train prints it)
    assert profile_overrides({**params, "profile": "demo"}) == {"members": ([42, 7, 1], None)}
    # the cpu profile caps the training's minutes (train.max_minutes) so that the hour holds on a slow machine,
    # with the other stages' few minutes to spare
    assert profile_overrides(params) == {"max_minutes": (None, 51)}


def test_distil_trains_the_first_members_run_on_the_teachers_targets(cfg, prepared, tmp_path, monkeypatch):
    params = ensemble_stage(monkeypatch, prepared, tmp_path, members=[1, 2], distil=0.5)
    taught = []
    soft_targets = datasets.soft_targets
    monkeypatch.setattr(datasets, "soft_targets", lambda *a, **k: taught.append(a) or soft_targets(*a, **k))

    train_stage.main()

    metrics = json.loads((tmp_path / "train.json").read_text())
    assert metrics["seed"] == [1, 2] and metrics["student_seed"] == 1 and metrics["distil"] == 0.5
    assert [m["seed"] for m in metrics["members"]] == [1, 2]
    assert metrics["train_seconds"] == pytest.approx(metrics["student_train_seconds"]
                                                     + sum(m["train_seconds"] for m in metrics["members"]), abs=0.21)
    assert (tmp_path / "model.keras").read_bytes() == (tmp_path / "selection.keras").read_bytes()
    assert (tmp_path / "live/plots/metrics/eval/dice.tsv").is_file()  # the student's curves
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # neither teacher nor member left
    student = keras.models.load_model(tmp_path / "model.keras", compile=False)
    assert metrics["params"] == student.count_params() == metrics["members"][0]["params"]  # one network
    (teacher, x, y, weight, _), = taught
    assert teacher.name == "teacher.keras" and weight == 0.5 and len(x) == 8

    # with the teacher's targets replaced by the masks, the student is, weight for weight, the first member's run
    # (the members not trained again: the first pass's student, kept in place until the second is saved, serves as
    # the teacher whose outputs are then unused)
    def members_trained_before(name, cfg, seeds, data_dir, teacher, *rest, **budget):
        shutil.copy(tmp_path / "model.keras", teacher)
        return {"train_seconds": 0.0, "members": []}

    monkeypatch.setattr(train_stage, "train_members", members_trained_before)
    monkeypatch.setattr(datasets, "soft_targets", lambda teacher, x, y, weight, batch_size=32: y)
    train_stage.main()
    keras.backend.clear_session()
    train("unet", train_config(params), 1, prepared, tmp_path / "alone.keras", None)
    alone = keras.models.load_model(tmp_path / "alone.keras", compile=False).get_weights()
    masks_only = keras.models.load_model(tmp_path / "model.keras", compile=False).get_weights()
    assert all(np.array_equal(a, b) for a, b in zip(alone, masks_only))
    assert not all(np.array_equal(a, b) for a, b in zip(alone, student.get_weights()))


@pytest.mark.parametrize("weight, fix", [(1.5, "from 0 to 1"), (-0.1, "from 0 to 1"), ("0.5", "from 0 to 1"),
                                         (True, "from 0 to 1"), (0.5, "needs a teacher")])
def test_distil_without_a_teacher_or_out_of_range_names_the_fix(weight, fix):
    with pytest.raises(BrainsegError, match=f"train.distil .*{fix}.*train.(distil|members)"):
        train_stage.distil_weight({"distil": weight}, [])


def test_distil_zero_or_null_trains_no_student():
    assert train_stage.distil_weight({"distil": 0}, [42, 7]) == 0 == train_stage.distil_weight({}, [])
    assert train_stage.distil_weight({"distil": 1}, [42, 7]) == 1.0


def test_monitor_val_dice_volume_keeps_the_best_dice_epoch_and_trains_exactly_as_val_loss(prepared, cfg, tmp_path):
    runs = {}
    for watch in ("val_loss", "val_dice_volume"):
        run = tmp_path / watch
        summary = train("unet", {**cfg, "epochs": 4, "patience": 10, "learning_rate": 0.01, "monitor": watch}, 0,
                        prepared, run / "model.keras", run / "live")
        table = pd.read_csv(run / "live/val_dice_volume.csv", dtype={"patient": str})
        logged = pd.read_csv(run / "live/plots/metrics/eval/dice_volume.tsv", sep="\t")["dice_volume"].to_numpy()
        loss = pd.read_csv(run / "live/plots/metrics/eval/loss.tsv", sep="\t")["loss"].to_numpy()
        runs[watch] = summary, table, logged, loss
        assert summary["monitor"] == watch and len(table) == 4 * table["patient"].nunique()
        np.testing.assert_allclose(table.groupby("epoch")["dice"].mean().to_numpy(), logged, rtol=1e-6)
    (loss_run, _, dice_by_epoch, losses), (dice_run, _, dice_again, losses_again) = runs.values()
    np.testing.assert_array_equal(losses, losses_again)  # the monitor never changes training
    np.testing.assert_array_equal(dice_by_epoch, dice_again)
    assert loss_run["best_epoch"] == int(np.argmin(losses)) + 1
    assert loss_run["best_epoch"] != dice_run["best_epoch"]  # else this run could not tell the monitors apart
    assert dice_run["best_epoch"] == int(np.argmax(dice_by_epoch)) + 1
    assert dice_run["best_val_dice_volume"] == pytest.approx(dice_by_epoch.max())
    # the saved model is that epoch's: scoring it again gives the best Dice
    _, val_ds, _ = make_datasets(prepared, SIZE, 4, outputs=1, input_norm=cfg.get("input_norm"))
    patients = prepared_data.read_table(prepared, "val")[0]["patient"]
    again = VolumeDice.of(val_ds, patients, 4)
    again.set_model(keras.models.load_model(tmp_path / "val_dice_volume/model.keras", safe_mode=True))
    logs = {}
    again.on_epoch_end(0, logs)
    assert logs["val_dice_volume"] == pytest.approx(dice_by_epoch.max(), abs=1e-6)


@pytest.mark.parametrize("name, watch, fix", [("unet", "val_dice", "train.monitor=val_dice_volume"),
                                              ("cnn", "val_dice_volume", "train.monitor=val_loss")])
def test_a_monitor_that_cannot_pick_the_epoch_names_the_fix(prepared, cfg, tmp_path, name, watch, fix):
    with pytest.raises(BrainsegError, match=fix):
        train(name, {**cfg, "monitor": watch}, 0, prepared, tmp_path / "model.keras", None)
    assert not (tmp_path / "model.keras").exists()


def test_a_classifiers_run_leaves_no_stale_per_patient_dice(prepared, cfg, tmp_path):
    (tmp_path / "live").mkdir()
    (tmp_path / "live/val_dice_volume.csv").write_text("epoch,patient,dice\n1,X,0.5\n")
    summary = train("cnn", cfg, 0, prepared, tmp_path / "model.keras", tmp_path / "live")
    assert summary["monitor"] == "val_loss" and "best_val_dice_volume" not in summary
    assert not (tmp_path / "live/val_dice_volume.csv").exists()
