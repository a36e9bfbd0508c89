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


def add_augmented(meta: pd.DataFrame, images: np.ndarray, masks: np.ndarray, sources: np.ndarray,
                  cfg: dict, seed: int) -> pd.DataFrame:
    """Fill images[n:], masks[n:] (n = len(meta), originals already in [:n]) with augmented copies of
    `sources` and return meta with their rows appended."""
    n = len(meta)
    rows = []
    for k, src in enumerate(tqdm(sources, desc="augment", unit="slice")):
        # one generator per copy, keyed by its position: a copy never depends on how many came before
        copy_rng = np.random.default_rng([seed, k])
        images[n + k], masks[n + k], how = augment(images[src], masks[src], copy_rng, cfg)
        row = meta.iloc[src].to_dict()
        rows.append({**row, "augmentation": how, "area": int(masks[n + k].sum())})
    out = pd.concat([meta, pd.DataFrame(rows, columns=META)], ignore_index=True)
    out["area"] = out["area"].astype(np.int64)
    out["tumour"] = (out["area"] > 0).astype(int)
    return out


def balance_train(meta: pd.DataFrame, images, masks, cfg: dict, seed: int):
    """meta/images/masks of the training split -> the same with augmented copies appended."""
    sources = augmentation_sources(meta, cfg, seed)
    n = len(meta)
    out_images = np.empty((n + len(sources), *images.shape[1:]), np.uint8)
    out_masks = np.empty((n + len(sources), *masks.shape[1:]), np.uint8)
    out_images[:n], out_masks[:n] = images, masks
    return add_augmented(meta, out_images, out_masks, sources, cfg, seed), out_images, out_masks


def write_split(folder: Path, name: str, meta: pd.DataFrame, images, masks, rows: np.ndarray,
                cfg: dict | None = None, seed: int = 0) -> pd.DataFrame:
    """{name}_images.npy / _masks.npy / .csv in `folder`: the slices `rows` of images / masks (balanced
    when `cfg` is given). The arrays are gathered straight into the .npy files (memory-mapped), so the
    slices are copied once, not gathered, copied and written."""
    sources = augmentation_sources(meta, cfg, seed) if cfg is not None else np.zeros(0, int)
    total = len(rows) + len(sources)
    out_images = np.lib.format.open_memmap(folder / f"{name}_images.npy", "w+", np.uint8, (total, *images.shape[1:]))
    out_masks = np.lib.format.open_memmap(folder / f"{name}_masks.npy", "w+", np.uint8, (total, *masks.shape[1:]))
    np.take(images, rows, axis=0, out=out_images[:len(rows)])
    np.take(masks, rows, axis=0, out=out_masks[:len(rows)])
    if cfg is not None:
        meta = add_augmented(meta, out_images, out_masks, sources, cfg, seed)
    out_images.flush()
    out_masks.flush()
    del out_images, out_masks
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
