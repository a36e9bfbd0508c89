"""A deterministic stand-in for the LGG data set, in Kaggle's layout: the demo data and the test data.

Slices are 256x256x3 uint8 (pre-contrast, FLAIR, post-contrast) showing an elliptical brain with some
texture; about 35% of slices carry a tumour that is bright on FLAIR, and the masks are 0/255. It exercises
every code path in seconds. It is never evidence of quality on real MRI.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile

INSTITUTIONS = ("CS", "DU", "EZ", "FG", "HT")
CSV_HEADER = ("Patient,RNASeqCluster,MethylationCluster,miRNACluster,CNCluster,RPPACluster,OncosignCluster,"
              "COCCluster,histological_type,neoplasm_histologic_grade,tumor_tissue_site,laterality,"
              "tumor_location,gender,age_at_initial_pathologic,race,ethnicity,death01")


def _ellipse(shape, cy, cx, ry, rx) -> np.ndarray:
    y, x = np.ogrid[: shape[0], : shape[1]]
    return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0


def make_slice(rng: np.random.Generator, depth: float, tumour: tuple | None) -> tuple[np.ndarray, np.ndarray]:
    """One slice at relative depth 0..1 (the brain is smaller near the ends); tumour = (cy, cx, r) or None."""
    size = 0.55 + 0.45 * np.sin(np.pi * (0.1 + 0.8 * depth))
    brain = _ellipse((256, 256), 128, 128, 100 * size, 80 * size)
    base = rng.normal(0, 1, (256, 256)).astype(np.float32)
    image = np.zeros((256, 256, 3), np.float32)
    for channel, level in enumerate((70, 95, 80)):
        image[..., channel] = brain * (level + 12 * base)
    mask = np.zeros((256, 256), np.uint8)
    if tumour is not None:
        cy, cx, r = tumour
        blob = _ellipse((256, 256), cy, cx, r, r * 0.8) & brain
        mask[blob] = 255
        image[blob, 1] += 110                                 # FLAIR-bright abnormality
        image[blob, 2] += 25
    return np.clip(image, 0, 255).astype(np.uint8), mask


def write_dataset(dest: Path, patients: int = 12, slices: int = 24, seed: int = 0) -> Path:
    """Write dest/<CASE>/<CASE>_<n>.tif and _mask.tif plus data.csv (one extra patient without a folder)."""
    rng = np.random.default_rng(seed)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    rows = []
    for p in range(patients + 1):
        inst = INSTITUTIONS[p % len(INSTITUTIONS)]
        patient = f"TCGA_{inst}_{7000 + p}"
        rows.append(f"{patient},{p % 4 + 1},{p % 5 + 1},{p % 3 + 1},{p % 3 + 1},{p % 3 + 1},{p % 3 + 1},"
                    f"{p % 3 + 1},1,2,1,3,2,{p % 2 + 1},{30 + p},3,2,{p % 2}")
        if p == patients:
            break  # data.csv lists one patient whose folder is absent, as the dev archive does
        case = f"{patient}_{19950101 + p}"
        folder = dest / case
        folder.mkdir()
        for n, (image, mask) in enumerate(zip(*make_volume(rng, slices)), start=1):
            tifffile.imwrite(folder / f"{case}_{n}.tif", image, photometric="rgb")
            tifffile.imwrite(folder / f"{case}_{n}_mask.tif", mask, photometric="minisblack")
    (dest / "data.csv").write_text(CSV_HEADER + "\n" + "\n".join(rows) + "\n")
    return dest


def make_volume(rng: np.random.Generator, slices: int) -> tuple[np.ndarray, np.ndarray]:
    """One patient's slices in slice order, (slices,256,256,3) uint8, and their masks (0/255)."""
    # the tumour spans a contiguous run of about 35% of the slices, as in the real data
    run = max(1, round(0.35 * slices))
    start = int(rng.integers(slices // 5, slices - run - slices // 8 + 1))
    cy, cx, r = int(rng.integers(90, 166)), int(rng.integers(90, 166)), int(rng.integers(14, 30))
    images, masks = [], []
    for n in range(1, slices + 1):
        inside = start <= n - 1 < start + run
        radius = r * np.sin(np.pi * (n - start) / (run + 1)) if inside else 0
        image, mask = make_slice(rng, (n - 1) / max(1, slices - 1), (cy, cx, max(4, radius)) if inside else None)
        images.append(image)
        masks.append(mask)
    return np.stack(images), np.stack(masks)
