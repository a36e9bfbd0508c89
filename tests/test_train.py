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
from stages.common import ROOT, BrainsegError, load_params, train_config
from stages.models import build_model
from stages.preprocess import mask_to_model_size, to_model_input
from stages.train import (callbacks, compile_model, learning_rate, make_datasets, slices_per_epoch,
                          steps_per_epoch, summarize, train)
from tests.conftest import write_data

SIZE = 64


def write_prepared(folder, counts=(("train", 8), ("val", 4))):
    """A tiny `data` folder in the balance stage's layout; every other slice has a bright 'tumour'.
    The last two training slices are augmented copies (pixels in train_copies_*.npy)."""
    rng = np.random.default_rng(0)
    n_all = sum(n for _, n in counts)
    images = rng.integers(0, 120, (n_all, SIZE, SIZE, 3), dtype=np.uint8)
    masks = np.zeros((n_all, SIZE, SIZE), np.uint8)
    masks[::2, 16:40, 20:44] = 1
    images[masks.astype(bool)] = 230
    tables, copies, start = {}, {}, 0
    for split, n in counts:
        rows = np.arange(start, start + n)
        start += n
        copy = np.full(n, -1)
        if split == "train":
            copy[-2:] = [0, 1]
            copies[split] = images[rows[-2:]], masks[rows[-2:]]
            rows[-2:] = rows[:2]  # a copy's row is its source slice's
        area = masks.reshape(n_all, -1).sum(axis=1)[start - n:start]
        tables[split] = pd.DataFrame({"patient": "TCGA_XX_0001", "case": "TCGA_XX_0001_20000101",
                                      "slice": range(1, n + 1), "image": "", "augmentation": "",
                                      "tumour": (area > 0).astype(int), "area": area, "row": rows, "copy": copy})
    return write_data(folder, images, masks, tables, copies)


@pytest.fixture
def prepared(tmp_path):
    return write_prepared(tmp_path)


@pytest.fixture
def cfg():
    """params.yaml's train section under the demo profile, shrunk to one epoch of a 4-filter model."""
    params = load_params()
    params["profile"] = "demo"
    return {**train_config(params), "epochs": 1, "batch_size": 4, "filters": 4, "image_size": SIZE}


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

    monkeypatch.setattr(train_stage, "callbacks", lambda *args: [*callbacks(*args), Kill()])
    with pytest.raises(KeyboardInterrupt):
        train("cnn", cfg, 0, prepared, model_path, None)
    assert model_path.read_bytes() == b"previous model"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".train.")] == []


def test_make_datasets_labels_filters_and_targets(prepared):
    train_ds, val_ds, n = make_datasets(prepared, 32, 16, classifier=True)
    x, y = next(iter(train_ds))
    assert n == 8 and x.shape == (8, 32, 32, 3) and x.dtype == "float32" and float(np.max(x)) <= 1
    assert sorted(np.asarray(y).ravel()) == [0] * 4 + [1] * 4

    train_ds, val_ds, n = make_datasets(prepared, 32, 16, tumour_slices_only=True, outputs=2)
    x, (y1, y2) = next(iter(train_ds))
    assert n == 4 and y1.shape == (4, 32, 32, 1) and np.asarray(y1).reshape(4, -1).max(axis=1).min() > 0
    assert next(iter(val_ds))[0].shape[0] == 4  # validation keeps its tumour-free slices

    # the batches hold exactly what evaluation and inference feed the model, and the area-resized masks
    images, masks, _ = prepared_data.load_split(prepared, "val")
    x, y = next(iter(make_datasets(prepared, 32, 16)[1]))
    assert np.array_equal(x, to_model_input(images, 32)) and np.array_equal(y, mask_to_model_size(masks, 32))


def test_volume_norm_standardises_copies_with_their_patients_originals(prepared):
    from stages.preprocess import standardise_volume, volume_stats
    images, _, table = prepared_data.load_split(prepared, "train")
    originals = images[table["copy"].to_numpy() < 0]  # one patient: the copies are of its slices
    expected = to_model_input(standardise_volume(images, volume_stats(originals)), 32)
    x, _ = next(iter(make_datasets(prepared, 32, 16, input_norm="volume")[0]))
    def key(batch):  # the training batches are shuffled
        return sorted(np.asarray(s).tobytes() for s in batch)
    assert key(x) == key(expected)
    val_images, _, _ = prepared_data.load_split(prepared, "val")
    x, _ = next(iter(make_datasets(prepared, 32, 16, input_norm="volume")[1]))
    assert np.array_equal(x, to_model_input(standardise_volume(val_images), 32))


def test_online_augmentation_moves_each_training_slice_with_its_mask_anew_each_epoch(prepared):
    images, masks, _ = prepared_data.load_split(prepared, "train")
    originals = to_model_input(images, 32)
    flip = {"flip": True}
    train_ds, val_ds, _ = make_datasets(prepared, 32, 16, augment=flip)
    mirrored = []
    for _ in range(2):  # two epochs
        x, y = (np.asarray(t) for t in next(iter(train_ds)))
        for image, mask in zip(x, y):
            same = [i for i in range(len(originals)) if np.array_equal(image, originals[i])]
            mirror = [i for i in range(len(originals)) if np.array_equal(image, originals[i][:, ::-1])]
            assert same or mirror  # a slice is mirrored whole or left alone
            source = (same or mirror)[0]
            expected = mask_to_model_size(masks[source:source + 1], 32)[0]
            assert np.array_equal(mask, expected if same else expected[:, ::-1])
            mirrored.append(bool(mirror) and not same)
    assert 0 < sum(mirrored) < len(mirrored)
    one = next(iter(make_datasets(prepared, 32, 16, augment=flip)[0]))
    two = next(iter(make_datasets(prepared, 32, 16, augment=flip)[0]))
    assert all(np.array_equal(a, b) for a, b in zip(one, two))  # the seed fixes the draws
    x, y = next(iter(val_ds))  # validation is never augmented
    val_images, val_masks, _ = prepared_data.load_split(prepared, "val")
    assert np.array_equal(x, to_model_input(val_images, 32)) and np.array_equal(y, mask_to_model_size(val_masks, 32))

    # rotation and zoom interpolate: the bright 'tumour' pixels stay under the (soft) mask
    x, y = (np.asarray(t) for t in next(iter(make_datasets(prepared, 32, 16, augment={**flip, "rotation": 25,
                                                                                        "zoom": 0.2})[0])))
    inside, outside = y[..., 0] > 0.9, y[..., 0] < 0.1
    assert x[..., 0][inside].min() > 0.8 and x[..., 0][outside].max() < 0.6
    assert not np.isin(y, [0, 1]).all()  # interpolated, not just moved
    _, labels = next(iter(make_datasets(prepared, 32, 16, classifier=True, augment={"rotation": 25})[0]))
    assert sorted(np.asarray(labels).ravel()) == [0] * 4 + [1] * 4  # a classifier's labels stay labels
    keras.mixed_precision.set_global_policy("mixed_float16")  # the GPU recipe's policy, active while train builds
    try:
        x, y = next(iter(make_datasets(prepared, 32, 16, augment={**flip, "rotation": 25})[0]))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert x.dtype == y.dtype == "float32"
    with pytest.raises(BrainsegError, match=r"params.yaml: train.augment .*zoom.*Fix: .*dvc exp run"):
        make_datasets(prepared, 32, 16, augment={"zoom": 1.5})


def test_gamma_augmentation_changes_each_channels_contrast_keeping_its_range_order_and_background(prepared):
    rng = np.random.default_rng(0)
    x = rng.uniform(0.05, 1.0, (16, 12, 12, 3)).astype("float32")
    x[:, :4] = 0  # background
    out = np.asarray(train_stage.RandomGamma(0.5, seed=1)(x))
    assert np.array_equal(out[:, :4], x[:, :4])
    changed = 0
    for i in range(16):
        for c in range(3):
            head, new = x[i, 4:, :, c].ravel(), out[i, 4:, :, c].ravel()
            assert np.allclose([new.min(), new.max()], [head.min(), head.max()], atol=1e-6)
            assert np.all(np.diff(new[np.argsort(head)]) >= -1e-6)  # tissues keep their order
            low, span = head.min(), head.max() - head.min()
            inner = (head - low > 0.1 * span) & (head - low < 0.9 * span)
            powers = np.log((new[inner] - low) / span) / np.log((head[inner] - low) / span)
            assert np.allclose(powers, powers.mean(), atol=1e-3) and 1 / 1.5 - 1e-3 < powers.mean() < 1.5 + 1e-3
            changed += not np.allclose(new, head)
    assert 10 < changed < 38  # each channel of each slice with probability 0.5
    assert np.array_equal(np.asarray(train_stage.RandomGamma(0.5, seed=1)(x, training=False)), x)

    train_ds = make_datasets(prepared, 32, 16, augment={"gamma": 0.5})[0]
    images, masks, _ = prepared_data.load_split(prepared, "train")
    first, second = (next(iter(train_ds)) for _ in range(2))
    assert not np.array_equal(first[0], second[0])  # drawn anew each epoch
    order = [np.flatnonzero((np.asarray(first[1]) == mask_to_model_size(masks, 32)[i]).all(axis=(1, 2, 3)))
             for i in range(len(masks))]
    assert all(len(rows) for rows in order)  # the masks are left as they were
    assert not np.allclose(np.sort(np.asarray(first[0]), axis=None), np.sort(to_model_input(images, 32), axis=None))
    with pytest.raises(BrainsegError, match=r"train.augment .*gamma a number above 0"):
        make_datasets(prepared, 32, 16, augment={"gamma": -1})


def test_missing_sequence_augmentation_copies_flair_over_post_contrast_and_half_as_often_pre_contrast(prepared):
    rng = np.random.default_rng(0)
    x = rng.uniform(0.05, 1.0, (4000, 2, 2, 4)).astype("float32")  # a fourth channel (slice position) stays
    out = np.asarray(train_stage.RandomMissingSequences(0.4, seed=1)(x))
    post = (out[..., 2] == out[..., 1]).all(axis=(1, 2))
    pre = (out[..., 0] == out[..., 1]).all(axis=(1, 2))
    assert np.array_equal(out[..., 1:2], x[..., 1:2]) and np.array_equal(out[..., 3], x[..., 3])
    assert np.array_equal(out[~post], x[~post]) and not (pre & ~post).any()  # pre-contrast only with post
    assert np.array_equal(out[post][..., 2], x[post][..., 1]) and np.array_equal(out[pre][..., 0], x[pre][..., 1])
    assert 0.37 < post.mean() < 0.43 and 0.17 < pre.mean() < 0.23
    assert np.array_equal(np.asarray(train_stage.RandomMissingSequences(0.4, seed=1)(x, training=False)), x)

    train_ds = make_datasets(prepared, 32, 16, augment={"missing": 1.0, "gamma": 0.5})[0]
    images, masks, _ = prepared_data.load_split(prepared, "train")
    batch, targets = (np.asarray(t) for t in next(iter(train_ds)))
    assert np.array_equal(batch[..., 2], batch[..., 1])  # after gamma: the copy is exact, as in the data set
    assert not np.array_equal(batch[..., 0], batch[..., 1])  # a draw whose pre-contrast stayed
    model_masks = mask_to_model_size(masks, 32)
    assert all((targets == mask).all(axis=(1, 2, 3)).any() for mask in model_masks)  # the masks are left as they were
    with pytest.raises(BrainsegError, match=r"train.augment .*missing a probability"):
        make_datasets(prepared, 32, 16, augment={"missing": 1.5})


def test_a_split_left_without_slices_names_the_fix(tmp_path):
    data = write_prepared(tmp_path, counts=(("train", 8), ("val", 0)))
    with pytest.raises(BrainsegError, match="no val slices to train on.*dvc repro"):
        make_datasets(data, 32, 4)


def test_missing_or_inconsistent_prepared_data_names_the_file_and_fix(tmp_path):
    with pytest.raises(BrainsegError, match="train.csv: missing.*dvc repro balance"):
        make_datasets(tmp_path, 32, 4)
    write_prepared(tmp_path)
    (tmp_path / "prepared/train_copies_masks.npy").unlink()
    with pytest.raises(BrainsegError, match="train's augmented copies missing.*dvc repro balance"):
        make_datasets(tmp_path, 32, 4)


def test_learning_rate_schedules_and_optimizer_checks(cfg, tmp_path):
    cosine = learning_rate({**cfg, "lr_schedule": "cosine", "epochs": 3}, steps_per_epoch=10)
    assert isinstance(cosine, keras.optimizers.schedules.CosineDecay) and cosine.decay_steps == 30
    assert learning_rate({**cfg, "lr_schedule": "constant"}, 10) == cfg["learning_rate"]
    kinds = [type(c).__name__ for c in callbacks({**cfg, "lr_schedule": "plateau"}, tmp_path / "m.keras")]
    assert kinds == ["ReduceLROnPlateau", "EarlyStopping", "ModelCheckpoint"]
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, activation="sigmoid")], name="cnn")
    for key, value, match in [("lr_schedule", "step", "lr_schedule"), ("optimizer", "sgd", "optimizer")]:
        with pytest.raises(BrainsegError, match=match):
            compile_model(model, {**cfg, key: value})


def test_ema_weights_are_validated_chosen_and_saved(prepared, cfg, tmp_path):
    """Momentum 1 freezes the average at the first step's weights: each epoch validates the same weights (the
    cnn has no batch-norm statistics that could move them), and the saved model is those weights."""
    kinds = [type(c).__name__ for c in callbacks({**cfg, "lr_schedule": "plateau", "ema": 0.99}, tmp_path / "m.keras")]
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


def test_other_keras_backends_get_the_same_batches_without_tf_data(prepared, monkeypatch):
    """JAX / PyTorch (a GPU machine without TensorFlow) take SliceBatches: the same slices, targets and
    augmentation as the tf.data path, reshuffled each epoch by the seed."""
    tf_train, tf_val, n = make_datasets(prepared, 32, 4, outputs=2)
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    train_b, val_b, n_b = make_datasets(prepared, 32, 4, seed=3, outputs=2)
    assert isinstance(train_b, train_stage.SliceBatches) and n_b == n == 8 and len(train_b) == 2
    for (x, (y, y2)), (tx, (ty, _)) in zip((val_b[i] for i in range(len(val_b))), tf_val):
        assert x.dtype == y.dtype == "float32" and np.array_equal(x, tx) and np.array_equal(y, ty)
        assert y2 is y
    tf_rows = sorted(np.asarray(x).tobytes() for x, _ in tf_train.unbatch())

    def epoch(batches):
        rows = [row for i in range(len(batches)) for row in batches[i][0]]
        batches.on_epoch_end()
        return [row.tobytes() for row in rows]

    first, second = epoch(train_b), epoch(train_b)
    assert sorted(first) == sorted(second) == tf_rows and first != second  # every slice once, new order
    assert epoch(make_datasets(prepared, 32, 4, seed=3)[0]) == first  # the seed fixes the order

    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (16, 8, 8, 3), dtype=np.uint8)
    masks = np.zeros((16, 8, 8, 1), np.float16)
    masks[:, 2:5, 1:3] = 1  # off-centre: a mirrored mask differs from the original
    flipped = train_stage.SliceBatches(images, masks, 16, 3, train_stage.augmenter({"flip": True}, 3))
    x, y = flipped[0]
    mirrored = 0
    for image, mask in zip(np.rint(x * 255), y):  # each mask moves with its slice
        source = next(i for i in range(16) if np.array_equal(image, images[i])
                      or np.array_equal(image, images[i][:, ::-1]))
        same = np.array_equal(image, images[source])
        assert np.array_equal(mask, masks[source] if same else masks[source][:, ::-1])
        mirrored += not same
    assert 0 < mirrored < len(x)


def test_slice_batches_train_on_full_batches_only_and_validate_on_every_slice(prepared, monkeypatch):
    """Off TensorFlow the training batches are all full (XLA compiles a step per batch shape): the partial last
    batch of each epoch's order is left out, a different few slices each epoch; validation keeps every slice,
    and the slice rate counts only the slices trained on."""
    tf_train = make_datasets(prepared, 32, 3)[0]
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    train_b, val_b, n = make_datasets(prepared, 32, 3, seed=3)
    assert n == 8 and len(train_b) == 2 and train_b.drop_remainder and not val_b.drop_remainder
    assert sum(len(val_b[i][0]) for i in range(len(val_b))) == len(val_b.x)
    assert steps_per_epoch(train_b, n, 3) == 2 and steps_per_epoch(tf_train, n, 3) == len(tf_train) == 3
    assert slices_per_epoch(train_b, n) == 6 and slices_per_epoch(val_b, len(val_b.x)) == len(val_b.x)
    assert slices_per_epoch(tf_train, n) == 8

    left_out = []
    for _ in range(3):
        rows = {np.asarray(row).tobytes() for i in range(len(train_b)) for row in train_b[i][0]}
        assert all(len(train_b[i][0]) == 3 for i in range(len(train_b))) and len(rows) == 6
        left_out.append(frozenset(r.tobytes() for r in to_model_input(train_b.x, 32)) - rows)
        train_b.on_epoch_end()
    assert all(len(slices) == 2 for slices in left_out) and len(set(left_out)) > 1

    small = make_datasets(prepared, 32, 16, seed=3)[0]  # fewer slices than a batch: kept as one batch
    assert len(small) == 1 and len(small[0][0]) == 8
    history = {"val_loss": [0.5], "loss": [0.6]}
    summary = summarize("unet", {"profile": "gpu", "image_size": 32, "batch_size": 3, "filters": 4},
                        keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)]), history, n_train=8,
                        seconds=2.0, train_step_seconds=1.0, per_epoch=6)
    assert summary["train_slices"] == 8 and summary["train_slices_per_s"] == 6.0


def _epoch(limit, epoch, steps_begin, test_begin, end):
    """One epoch as Keras calls the callback, on a fake clock: batch starts, validation start, epoch end."""
    times = iter([steps_begin[0], *steps_begin, test_begin, end])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_stage.time, "perf_counter", lambda: next(times))
        limit.model.stop_training = False
        limit.on_epoch_begin(epoch)
        for i in range(len(steps_begin)):
            limit.on_train_batch_begin(i)
        limit.on_test_begin()
        limit.on_epoch_end(epoch)
    return limit.model.stop_training


def test_time_limit_stops_before_an_epoch_would_pass_it():
    limit = train_stage.TimeLimit(minutes=3)
    limit.set_model(keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)]))
    limit.start = 0.0
    # epoch 1 compiles: its first step takes 50 s, validation 47 s. Estimate: 4 x 1 s (median step) + 47 s,
    # so 100 s elapsed + 51 s fits in 180 s (the epoch's own 100 s would not have: 200 s); then 110 + 4 + 6 s
    assert not _epoch(limit, 0, [0, 50, 51, 52], 53, 100)
    assert not _epoch(limit, 1, [100, 101, 102, 103], 104, 110)
    # steps of 30 s: 235 s elapsed + 4 x 30 s + 5 s passes 180 s
    assert _epoch(limit, 2, [110, 140, 170, 200], 230, 235)


def test_time_limit_leaves_the_last_epoch_alone_and_says_when_it_stopped_training():
    limit = train_stage.TimeLimit(minutes=1)
    limit.set_model(keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)]))
    limit.set_params({"epochs": 2})
    limit.start = 0.0
    assert not _epoch(limit, 1, [0, 30, 60], 90, 100) and not limit.stopped  # past the budget, but the last epoch
    assert _epoch(limit, 0, [0, 30, 60], 90, 100) and limit.stopped  # a second epoch would have followed


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


def test_time_limit_without_validation_uses_the_epoch_itself():
    limit = train_stage.TimeLimit(minutes=1)
    limit.set_model(keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)]))
    limit.start = 0.0
    times = iter([0.0, 20.0, 40.0])  # epoch begins, its only batch begins, epoch ends: 40 s + 40 s > 60 s
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_stage.time, "perf_counter", lambda: next(times))
        limit.on_epoch_begin(0)
        limit.on_train_batch_begin(0)
        limit.on_epoch_end(0)
    assert limit.model.stop_training


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


def test_slice_position_channel_gives_each_slice_and_its_copies_their_place_in_the_volume(prepared):
    from stages.train import table_positions
    table = pd.DataFrame({"patient": ["B", "A", "A", "A", "B", "A", "B"], "slice": [2, 1, 2, 3, 1, 2, 2],
                          "copy": [-1, -1, -1, -1, -1, 0, 1]})  # the last two: copies of A's and B's slice 2
    assert np.allclose(table_positions(table), [1, 0, 0.5, 1, 0, 0.5, 1])
    x, _ = next(iter(make_datasets(prepared, 32, 16, slice_position=True, input_norm="volume")[1]))
    assert x.shape[-1] == 4
    plane = np.asarray(x[..., 3])
    assert np.allclose(plane, np.round(255 * np.arange(4) / 3)[:, None, None] / 255)  # val: 4 slices, in order
    plain, _ = next(iter(make_datasets(prepared, 32, 16, input_norm="volume")[1]))
    assert np.array_equal(np.asarray(x[..., :3]), np.asarray(plain))  # the pixels are untouched


def test_train_with_slice_position_saves_a_four_channel_model(prepared, cfg, tmp_path):
    model_path = tmp_path / "model.keras"
    train("unet", {**cfg, "slice_position": True}, 0, prepared, model_path, None)
    from stages.inference import load_model, slice_positioned
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


def test_neighbour_channels_come_from_the_patients_original_slices_and_copies_get_their_augmentation(prepared):
    from stages.train import table_neighbours, with_neighbours
    table = pd.DataFrame({"patient": ["B", "A", "A", "A", "B", "A", "B"], "slice": [2, 3, 1, 2, 1, 2, 1],
                          "copy": [-1, -1, -1, -1, -1, 0, 1], "augmentation": ["", "", "", "", "", "flip", ""]})
    # A's slices 1, 2, 3 are rows 2, 3, 1; a copy of A's slice 2 takes that slice's neighbours
    assert table_neighbours(table, 1).tolist() == [[4, 0], [3, 1], [2, 3], [2, 1], [4, 0], [2, 1], [4, 0]]
    x = np.random.default_rng(0).integers(0, 256, (7, 8, 8, 3), dtype=np.uint8)
    out = with_neighbours(x, table, 1)
    assert np.array_equal(out[3, ..., 3], x[2, ..., 1]) and np.array_equal(out[6, ..., 4], x[0, ..., 1])
    assert np.array_equal(out[5, ..., 3], x[2, :, ::-1, 1])  # the copy was mirrored, so are its neighbours
    xs, _ = next(iter(make_datasets(prepared, 32, 16, input_norm="volume", neighbours=1, slice_position=True)[1]))
    plain, _ = next(iter(make_datasets(prepared, 32, 16, input_norm="volume", slice_position=True)[1]))
    assert xs.shape[-1] == 6
    xs, plain = np.asarray(xs), np.asarray(plain)
    # OpenCV resizes more than four channels with its own rounding: up to one level of 255
    assert np.abs(xs[..., :3] - plain[..., :3]).max() <= 1.001 / 255  # the slice is untouched
    assert np.abs(xs[..., 5] - plain[..., 3]).max() <= 1.001 / 255  # the position stays last
    assert np.abs(xs[1, ..., 3] - plain[0, ..., 1]).max() <= 1.001 / 255  # val slice 2's lower neighbour


def test_train_with_neighbours_saves_a_model_that_asks_for_them(prepared, cfg, tmp_path):
    model_path = tmp_path / "model.keras"
    train("unet", {**cfg, "neighbours": 1}, 0, prepared, model_path, None)
    from stages.inference import load_model, neighbour_count
    model = load_model(model_path)
    assert model.input_shape[-1] == 5 and neighbour_count(model) == 1


def test_a_patient_with_copies_but_no_originals_is_refused_with_the_fix():
    from stages.train import table_neighbours, table_positions
    table = pd.DataFrame({"patient": ["A", "B"], "slice": [1, 1], "copy": [-1, 0]})
    for places in (table_positions, lambda t: table_neighbours(t, 1)):
        with pytest.raises(BrainsegError, match="patient B has augmented copies but no original.*balance --force"):
            places(table)


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
    from stages import inference

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
    assert ensemble.name == "unet" and inference.volume_normalised(ensemble)
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
    np.testing.assert_allclose(inference._runner(ensemble, "litert")(x), mean, atol=1e-4)


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


def test_soft_targets_mix_the_masks_with_the_teachers_outputs():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (300, 8, 8, 3), dtype=np.uint8)  # more than one 256-slice chunk
    y = (rng.random((300, 8, 8, 1)) > 0.5).astype(np.float16)
    mean = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Lambda(lambda t: keras.ops.mean(t, -1, True))])
    seen = mean.predict(x.astype(np.float32) / 255.0, verbose=0)  # the teacher sees inputs scaled as training does
    soft = train_stage.soft_targets(mean, x, y, 0.25)
    assert soft.dtype == np.float16 and soft.shape == y.shape
    np.testing.assert_allclose(soft, 0.75 * y.astype(np.float32) + 0.25 * seen, atol=1e-3)
    # a teacher with several outputs (deep supervision) is taken at its last, the mask head
    np.testing.assert_allclose(train_stage.soft_targets(lambda t: [0 * t[..., :1], 0 * t[..., :1] + 0.5], x, y, 1.0),
                               0.5)
    np.testing.assert_array_equal(train_stage.soft_targets(lambda t: t[..., :1], x, y, 0.0), y)


def test_a_teacher_changes_the_training_targets_and_leaves_validations(prepared):
    def constant(t):
        return np.full(t.shape[:-1] + (1,), 0.5, np.float32)

    (x, y), = make_datasets(prepared, SIZE, 16)[0].take(1)
    (_, val_y), = make_datasets(prepared, SIZE, 16)[1].take(1)
    taught, val, n = make_datasets(prepared, SIZE, 16, teacher=constant, distil=0.5)
    (tx, ty), = taught.take(1)
    (_, tval_y), = val.take(1)
    np.testing.assert_array_equal(tx, x)
    np.testing.assert_allclose(ty, 0.5 * np.asarray(y) + 0.25, atol=1e-3)
    np.testing.assert_array_equal(tval_y, val_y)
    assert n == 8


def test_distil_trains_the_first_members_run_on_the_teachers_targets(cfg, prepared, tmp_path, monkeypatch):
    params = ensemble_stage(monkeypatch, prepared, tmp_path, members=[1, 2], distil=0.5)
    taught = []
    soft_targets = train_stage.soft_targets
    monkeypatch.setattr(train_stage, "soft_targets", lambda *a, **k: taught.append(a) or soft_targets(*a, **k))

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
    monkeypatch.setattr(train_stage, "soft_targets", lambda teacher, x, y, weight, batch_size=32: y)
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


def test_volume_dice_pools_each_validation_patients_slices_and_logs_the_mean():
    """Identity 'model': the inputs are the probabilities. Patient A's two slices pool to 2*3/(2*3 + 1 + 2) = 2/3
    (one true pixel missed on the first, two false ones on the second); B's empty slice predicted empty scores 1."""
    truth = np.zeros((3, 4, 4, 1), np.float32)
    truth[0, 0, :3] = truth[1, 1, :1] = 1.0
    probs = truth.copy()
    probs[0, 0, 2] = 0.4   # below the threshold: missed
    probs[1, 2, :2] = 0.9  # false positives
    callback = train_stage.VolumeDice(probs, truth, ["A", "A", "B"], batch_size=2)
    callback.set_model(keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Identity()]))
    logs = {"val_loss": 0.3}
    callback.on_epoch_end(0, logs)
    a = 2 * 3 / (2 * 3 + 1 + 2)
    assert logs == {"val_loss": 0.3, "val_dice_volume": pytest.approx((a + 1.0) / 2)}
    assert callback.table().to_dict("records") == [{"epoch": 1, "patient": "A", "dice": pytest.approx(a)},
                                                   {"epoch": 1, "patient": "B", "dice": 1.0}]


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
    again = train_stage.VolumeDice.of(val_ds, patients, 4)
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
