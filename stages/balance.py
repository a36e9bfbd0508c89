"""Stage `balance`: grow the training split to a tumour/no-tumour balance with seeded augmentation.

As in the seed article (3929 slices -> 5312, 2656 with tumour, 2656 without) but on the training split
only: every augmented slice is a flipped / rotated / blurred copy of a training slice and keeps its source
patient, so nothing derived from a validation or test patient ever reaches training. Validation and test
keep their original slices. Output: data/prepared/{train,val,test}_{images,masks}.npy and {split}.csv.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from stages.common import BrainsegError, atomic_path, load_params, run_main, write_json
from stages.index import INDEX, SLICES
from stages.split import SPLIT

PREPARED = Path("data") / "prepared"
SEED_GROWTH = 5312 / 3929  # the seed article's balanced total over the full set's slice count
META = ["patient", "case", "slice", "image", "augmentation", "tumour", "area"]


def plan_balance(n_tumour: int, n_empty: int, total="auto", tumour_fraction: float = 0.5) -> tuple[int, int]:
    """How many augmented (tumour, empty) slices to add. Originals are never dropped.

    total 'auto' applies the seed's growth x5312/3929 to n_tumour + n_empty, so 3929 slices with 1373
    tumours become 5312 = 2656 + 2656 (1283 tumour and 100 empty copies added).
    """
    n = n_tumour + n_empty
    target = round(n * SEED_GROWTH) if total == "auto" else int(total)
    if target < n:
        raise BrainsegError(f"params.yaml: balance.total {total} is below the {n} training slices; "
                            "originals are never dropped: use auto or a larger total")
    want_tumour = round(target * tumour_fraction)
    return max(0, want_tumour - n_tumour), max(0, target - want_tumour - n_empty)


def pick_sources(candidates: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` source rows, cycling through shuffled candidates so each is used as evenly as possible."""
    if count and not len(candidates):
        raise BrainsegError("no training slices of a class to augment from; check the split")
    rounds = -(-count // max(1, len(candidates)))
    return np.concatenate([rng.permutation(candidates) for _ in range(rounds)])[:count] if count else candidates[:0]


def augment(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, cfg: dict):
    """Same flip and rotation for image and mask (mask by nearest neighbour, so it stays binary); blur image only."""
    steps = []
    if rng.random() < 0.5:
        image, mask = image[:, ::-1], mask[:, ::-1]
        steps.append("flip")
    angle = float(rng.uniform(-cfg["max_rotation"], cfg["max_rotation"]))
    h, w = mask.shape
    rot = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
    image = cv2.warpAffine(np.ascontiguousarray(image), rot, (w, h), flags=cv2.INTER_LINEAR)
    mask = cv2.warpAffine(np.ascontiguousarray(mask), rot, (w, h), flags=cv2.INTER_NEAREST)
    steps.append(f"rot{angle:+.1f}")
    if rng.random() < cfg["blur_probability"]:
        sigma = float(rng.uniform(0.3, cfg["blur_max_sigma"]))
        image = cv2.GaussianBlur(image, (0, 0), sigma)
        steps.append(f"blur{sigma:.2f}")
    return image, mask, "+".join(steps)


def augmentation_sources(meta: pd.DataFrame, cfg: dict, seed: int) -> np.ndarray:
    """Rows of the training split to copy, tumour copies first: the plan of plan_balance, seeded."""
    tumour = meta["tumour"].to_numpy(bool)
    add_t, add_e = plan_balance(int(tumour.sum()), int((~tumour).sum()), cfg["total"], cfg["tumour_fraction"])
    rng = np.random.default_rng(seed)
    return np.concatenate([pick_sources(np.flatnonzero(tumour), add_t, rng),
                           pick_sources(np.flatnonzero(~tumour), add_e, rng)])


def augmented_copies(meta: pd.DataFrame, source, sources: np.ndarray, cfg: dict, seed: int):
    """Yield (image, mask, meta row) for each augmented copy of the rows `sources` of meta;
    source(i) -> (image, mask) of row i."""
    for k, src in enumerate(tqdm(sources, desc="augment", unit="slice")):
        # one generator per copy, keyed by its position: a copy never depends on how many came before
        copy_rng = np.random.default_rng([seed, k])
        image, mask, how = augment(*source(src), copy_rng, cfg)
        yield image, mask, {**meta.iloc[src].to_dict(), "augmentation": how, "area": int(mask.sum())}


def with_copies(meta: pd.DataFrame, rows: list[dict]) -> pd.DataFrame:
    out = pd.concat([meta, pd.DataFrame(rows, columns=META)], ignore_index=True)
    out["area"] = out["area"].astype(np.int64)
    out["tumour"] = (out["area"] > 0).astype(int)
    return out


def balance_train(meta: pd.DataFrame, images, masks, cfg: dict, seed: int):
    """meta/images/masks of the training split -> the same with augmented copies appended."""
    sources = augmentation_sources(meta, cfg, seed)
    copies = list(augmented_copies(meta, lambda i: (images[i], masks[i]), sources, cfg, seed))
    out_images = np.concatenate([images, np.array([c[0] for c in copies], np.uint8).reshape(-1, *images.shape[1:])])
    out_masks = np.concatenate([masks, np.array([c[1] for c in copies], np.uint8).reshape(-1, *masks.shape[1:])])
    return with_copies(meta, [c[2] for c in copies]), out_images, out_masks


class NpyWriter:
    """A .npy file of known shape written front to back in chunks: plain writes, no memory map (on this
    machine's disk, writing a memory map page by page ran at a third of the speed) and no full copy in memory."""

    def __init__(self, path: Path, shape: tuple):
        self.file = open(path, "wb")
        np.lib.format.write_array_header_1_0(self.file, {"descr": "|u1", "fortran_order": False, "shape": shape})

    def write(self, array: np.ndarray) -> None:
        self.file.write(np.ascontiguousarray(array, np.uint8).data)

    def close(self) -> None:
        self.file.close()


def write_split(folder: Path, name: str, meta: pd.DataFrame, images, masks, rows: np.ndarray,
                cfg: dict | None = None, seed: int = 0, chunk: int = 128) -> pd.DataFrame:
    """{name}_images.npy / _masks.npy / .csv in `folder`: the slices `rows` of images / masks (balanced
    when `cfg` is given), gathered and written a chunk at a time, so nothing holds a whole split in memory."""
    sources = augmentation_sources(meta, cfg, seed) if cfg is not None else np.zeros(0, int)
    total = len(rows) + len(sources)
    image_file = NpyWriter(folder / f"{name}_images.npy", (total, *images.shape[1:]))
    mask_file = NpyWriter(folder / f"{name}_masks.npy", (total, *masks.shape[1:]))
    try:
        for start in range(0, len(rows), chunk):
            image_file.write(images[rows[start:start + chunk]])
            mask_file.write(masks[rows[start:start + chunk]])
        copied = []
        for image, mask, row in augmented_copies(meta, lambda i: (images[rows[i]], masks[rows[i]]), sources,
                                                 cfg, seed):
            image_file.write(image)
            mask_file.write(mask)
            copied.append(row)
    finally:
        image_file.close()
        mask_file.close()
    meta = with_copies(meta, copied) if cfg is not None else meta
    meta.to_csv(folder / f"{name}.csv", index=False, lineterminator="\n")
    return meta


def main() -> None:
    params = load_params()
    cfg = params["balance"]
    index = pd.read_csv(INDEX)
    split = pd.read_csv(SPLIT).set_index("patient")["split"]
    images = np.load(SLICES / "images.npy", mmap_mode="r")
    masks = np.load(SLICES / "masks.npy", mmap_mode="r")
    if len(images) != len(index):
        raise BrainsegError(f"{SLICES}: {len(images)} slices but {INDEX} lists {len(index)}; run `dvc repro index`")
    index["augmentation"] = ""
    index["tumour"] = index["tumour"].astype(int)
    summary = {}
    with atomic_path(PREPARED, is_dir=True) as tmp:
        for name in ("train", "val", "test"):
            rows = np.flatnonzero(index["patient"].map(split).to_numpy() == name)
            meta = index.iloc[rows][META].reset_index(drop=True)
            meta = write_split(tmp, name, meta, images, masks, rows,
                               cfg if name == "train" else None, params["seed"])
            summary[name] = {"slices": len(meta), "tumour_slices": int(meta["tumour"].sum()),
                             "augmented": int((meta["augmentation"].fillna("") != "").sum())}
    write_json(Path("metrics") / "balance.json", summary)
    print(summary)


if __name__ == "__main__":
    run_main(main)
