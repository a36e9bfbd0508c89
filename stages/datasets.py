"""What training feeds the network: data/prepared's splits at model size as batched datasets (tf.data, or
SliceBatches on the other Keras backends), with the optional channels (slice position, neighbours), per-volume
standardisation, online augmentation (stages.augment) and distillation's soft targets."""
from __future__ import annotations

import math
from pathlib import Path

import keras
import numpy as np

from stages import prepared
from stages.augment import augmenter, same_transform
from stages.balance import replay
from stages.common import BrainsegError
from stages.preprocess import (add_neighbours, add_position, mask_to_model_size, neighbour_places, resize_images,
                               slice_positions, standardise_volume, to_model_input, volume_stats)


def make_datasets(data_dir: Path, image_size: int, batch_size: int, classifier: bool = False,
                  tumour_slices_only: bool = False, seed: int = 0, outputs: int = 1,
                  augment: dict | None = None, input_norm: str | None = None, slice_position: bool = False,
                  neighbours: int = 0, splits: tuple = ("train", "val"), teacher=None, distil: float = 0.0):
    """Batched tf.data datasets of model-size inputs and targets for `splits` (training, then validation),
    plus the training slice count. A split may be a tuple of prepared tables trained on together: the refit's
    ("train", "refit"), with no validation split.

    Slices are resized once here, a chunk at a time, and kept as uint8 (masks as float16: the soft edges of
    an area-resized binary mask, exact for halving); batches are scaled to float32 as they are drawn, so
    memory holds the split at model size in a quarter (images) and half (masks) of the float32 bytes.
    Targets are (size, size, 1) masks, or for a classifier 1.0 when the slice's mask has any tumour; a model
    with several `outputs` gets the target once per output. `tumour_slices_only` filters training slices only.
    `augment` (params.yaml's train.augment) transforms training batches anew each epoch: see augmenter().
    `input_norm: volume` standardises each patient's slices first (its copies with its originals' statistics,
    stages.preprocess.standardise_volume), so that split is held once at full size before it is resized.
    `slice_position` adds each slice's place in its patient's volume as a fourth channel (an augmented copy
    takes its source's: table_positions). `neighbours` > 0 adds the FLAIR of that many slices below and above
    each slice as channels (with_neighbours), before the position; that split is then held once at full size too.
    `teacher` (a model, its file, or any callable from float32 model inputs to its outputs) and `distil` > 0: the
    training targets become soft_targets' mix of the masks and the teacher's outputs; validation keeps the masks.
    On a Keras backend other than TensorFlow (JAX, PyTorch: a GPU machine without TensorFlow), the same batches
    come from SliceBatches instead of tf.data, except that each epoch's last partial training batch is left out:
    XLA compiles the training step once per batch shape, and on the H100 that second compile took ~45 s of the
    GPU recipe's second epoch. The epoch's shuffle decides which slices (fewer than a batch) wait for the next.
    """
    transform = augmenter(augment or {}, seed)
    datasets = []
    for i, names in enumerate(splits):
        training = i == 0
        parts = [split_arrays(Path(data_dir), name, image_size, input_norm, slice_position, neighbours)
                 for name in ((names,) if isinstance(names, str) else names)]
        x, y = (np.concatenate(arrays) if len(arrays) > 1 else arrays[0] for arrays in zip(*parts))
        tumour = y.max(axis=tuple(range(1, y.ndim))) > 0  # works on an empty split too
        if training and tumour_slices_only:
            keep = np.flatnonzero(tumour)
            x, y, tumour = x[keep], y[keep], tumour[keep]
        if len(x) == 0:
            raise BrainsegError(f"{data_dir}: no {'+'.join(names) if isinstance(names, tuple) else names} slices to "
                                "train on; check params.yaml split / train.tumour_slices_only and rerun `dvc repro`")
        if classifier:
            y = tumour.astype(np.float16)[:, None]
        if training and teacher is not None and distil > 0:
            y = soft_targets(teacher, x, y, distil, batch_size)
        if training:
            n_train = len(x)
        if keras.backend.backend() != "tensorflow":
            datasets.append(SliceBatches(x, y, batch_size, seed if training else None,
                                         transform if training else None, classifier, outputs,
                                         drop_remainder=training and len(x) >= batch_size))
            continue
        import tensorflow as tf

        ds = tf.data.Dataset.from_tensor_slices((x, y))
        if training:
            ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
        # the same float32 values as preprocess.to_model_input gives evaluation and inference
        ds = ds.batch(batch_size).map(lambda image, target: (tf.cast(image, tf.float32) / 255.0,
                                                             tf.cast(target, tf.float32)))
        if training and transform is not None:
            ds = ds.map(same_transform(transform, classifier))
        if outputs > 1:
            ds = ds.map(lambda image, target: (image, per_output(target, outputs)))
        datasets.append(ds.prefetch(tf.data.AUTOTUNE))
    return *datasets, n_train


def split_arrays(data_dir: Path, split: str, image_size: int, input_norm: str | None = None,
                 slice_position: bool = False, neighbours: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One prepared table's (inputs, masks) at model size, as make_datasets describes."""
    def to_model_size(images, masks):
        return resize_images(images, image_size), mask_to_model_size(masks, image_size).astype(np.float16)

    if input_norm == "volume" or neighbours:
        x, y, table = prepared.load_split(data_dir, split)
        if input_norm == "volume":
            for _, rows in table.reset_index(drop=True).groupby("patient").indices.items():
                originals = rows[table["copy"].to_numpy()[rows] < 0]
                x[rows] = standardise_volume(x[rows], volume_stats(x[originals]))
        if neighbours:
            x = with_neighbours(x, table, neighbours)
        x, y = to_model_size(x, y)
    else:
        x, y, table = prepared.load_split(data_dir, split, transform=to_model_size)
    if slice_position:
        x = add_position(x, table_positions(table))
    return x, y


def soft_targets(teacher, x: np.ndarray, y: np.ndarray, weight: float, batch_size: int = 32) -> np.ndarray:
    """Knowledge distillation's targets: (1 - weight) * the masks + weight * the teacher's outputs on the same
    model-size uint8 inputs (scaled as training scales them), as float16 like the masks. The teacher is run on the
    training split once, before training: the student sees the same soft targets each epoch."""
    if isinstance(teacher, (str, Path)):
        teacher = keras.models.load_model(teacher, safe_mode=True, compile=False)
    predict = teacher.predict if hasattr(teacher, "predict") else None
    soft = np.empty(y.shape, np.float16)
    for rows in (slice(start, start + 256) for start in range(0, len(x), 256)):  # a chunk at a time: memory
        chunk = to_model_input(x[rows], x.shape[1])  # already at model size: only scaled, as training does
        out = predict(chunk, batch_size=batch_size, verbose=0) if predict else teacher(chunk)
        out = np.asarray(out[-1] if isinstance(out, (list, tuple)) else out, np.float32)
        soft[rows] = (1.0 - weight) * y[rows].astype(np.float32) + weight * out.reshape(y[rows].shape)
    return soft


def patient_places(table):
    """For each patient of a prepared split: (its rows, its original slices' rows in slice-number order, each
    row's place among those originals). A copy keeps its source's slice number, so it takes its source's place."""
    numbers = table["slice"].to_numpy()
    originals = table["copy"].to_numpy() < 0
    for _, rows in table.reset_index(drop=True).groupby("patient").indices.items():
        own = rows[originals[rows]]
        if len(own) == 0:
            raise BrainsegError(f"patient {table['patient'].iloc[rows[0]]} has augmented copies but no original "
                                "slices in its split. Fix: run `dvc repro balance --force`")
        own = own[np.argsort(numbers[own], kind="stable")]
        yield rows, own, np.searchsorted(numbers[own], numbers[rows]).clip(0, len(own) - 1)


def table_positions(table) -> np.ndarray:
    """preprocess.slice_positions for a prepared split's rows: each slice's place among its patient's originals."""
    positions = np.empty(len(table), np.float32)
    for rows, own, place in patient_places(table):
        positions[rows] = slice_positions(np.zeros(len(own)))[place]
    return positions


def table_neighbours(table, count: int) -> np.ndarray:
    """preprocess.neighbour_rows for a prepared split's rows: the rows of each slice's `count` neighbours below
    and above among its patient's original slices."""
    out = np.empty((len(table), 2 * count), np.int64)
    for rows, own, place in patient_places(table):
        out[rows] = own[neighbour_places(len(own), count)[place]]
    return out


def with_neighbours(x: np.ndarray, table, count: int) -> np.ndarray:
    """A split's slices (table order) with the FLAIR of their neighbours as channels (preprocess.add_neighbours).
    An augmented copy's neighbours get the copy's own flip, rotation and blur (balance.replay), so the planes
    stay aligned with the slice they surround."""
    out = add_neighbours(x, table_neighbours(table, count))
    for row in np.flatnonzero(table["copy"].to_numpy() >= 0):
        out[row, ..., 3:] = replay(out[row, ..., 3:], table["augmentation"].iloc[row])
    return out


def per_output(target, outputs: int):
    """The target once per output of a model with several (doubleunet, deep supervision), else itself."""
    return (target,) * outputs if outputs > 1 else target


class SliceBatches(keras.utils.PyDataset):
    """make_datasets' batches without tf.data: uint8 slices scaled to float32 / 255 and float16 targets to
    float32 as each batch is drawn, reshuffled each epoch when `shuffle_seed` is set, `transform` applied to
    the batch (each mask moved with its slice), the target repeated for a model with several `outputs`.
    `drop_remainder`: full batches only (the last, partial one of each epoch's order is left out).
    Four threads assemble batches ahead of the accelerator."""

    def __init__(self, x, y, batch_size: int, shuffle_seed: int | None = None, transform=None,
                 classifier: bool = False, outputs: int = 1, drop_remainder: bool = False):
        super().__init__(workers=4, use_multiprocessing=False)
        self.x, self.y, self.batch_size, self.outputs = x, y, batch_size, outputs
        self.drop_remainder = drop_remainder
        self.transform = None if transform is None else same_transform(transform, classifier)
        self.order = np.arange(len(x))
        self.rng = None if shuffle_seed is None else np.random.default_rng(shuffle_seed)
        self.on_epoch_end()

    def __len__(self) -> int:
        return len(self.x) // self.batch_size if self.drop_remainder else math.ceil(len(self.x) / self.batch_size)

    def __getitem__(self, i: int):
        rows = np.sort(self.order[i * self.batch_size:(i + 1) * self.batch_size])  # sorted: sequential reads
        # the slices are at model size already: to_model_input only scales, as for evaluation and inference
        image, target = to_model_input(self.x[rows], self.x.shape[1]), self.y[rows].astype(np.float32)
        if self.transform is not None:
            image, target = (keras.ops.convert_to_numpy(t) for t in self.transform(image, target))
        return image, per_output(target, self.outputs)

    def on_epoch_end(self) -> None:
        if self.rng is not None:
            self.rng.shuffle(self.order)


def steps_per_epoch(train_ds, n_train: int, batch_size: int) -> int:
    """Training batches per epoch: SliceBatches may leave out a partial last batch, tf.data never does."""
    return len(train_ds) if isinstance(train_ds, SliceBatches) else math.ceil(n_train / batch_size)


def slices_per_epoch(train_ds, n_train: int) -> int:
    """Slices trained on per epoch: all `n_train`, less the partial last batch SliceBatches may leave out."""
    if isinstance(train_ds, SliceBatches) and train_ds.drop_remainder:
        return len(train_ds) * train_ds.batch_size
    return n_train
