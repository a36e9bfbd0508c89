"""The data stages on the real dev archive (61 of the 110 patients): counts, patient split, balancing."""
import hashlib
import json

import numpy as np
import pandas as pd
import pytest
import yaml

from stages import balance, download, index, prepared, split

OUTPUTS = ["data/index.csv", "data/slices/images.npy", "data/slices/masks.npy", "data/split.csv",
           "data/prepared/train_copies_images.npy", "data/prepared/train_copies_masks.npy", "data/prepared/train.csv",
           "data/prepared/test.csv", "data/prepared/val.csv", "data/prepared/slices.json", "metrics/data.json"]


def digests(root):
    return {name: hashlib.sha256((root / name).read_bytes()).hexdigest() for name in OUTPUTS}


@pytest.fixture(scope="module")
def real(dev_zip, tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    params = yaml.safe_load(open("params.yaml"))
    params["data"].update(source="archive", archive=str(dev_zip))
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        for stage in (download, index, split, balance):
            stage.main()
        first = digests(root)
        for stage in (index, split, balance):  # a second run must reproduce every byte
            stage.main()
    return root, first


def test_dev_archive_counts(real):
    root, _ = real
    counts = json.loads((root / "metrics/data.json").read_text())
    assert (counts["patients"], counts["slices"], counts["tumour_slices"]) == (61, 2190, 735)
    assert counts["patients_in_csv"] == 110 and counts["patients_in_csv_without_folder"] == 49
    assert counts["bad_files"] == 0 and counts["source"] == "archive"


def test_no_patient_in_two_splits(real):
    root, _ = real
    table = pd.read_csv(root / "data/split.csv")
    assert table["patient"].is_unique and len(table) == 61
    parts = {name: set(pd.read_csv(root / f"data/prepared/{name}.csv")["patient"]) for name in ("train", "val", "test")}
    assert not (parts["train"] & parts["val"]) and not (parts["train"] & parts["test"])
    assert not (parts["val"] & parts["test"])
    assert parts == {name: set(table[table["split"] == name]["patient"]) for name in parts}


def test_no_augmented_slice_outside_train(real):
    root, _ = real
    for name in ("val", "test"):
        meta = pd.read_csv(root / f"data/prepared/{name}.csv")
        assert meta["augmentation"].isna().all()
    train = pd.read_csv(root / "data/prepared/train.csv")
    copies = train[train["augmentation"].notna()]
    index_rows = pd.read_csv(root / "data/index.csv").set_index("image")
    assert len(copies) > 0 and (copies["image"].map(index_rows["patient"]) == copies["patient"]).all()
    assert abs(train["tumour"].mean() - 0.5) < 0.01
    _, masks, table = prepared.load_split(root / "data", "train")
    assert len(masks) == len(train) and ((masks.reshape(len(masks), -1).sum(1)) == train["area"]).all()
    assert (table["copy"] >= 0).sum() == len(copies)  # balance stored the copies' pixels and nothing else
    assert len(np.load(root / "data/prepared/train_copies_images.npy", mmap_mode="r")) == len(copies)


def test_rerun_is_byte_identical(real):
    root, first = real
    assert digests(root) == first


def test_slices_are_the_files_pixels_in_rgb_order(real):
    """The fast OpenCV decode, turned back to RGB, equals tifffile's reading of the same Kaggle files (read here
    from the kept zip with Python's zipfile; the table names them inside kaggle_3m)."""
    import io
    import zipfile

    import tifffile
    root, _ = real
    source = json.loads((root / "data/raw/SOURCE.json").read_text())
    assert source["data"] == "kaggle_3m.zip" and not (root / "data/raw/kaggle_3m").exists()
    table = pd.read_csv(root / "data/index.csv")
    images = np.load(root / "data/slices/images.npy", mmap_mode="r")
    masks = np.load(root / "data/slices/masks.npy", mmap_mode="r")
    with zipfile.ZipFile(root / "data/raw/kaggle_3m.zip") as zf:
        def read(name):
            return tifffile.imread(io.BytesIO(zf.read(source["prefix"] + name)))

        for i in np.linspace(0, len(table) - 1, 7).astype(int):
            np.testing.assert_array_equal(images[i], read(table.image[i]))
            np.testing.assert_array_equal(masks[i], read(table["mask"][i]) // 255)
