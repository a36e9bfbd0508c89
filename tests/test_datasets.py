import keras
import numpy as np
import pandas as pd
import pytest

import stages.prepared as prepared_data
from stages import datasets
from stages.augment import augmenter
from stages.common import BrainsegError
from stages.datasets import (make_datasets, slices_per_epoch, soft_targets, steps_per_epoch, table_neighbours,
                             table_positions, with_neighbours)
from stages.preprocess import mask_to_model_size, to_model_input
from stages.train import summarize
from tests.conftest import SIZE, write_prepared


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


def test_other_keras_backends_get_the_same_batches_without_tf_data(prepared, monkeypatch):
    """JAX / PyTorch (a GPU machine without TensorFlow) take SliceBatches: the same slices, targets and
    augmentation as the tf.data path, reshuffled each epoch by the seed."""
    tf_train, tf_val, n = make_datasets(prepared, 32, 4, outputs=2)
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    train_b, val_b, n_b = make_datasets(prepared, 32, 4, seed=3, outputs=2)
    assert isinstance(train_b, datasets.SliceBatches) and n_b == n == 8 and len(train_b) == 2
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
    flipped = datasets.SliceBatches(images, masks, 16, 3, augmenter({"flip": True}, 3))
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


def test_slice_position_channel_gives_each_slice_and_its_copies_their_place_in_the_volume(prepared):
    table = pd.DataFrame({"patient": ["B", "A", "A", "A", "B", "A", "B"], "slice": [2, 1, 2, 3, 1, 2, 2],
                          "copy": [-1, -1, -1, -1, -1, 0, 1]})  # the last two: copies of A's and B's slice 2
    assert np.allclose(table_positions(table), [1, 0, 0.5, 1, 0, 0.5, 1])
    x, _ = next(iter(make_datasets(prepared, 32, 16, slice_position=True, input_norm="volume")[1]))
    assert x.shape[-1] == 4
    plane = np.asarray(x[..., 3])
    assert np.allclose(plane, np.round(255 * np.arange(4) / 3)[:, None, None] / 255)  # val: 4 slices, in order
    plain, _ = next(iter(make_datasets(prepared, 32, 16, input_norm="volume")[1]))
    assert np.array_equal(np.asarray(x[..., :3]), np.asarray(plain))  # the pixels are untouched


def test_neighbour_channels_come_from_the_patients_original_slices_and_copies_get_their_augmentation(prepared):
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


def test_a_patient_with_copies_but_no_originals_is_refused_with_the_fix():
    table = pd.DataFrame({"patient": ["A", "B"], "slice": [1, 1], "copy": [-1, 0]})
    for places in (table_positions, lambda t: table_neighbours(t, 1)):
        with pytest.raises(BrainsegError, match="patient B has augmented copies but no original.*balance --force"):
            places(table)


def test_soft_targets_mix_the_masks_with_the_teachers_outputs():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (300, 8, 8, 3), dtype=np.uint8)  # more than one 256-slice chunk
    y = (rng.random((300, 8, 8, 1)) > 0.5).astype(np.float16)
    mean = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Lambda(lambda t: keras.ops.mean(t, -1, True))])
    seen = mean.predict(x.astype(np.float32) / 255.0, verbose=0)  # the teacher sees inputs scaled as training does
    soft = soft_targets(mean, x, y, 0.25)
    assert soft.dtype == np.float16 and soft.shape == y.shape
    np.testing.assert_allclose(soft, 0.75 * y.astype(np.float32) + 0.25 * seen, atol=1e-3)
    # a teacher with several outputs (deep supervision) is taken at its last, the mask head
    np.testing.assert_allclose(soft_targets(lambda t: [0 * t[..., :1], 0 * t[..., :1] + 0.5], x, y, 1.0),
                               0.5)
    np.testing.assert_array_equal(soft_targets(lambda t: t[..., :1], x, y, 0.0), y)


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
