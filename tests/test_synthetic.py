import hashlib

import numpy as np
import tifffile

from stages.synthetic import write_dataset


def digest(folder):
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())).hexdigest()


def test_layout_dtypes_and_tumour_share(synthetic_root):
    cases = sorted(p for p in synthetic_root.iterdir() if p.is_dir())
    assert len(cases) == 6 and (synthetic_root / "data.csv").is_file()
    image = tifffile.imread(next(cases[0].glob("*_1.tif")))
    masks = [tifffile.imread(p) for p in synthetic_root.rglob("*_mask.tif")]
    assert image.shape == (256, 256, 3) and image.dtype == np.uint8
    assert all(m.shape == (256, 256) and set(np.unique(m)) <= {0, 255} for m in masks)
    share = np.mean([m.any() for m in masks])
    assert 0.25 < share < 0.45


def test_tumour_is_flair_bright(synthetic_root):
    path = next(p for p in sorted(synthetic_root.rglob("*_mask.tif")) if tifffile.imread(p).any())
    mask = tifffile.imread(path) > 0
    image = tifffile.imread(str(path).replace("_mask", ""))
    brain = (image[..., 1] > 0) & ~mask
    assert image[mask, 1].mean() > image[brain, 1].mean() + 60


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = write_dataset(tmp_path / "a", patients=2, slices=4, seed=3)
    b = write_dataset(tmp_path / "b", patients=2, slices=4, seed=3)
    c = write_dataset(tmp_path / "c", patients=2, slices=4, seed=4)
    assert digest(a) == digest(b) != digest(c)
