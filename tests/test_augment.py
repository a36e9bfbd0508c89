import keras
import numpy as np
import pytest

import stages.prepared as prepared_data
from stages.augment import RandomGamma, RandomMissingSequences
from stages.common import BrainsegError
from stages.datasets import make_datasets
from stages.preprocess import mask_to_model_size, to_model_input


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
    out = np.asarray(RandomGamma(0.5, seed=1)(x))
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
    assert np.array_equal(np.asarray(RandomGamma(0.5, seed=1)(x, training=False)), x)

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
    out = np.asarray(RandomMissingSequences(0.4, seed=1)(x))
    post = (out[..., 2] == out[..., 1]).all(axis=(1, 2))
    pre = (out[..., 0] == out[..., 1]).all(axis=(1, 2))
    assert np.array_equal(out[..., 1:2], x[..., 1:2]) and np.array_equal(out[..., 3], x[..., 3])
    assert np.array_equal(out[~post], x[~post]) and not (pre & ~post).any()  # pre-contrast only with post
    assert np.array_equal(out[post][..., 2], x[post][..., 1]) and np.array_equal(out[pre][..., 0], x[pre][..., 1])
    assert 0.37 < post.mean() < 0.43 and 0.17 < pre.mean() < 0.23
    assert np.array_equal(np.asarray(RandomMissingSequences(0.4, seed=1)(x, training=False)), x)

    train_ds = make_datasets(prepared, 32, 16, augment={"missing": 1.0, "gamma": 0.5})[0]
    images, masks, _ = prepared_data.load_split(prepared, "train")
    batch, targets = (np.asarray(t) for t in next(iter(train_ds)))
    assert np.array_equal(batch[..., 2], batch[..., 1])  # after gamma: the copy is exact, as in the data set
    assert not np.array_equal(batch[..., 0], batch[..., 1])  # a draw whose pre-contrast stayed
    model_masks = mask_to_model_size(masks, 32)
    assert all((targets == mask).all(axis=(1, 2, 3)).any() for mask in model_masks)  # the masks are left as they were
    with pytest.raises(BrainsegError, match=r"train.augment .*missing a probability"):
        make_datasets(prepared, 32, 16, augment={"missing": 1.5})
