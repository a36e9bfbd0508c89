import numpy as np
import pandas as pd
import pytest

from stages.balance import augment, balance_train, plan_balance
from stages.common import BrainsegError

CFG = {"total": "auto", "tumour_fraction": 0.5, "max_rotation": 25, "blur_probability": 0.3, "blur_max_sigma": 1.0}


def test_seed_article_arithmetic():
    assert plan_balance(1373, 3929 - 1373) == (1283, 100)            # 2656 + 2656 = 5312
    assert plan_balance(1373, 2556, total=5312) == (1283, 100)
    assert plan_balance(10, 30, total=100, tumour_fraction=0.3) == (20, 40)
    assert plan_balance(50, 10, total=60) == (0, 20)                 # never drops originals
    with pytest.raises(BrainsegError, match="never dropped"):
        plan_balance(10, 10, total=15)


def synthetic_index(n=3929, tumours=1373, size=16):
    """An index of n tiny slices, `tumours` of them with a centred tumour blob, 20 slices per patient."""
    rng = np.random.default_rng(0)
    tumour = np.zeros(n, bool)
    tumour[rng.choice(n, tumours, replace=False)] = True
    masks = np.zeros((n, size, size), np.uint8)
    masks[tumour, 5:11, 5:11] = 1
    images = rng.integers(0, 255, (n, size, size, 3), dtype=np.uint8)
    meta = pd.DataFrame({"patient": [f"P{i // 20:03d}" for i in range(n)], "case": "c", "slice": np.arange(n),
                         "image": [f"img{i}.tif" for i in range(n)], "augmentation": "",
                         "tumour": tumour.astype(int), "area": masks.reshape(n, -1).sum(1).astype(np.int64)})
    return meta, images, masks


def test_3929_slices_with_1373_tumours_become_5312_half_tumour():
    meta, images, masks = synthetic_index()
    out, out_images, out_masks = balance_train(meta, images, masks, CFG, seed=7)
    assert len(out) == len(out_images) == len(out_masks) == 5312
    assert out["tumour"].sum() == 2656
    assert (out["augmentation"] != "").sum() == 1383
    assert out.iloc[:3929].equals(meta.assign(tumour=meta["tumour"].astype(int)))  # originals first, unchanged
    assert set(np.unique(out_masks)) == {0, 1}                                   # masks stay binary


def test_augmented_copies_keep_their_source_patient_and_file():
    meta, images, masks = synthetic_index(200, 50)
    out, _, _ = balance_train(meta, images, masks, CFG, seed=1)
    source = meta.set_index("image")["patient"]
    copies = out[out["augmentation"] != ""]
    assert len(copies) and (copies["image"].map(source) == copies["patient"]).all()


def test_seeded_byte_identical():
    meta, images, masks = synthetic_index(200, 50)
    a = balance_train(meta, images, masks, CFG, seed=1)
    b = balance_train(meta, images, masks, CFG, seed=1)
    assert a[0].equals(b[0]) and np.array_equal(a[1], b[1]) and np.array_equal(a[2], b[2])


def test_image_and_mask_get_the_same_geometry():
    image = np.zeros((64, 64, 3), np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    image[10:20, 40:50] = 255
    mask[10:20, 40:50] = 1
    for seed in range(5):
        out_image, out_mask, how = augment(image, mask, np.random.default_rng(seed), {**CFG, "blur_probability": 0})
        bright = out_image[..., 0] > 127
        assert set(np.unique(out_mask)) <= {0, 1}
        assert (bright & (out_mask == 1)).sum() / max(1, (bright | (out_mask == 1)).sum()) > 0.8, how


@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_write_split_streams_what_balance_train_builds(tmp_path, chunk):
    from stages.balance import write_split

    meta, images, masks = synthetic_index(200, 50)
    rows = np.arange(10, 170)  # the split's rows of the whole index
    split_meta = meta.iloc[rows].reset_index(drop=True)
    expected = balance_train(split_meta, images[rows], masks[rows], CFG, seed=3)
    written = write_split(tmp_path, "train", split_meta, images, masks, rows, CFG, seed=3, chunk=chunk)
    assert written.equals(expected[0])
    assert np.array_equal(np.load(tmp_path / "train_images.npy"), expected[1])
    assert np.array_equal(np.load(tmp_path / "train_masks.npy"), expected[2])
    assert pd.read_csv(tmp_path / "train.csv")["augmentation"].fillna("").ne("").sum() == len(expected[0]) - 160
    plain = write_split(tmp_path, "val", split_meta, images, masks, rows, chunk=chunk)  # no cfg: no copies
    assert plain.equals(split_meta) and np.array_equal(np.load(tmp_path / "val_images.npy"), images[rows])
