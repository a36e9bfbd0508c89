"""The prepared splits (the balance stage's output) and how to read them.

data/prepared/{split}.csv lists a split's slices; its pixels are not copied again: `row` is the slice's row in
data/slices/{images,masks}.npy (the index stage's decoded slices) and, for an augmented copy, its source's row,
while `copy` (-1 for an original) is the copy's row in {split}_copies_{images,masks}.npy, the only pixels
balance writes. slices.json records which data/index.csv the rows refer to, so a prepared folder is never read
against other slices, and, where balance drew each member of a seed ensemble its own copies, the members: the first
member's are train's, each other's train_seed<S>'s (member_table).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd

from stages.common import BrainsegError

RECORD = "slices.json"


def index_digest(data: Path) -> str:
    try:
        return hashlib.sha256((Path(data) / "index.csv").read_bytes()).hexdigest()
    except FileNotFoundError:
        raise BrainsegError(f"{Path(data) / 'index.csv'}: missing. Fix: run `dvc repro index`") from None


def write_record(folder: Path, data: Path, slices: int, members: list[int] | None = None) -> None:
    """`folder`/slices.json: the digest of `data`/index.csv and its slice count, which the splits' rows refer to, and
    the seed ensemble's `members` where each drew its own copies (balance.seed: members)."""
    record = {"index_sha256": index_digest(data), "slices": slices}
    if members:
        record["member_copies"] = list(members)
    (Path(folder) / RECORD).write_text(json.dumps(record) + "\n")


def member_table(data: Path, seed: int) -> str:
    """The training table a member of train.members trains on: the one balance drew for its seed where it drew one
    per member (balance.seed: members; the first member's is train), else train, which every member shares."""
    folder = Path(data) / "prepared"
    members = read_record(folder).get("member_copies")
    if not members:
        return "train"
    if seed not in members:
        raise BrainsegError(f"{folder}: balance drew copies for the members {members}, not for seed {seed}. "
                            "Fix: run `dvc repro balance` with this params.yaml's train.members")
    return member_split(seed, members)


def read_record(folder: Path) -> dict:
    """`folder`/slices.json as balance wrote it (write_record)."""
    path = Path(folder) / RECORD
    if not path.is_file():
        raise BrainsegError(f"{path}: missing. Fix: run `dvc repro balance` to prepare the data")
    return json.loads(path.read_text())


def member_split(seed: int, members: list[int]) -> str:
    """The name of a member's training table where each member has its own copies: the first member's is train."""
    return "train" if seed == members[0] else f"train_seed{seed}"


def read_table(data: Path, split: str) -> tuple[pd.DataFrame, int]:
    """(data/prepared/{split}.csv, the slice count its rows refer to), checked against data/index.csv."""
    data = Path(data)
    folder = data / "prepared"
    table_path = folder / f"{split}.csv"
    if not table_path.is_file():
        raise BrainsegError(f"{table_path}: missing. Fix: run `dvc repro balance` to prepare the data")
    record = read_record(folder)
    if record.get("index_sha256") != index_digest(data):
        raise BrainsegError(f"{folder} was prepared from another {data / 'index.csv'} than the one there now. "
                            "Fix: run `dvc repro balance`")
    table = pd.read_csv(table_path, dtype={"patient": str}, keep_default_na=False)
    if not {"row", "copy"} <= set(table.columns):
        raise BrainsegError(f"{table_path}: no row / copy columns (an older layout). Fix: run `dvc repro balance`")
    if len(table) and not 0 <= table["row"].min() <= table["row"].max() < record["slices"]:
        raise BrainsegError(f"{table_path}: rows outside the {record['slices']} slices of {data / 'slices'}. "
                            "Fix: run `dvc repro balance --force`")
    return table, record["slices"]


def slices(data: Path, count: int) -> tuple[np.ndarray, np.ndarray]:
    """data/slices/{images,masks}.npy, memory-mapped, checked to hold the `count` slices a prepared table expects."""
    folder = Path(data) / "slices"
    try:
        images, masks = (np.load(folder / f"{kind}.npy", mmap_mode="r") for kind in ("images", "masks"))
    except (FileNotFoundError, ValueError) as err:
        raise BrainsegError(f"{folder}: missing or unreadable ({err}). Fix: run `dvc repro index`") from None
    if not len(images) == len(masks) == count:
        raise BrainsegError(f"{folder}: {len(images)} images and {len(masks)} masks, but data/prepared was made "
                            f"from {count} slices. Fix: run `dvc repro index balance --force`")
    return images, masks


def originals(data: Path, split: str) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """(images, masks, table) of a split's original slices: the memory-mapped data/slices arrays and the split's
    table indexed by row there, so a consumer reads just the rows it needs (evaluation, patient by patient)."""
    table, count = read_table(data, split)
    images, masks = slices(data, count)
    table = table[table["copy"] < 0]
    return images, masks, table.set_index(table["row"].to_numpy())


def load_split(data: Path, split: str, transform=None,
               chunk: int = 256) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """(images, masks, table) of a whole split, augmented copies included, gathered into memory in table order.

    `transform(images, masks) -> (a, b)`, applied `chunk` slices at a time, lets a consumer keep only what it
    needs (e.g. model-size arrays): then the full-size split is never held in memory at once.
    """
    data = Path(data)
    table, count = read_table(data, split)
    images, masks = slices(data, count)
    copy, rows = table["copy"].to_numpy(), table["row"].to_numpy()
    n = int((copy < 0).sum())
    if (copy[n:] < 0).any():
        raise BrainsegError(f"{data / 'prepared' / split}.csv: copies are not after the originals. "
                            "Fix: run `dvc repro balance --force`")
    if n < len(table):
        paths = [data / "prepared" / f"{split}_copies_{kind}.npy" for kind in ("images", "masks")]
        try:
            copy_images, copy_masks = (np.load(p, mmap_mode="r") for p in paths)
        except (FileNotFoundError, ValueError) as err:
            raise BrainsegError(f"{paths[0].parent}: {split}'s augmented copies missing or unreadable ({err}). "
                                "Fix: run `dvc repro balance --force`") from None
        if not len(copy_images) == len(copy_masks) > copy.max():
            raise BrainsegError(f"{paths[0]}: {len(copy_images)} copies but {split}.csv refers to {copy.max() + 1}."
                                " Fix: run `dvc repro balance --force`")
    transform = transform or (lambda a, b: (a, b))
    out = None
    for start in range(0, len(table), chunk):
        stop = min(start + chunk, len(table))
        parts = []  # this chunk's originals, then its copies (the table lists originals first)
        if start < n:
            parts.append((images[rows[start:min(stop, n)]], masks[rows[start:min(stop, n)]]))
        if stop > n:
            picked = copy[max(start, n):stop]
            parts.append((copy_images[picked], copy_masks[picked]))
        a, b = transform(*(np.concatenate(p) if len(parts) > 1 else p[0] for p in zip(*parts)))
        if out is None:
            out = tuple(np.empty((len(table), *x.shape[1:]), x.dtype) for x in (a, b))
        out[0][start:stop], out[1][start:stop] = a, b
    if out is None:  # an empty split: empty arrays as stored, untransformed
        out = np.empty((0, *images.shape[1:]), np.uint8), np.empty((0, *masks.shape[1:]), np.uint8)
    return out[0], out[1], table
