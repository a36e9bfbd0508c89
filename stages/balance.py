"""Stage `balance`: grow the training split to a tumour/no-tumour balance with seeded augmentation.

As in the seed article (3929 slices -> 5312, 2656 with tumour, 2656 without) but on the training split
only (`total: auto`; `gx` grows it g-fold, an integer to that many slices): every augmented slice is a flipped /
rotated / blurred (with `elastic`, also deformed) copy of a training slice and keeps its source patient, so nothing
derived from a validation or test patient ever reaches training.
Validation and test keep their original slices. Output: data/prepared/{train,val,test}.csv, which refer to the
index stage's data/slices by row instead of copying them, and the copies' pixels, train_copies_{images,masks}.npy
and slices.json, the digest of the index those rows refer to (see stages.prepared, which reads them).
With train.refit, also refit.csv (and refit_copies_*.npy): the validation patients balanced as the training split
was, which the refit trains on beside the training split once validation has chosen the epochs (stages.train).
With balance.seed `members` (the default) the copies follow the training seeds: a seed ensemble's (train.members) every
member gets its own draw, made with its seed (train.csv holds the first member's, train_seed<S>.csv and its copies
each other member's), and one network's are drawn with its seed (train.seed, or the top-level seed).
"""
from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from stages import prepared
from stages.common import (BrainsegError, NpyWriter, atomic_path, load_params, run_main, training_seeds,
                           write_json)

DATA = Path("data")
PREPARED = DATA / "prepared"
# what the index and split stages leave in DATA (dvc.yaml names them; importing stages.index and stages.split for the
# paths would make their code a dependency of balance and train)
INDEX, SPLIT, SLICES = "index.csv", "split.csv", "slices"
MEMBERS = "members"  # balance.seed: the copies drawn with the training seeds, one draw per member of train.members
SEED_GROWTH = 5312 / 3929  # the seed article's balanced total over the full set's slice count
META = ["patient", "case", "slice", "image", "augmentation", "tumour", "area"]


def growth(total) -> float | None:
    """The multiple of the slices that balance.total asks for: the seed's x5312/3929 for 'auto', g for 'gx' (such as
    '2x'); None for an exact count."""
    if total == "auto":
        return SEED_GROWTH
    if isinstance(total, int) and not isinstance(total, bool):
        return None
    if isinstance(total, str) and re.fullmatch(r"[0-9]+(\.[0-9]+)?x", total):
        return float(total[:-1])
    raise BrainsegError(f"params.yaml: balance.total '{total}' is not auto, a multiple of the training slices such "
                        "as 2x, or a number of slices such as 3000")


def plan_balance(n_tumour: int, n_empty: int, total="auto", tumour_fraction: float = 0.5) -> tuple[int, int]:
    """How many augmented (tumour, empty) slices to add. Originals are never dropped.

    total 'auto' applies the seed's growth x5312/3929 to n_tumour + n_empty, so 3929 slices with 1373
    tumours become 5312 = 2656 + 2656 (1283 tumour and 100 empty copies added); 'gx' grows them g-fold; an integer
    is the exact total.
    """
    n = n_tumour + n_empty
    factor = growth(total)
    target = int(total) if factor is None else round(n * factor)
    if target < n:
        raise BrainsegError(f"params.yaml: balance.total {total} is below the {n} training slices; "
                            "originals are never dropped: use auto or a larger total")
    want_tumour = round(target * tumour_fraction)
    return max(0, want_tumour - n_tumour), max(0, target - want_tumour - n_empty)


def pick_sources(candidates: np.ndarray, count: int, rng: np.random.Generator,
                 weights: np.ndarray | None = None) -> np.ndarray:
    """`count` source rows: cycling through shuffled candidates so each is used as evenly as possible, or,
    given `weights`, drawn with replacement with probability proportional to them."""
    if count and not len(candidates):
        raise BrainsegError("no training slices of a class to augment from; check the split")
    if not count:
        return candidates[:0]
    if weights is not None:
        return rng.choice(candidates, size=count, p=weights / weights.sum())
    rounds = -(-count // len(candidates))
    return np.concatenate([rng.permutation(candidates) for _ in range(rounds)])[:count]


def displacement(shape: tuple[int, int], sd: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The original U-Net's elastic deformation (Ronneberger et al. 2015): displacements drawn on a coarse 3x3 grid
    from a Gaussian of `sd` pixels, interpolated bicubically to every pixel; as OpenCV remap's (map_x, map_y).
    The grid is drawn from `seed` alone, so a recorded copy can be replayed."""
    h, w = shape
    grid = np.random.default_rng(seed).normal(0.0, sd, (2, 3, 3)).astype(np.float32)
    dx, dy = (cv2.resize(g, (w, h), interpolation=cv2.INTER_CUBIC) for g in grid)
    x, y = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    return x + dx, y + dy


def transform(image: np.ndarray, flip: bool, angle: float, sigma: float = 0.0,
              interpolation: int = cv2.INTER_LINEAR, warp: tuple[float, int] | None = None) -> np.ndarray:
    """A copy's geometry and blur, in order: mirror left-right, rotate `angle` degrees about the centre, deform
    elastically by `warp` = (sd, seed) of displacement (None: none), blur with `sigma` (0: none)."""
    if flip:
        # cv2.flip: the same bytes as a copy of image[:, ::-1], about 30x faster than numpy's negative-stride copy
        image = cv2.flip(np.ascontiguousarray(image), 1).reshape(image.shape)
    h, w = image.shape[:2]
    # OpenCV rotates and remaps 4-channel pixels about twice as fast as 3-channel ones, to the same bytes in each
    # channel (tests/test_balance.py checks it), and the two conversions cost a tenth of what that saves
    four = bool(angle or warp) and image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8
    if four:  # the three sequences as OpenCV's RGBA (a fourth, constant channel), and back
        image = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2RGBA)
    if angle:
        rot = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
        image = cv2.warpAffine(np.ascontiguousarray(image), rot, (w, h), flags=interpolation)
    if warp:
        image = cv2.remap(np.ascontiguousarray(image), *displacement((h, w), *warp), interpolation,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0).reshape(image.shape)
    if four:
        image = cv2.cvtColor(image, cv2.COLOR_RGBA2RGB)
    return cv2.GaussianBlur(np.ascontiguousarray(image), (0, 0), sigma) if sigma else image


def augment(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, cfg: dict):
    """Same flip, rotation and elastic deformation for image and mask (mask by nearest neighbour, so it stays
    binary); blur image only."""
    flip = rng.random() < 0.5
    angle = float(rng.uniform(-cfg["max_rotation"], cfg["max_rotation"]))
    sigma = float(rng.uniform(0.3, cfg["blur_max_sigma"])) if rng.random() < cfg["blur_probability"] else 0.0
    sd = float(cfg.get("elastic") or 0)
    # drawn after the other steps, and only when on, so copies without it are the bytes they always were
    warp = (round(sd, 2), int(rng.integers(2**31))) if sd else None
    how = "+".join((["flip"] if flip else []) + [f"rot{angle:+.1f}"]
                   + ([f"warp{warp[0]:g}:{warp[1]}"] if warp else []) + ([f"blur{sigma:.2f}"] if sigma else []))
    return (transform(image, flip, angle, sigma, warp=warp),
            transform(mask, flip, angle, interpolation=cv2.INTER_NEAREST, warp=warp), how)


# the steps of augment()'s record of a copy
RECORDED = re.compile(r"flip|rot[+-][0-9.]+|warp[0-9.]+:[0-9]+|blur[0-9.]+")


def replay(image: np.ndarray, how: str) -> np.ndarray:
    """Apply an augmentation that augment() recorded as `how` (e.g. "flip+rot-12.3+warp5:1234+blur0.54"; "" for an
    original) to another image of the same size, such as the FLAIR of a copy's neighbouring slices; the angle was
    recorded to 0.1 degree and the blur to 0.01 pixel, so the replay is within that of the copy (the deformation's
    seed exactly)."""
    steps = RECORDED.findall(how or "")
    if "+".join(steps) != (how or ""):
        raise BrainsegError(f"augmentation '{how}' is not one balance records. Fix: run `dvc repro balance --force` "
                            "with this version")
    angle = next((float(step[3:]) for step in steps if step.startswith("rot")), 0.0)
    sigma = next((float(step[4:]) for step in steps if step.startswith("blur")), 0.0)
    warp = next(((float(step[4:].split(":")[0]), int(step.split(":")[1])) for step in steps
                 if step.startswith("warp")), None)
    return np.ascontiguousarray(transform(np.asarray(image), "flip" in steps, angle, sigma, warp=warp))


def augmentation_sources(meta: pd.DataFrame, cfg: dict, seed: int) -> np.ndarray:
    """Rows of the training split to copy, tumour copies first: the plan of plan_balance, seeded.
    `area_weight` > 0 draws the tumour copies with probability proportional to area ** -area_weight, so
    slices of small tumours (the ones missed at test) are copied more often."""
    tumour = meta["tumour"].to_numpy(bool)
    add_t, add_e = plan_balance(int(tumour.sum()), int((~tumour).sum()), cfg["total"], cfg["tumour_fraction"])
    rng = np.random.default_rng(seed)
    exponent = float(cfg.get("area_weight") or 0)
    if exponent < 0:
        raise BrainsegError(f"params.yaml: balance.area_weight {exponent} is negative; use 0 (off) or e.g. 0.5")
    if float(cfg.get("elastic") or 0) < 0:
        raise BrainsegError(f"params.yaml: balance.elastic {cfg['elastic']} is negative; use 0 (off) or pixels, "
                            "such as 5")
    rows = np.flatnonzero(tumour)
    weights = meta["area"].to_numpy(np.float64)[rows] ** -exponent if exponent else None
    return np.concatenate([pick_sources(rows, add_t, rng, weights),
                           pick_sources(np.flatnonzero(~tumour), add_e, rng)])


def augmented_copies(meta: pd.DataFrame, source, sources: np.ndarray, cfg: dict, seed: int):
    """Yield (image, mask, meta row) for each augmented copy of the rows `sources` of meta, in order;
    source(i) -> (image, mask) of row i."""
    records = meta.to_dict("records")

    def copy(k_src):
        k, src = k_src
        # one generator per copy, keyed by its position: a copy never depends on how many came before,
        # so two threads (OpenCV releases the GIL) make the same bytes as one
        image, mask, how = augment(*source(src), np.random.default_rng([seed, k]), cfg)
        return image, mask, {**records[src], "augmentation": how, "area": int(mask.sum())}

    with ThreadPoolExecutor(max_workers=2) as pool:
        yield from tqdm(pool.map(copy, enumerate(sources)), total=len(sources), desc="augment", unit="slice")


def with_copies(meta: pd.DataFrame, rows: list[dict]) -> pd.DataFrame:
    out = pd.concat([meta, pd.DataFrame(rows, columns=meta.columns)], ignore_index=True)
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


def write_split(folder: Path, name: str, meta: pd.DataFrame, images, masks, rows: np.ndarray,
                cfg: dict | None = None, seed: int = 0) -> pd.DataFrame:
    """`folder`/{name}.csv: the split's slices as `rows` of images / masks (the index stage's arrays), balanced when
    `cfg` is given: the augmented copies' pixels, the only ones written, go to {name}_copies_{images,masks}.npy."""
    meta = meta.assign(row=rows, copy=-1)
    if cfg is not None:
        sources = augmentation_sources(meta, cfg, seed)
        image_file = NpyWriter(folder / f"{name}_copies_images.npy", (len(sources), *images.shape[1:]))
        mask_file = NpyWriter(folder / f"{name}_copies_masks.npy", (len(sources), *masks.shape[1:]))
        copied = []
        try:
            for image, mask, row in augmented_copies(meta, lambda i: (images[rows[i]], masks[rows[i]]), sources,
                                                     cfg, seed):
                image_file.write(image)
                mask_file.write(mask)
                copied.append({**row, "copy": len(copied)})  # `row` stays the source's slice
        finally:
            image_file.close()
            mask_file.close()
        meta = with_copies(meta, copied)
    meta.to_csv(folder / f"{name}.csv", index=False, lineterminator="\n")
    return meta


def refit_config(cfg: dict, train_slices: int, val_slices: int) -> dict:
    """Balance settings for the validation patients' share of a refit: the growth the training split got (the
    seed's x5312/3929 under `auto`, g under `gx`, else balance.total over the training slices) applied to their
    slices."""
    if growth(cfg["total"]) is not None:
        return cfg
    return {**cfg, "total": round(val_slices * int(cfg["total"]) / max(train_slices, 1))}


def split_summary(meta: pd.DataFrame) -> dict:
    return {"slices": len(meta), "tumour_slices": int(meta["tumour"].sum()),
            "augmented": int((meta["augmentation"].fillna("") != "").sum())}


def load_inputs(data: Path = DATA) -> tuple[pd.DataFrame, pd.Series, np.ndarray, np.ndarray]:
    """(index table, split by patient, images, masks) as the index and split stages left them under `data`."""
    index = pd.read_csv(data / INDEX)
    split = pd.read_csv(data / SPLIT).set_index("patient")["split"]
    images = np.load(data / SLICES / "images.npy", mmap_mode="r")
    masks = np.load(data / SLICES / "masks.npy", mmap_mode="r")
    if len(images) != len(index):
        raise BrainsegError(f"{data / SLICES}: {len(images)} slices but {data / INDEX} lists {len(index)}; "
                            "run `dvc repro index`")
    index["augmentation"] = ""
    index["tumour"] = index["tumour"].astype(int)
    return index, split, images, masks


def split_rows(index: pd.DataFrame, split: pd.Series, name: str) -> np.ndarray:
    return np.flatnonzero(index["patient"].map(split).to_numpy() == name)


def write_refit(folder: Path, index: pd.DataFrame, split: pd.Series, images, masks, cfg: dict,
                seed: int) -> pd.DataFrame:
    """`folder`/refit.csv and its copies: the validation patients, which become training patients for the refit,
    balanced like the training split, with a seed of their own so their copies do not repeat the training copies'
    draws."""
    rows = split_rows(index, split, "val")
    return write_split(folder, "refit", index.iloc[rows][META].reset_index(drop=True), images, masks, rows,
                       refit_config(cfg, len(split_rows(index, split, "train")), len(rows)), seed + 1)


def copies_seed(params: dict) -> int:
    """The seed that draws the augmented copies of train.csv: balance.seed, or the top-level seed (which also cuts
    the split) where that is null, so the copies can be drawn again on the same split; with balance.seed `members`,
    the training seed's (a seed ensemble's first member's)."""
    seed = (params.get("balance") or {}).get("seed")
    if seed is None:
        return params["seed"]
    if seed == MEMBERS:
        return training_seeds(params)[0]
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise BrainsegError(f"params.yaml: balance.seed {seed!r} is not a whole number >= 0; use null (the top-level "
                            "seed), members (the training seeds') or e.g. 7")
    return seed


def member_copies(params: dict) -> list[int]:
    """With balance.seed `members` and a seed ensemble (train.members): its seeds, one draw of copies each, as a run
    with `-S balance.seed=S` would draw them, so each member trains as the run of its seed with both seeds drawn;
    else [] (one network, or every member trains on train.csv's one draw)."""
    if (params.get("balance") or {}).get("seed") != MEMBERS:
        return []
    seeds = training_seeds(params)
    return seeds if len(seeds) > 1 else []


def main() -> None:
    params = load_params()
    cfg = params["balance"]
    seed, members = copies_seed(params), member_copies(params)
    index, split, images, masks = load_inputs()
    summary = {}
    with atomic_path(PREPARED, is_dir=True) as tmp:
        for name in ("train", "val", "test"):
            rows = split_rows(index, split, name)
            meta = index.iloc[rows][META].reset_index(drop=True)
            summary[name] = split_summary(write_split(tmp, name, meta, images, masks, rows,
                                                      cfg if name == "train" else None, seed))
            for member in members[1:] if name == "train" else ():
                table = prepared.member_split(member, members)
                summary[table] = split_summary(write_split(tmp, table, meta, images, masks, rows, cfg, member))
        if params["train"].get("refit"):
            summary["refit"] = split_summary(write_refit(tmp, index, split, images, masks, cfg, seed))
        prepared.write_record(tmp, DATA, len(images), members)
    write_json(Path("metrics") / "balance.json", summary)
    print(summary)


if __name__ == "__main__":
    run_main(main)
