import os
import shutil
from pathlib import Path

import pytest

import stages  # noqa: F401  first, so TensorFlow starts with the pipeline's settings whichever test imports it

ROOT = Path(__file__).resolve().parent.parent
DEV_ZIP = Path(os.environ.get("BRAINSEG_DEV_ZIP", ROOT.parent / "shared/data/lgg-mri-segmentation-dev.zip"))


@pytest.fixture(scope="session", autouse=True)
def litert_cache(tmp_path_factory):
    """Converted LiteRT graphs go to a fresh folder, not the user's ~/.cache (subprocesses inherit it), and auto
    takes the float32 graph whatever this CPU's instructions: an int8 graph costs a calibrated conversion, and an
    untrained unet's cannot run (auto then converts the float32 one too). The tests of the int8 choice set
    $BRAINSEG_INT8_DOT=1 (the `int8_cpu` fixture)."""
    os.environ["BRAINSEG_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    os.environ["BRAINSEG_INT8_DOT"] = "0"


@pytest.fixture
def int8_cpu(monkeypatch):
    """As on a CPU with int8 dot products (VNNI, AMX, Arm dotprod), where auto takes unet's int8 graph."""
    monkeypatch.setenv("BRAINSEG_INT8_DOT", "1")


@pytest.fixture(scope="session")
def dev_zip() -> Path:
    """The real dev archive (61 patients). Skips when absent, except under CI=true where it must be there."""
    if not DEV_ZIP.is_file():
        reason = (f"real data archive not found at {DEV_ZIP}: put the dev zip there or set BRAINSEG_DEV_ZIP")
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return DEV_ZIP


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A fresh project folder holding the repo's params.yaml, made the working directory (as DVC does)."""
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    return tmp_path


def set_params(project: Path, **changes) -> None:
    """Set dotted keys in the project's params.yaml, as `dvc exp run -S key=value` does."""
    import yaml

    params = yaml.safe_load((project / "params.yaml").read_text())
    for dotted, value in changes.items():
        node = params
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params))


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A small synthetic Kaggle-layout folder (kaggle_3m), made once per session; treat as read-only."""
    from stages.synthetic import write_dataset

    return write_dataset(tmp_path_factory.mktemp("synthetic") / "kaggle_3m", patients=6, slices=10, seed=1)


@pytest.fixture
def raw(project, synthetic_root):
    """The project's data/raw/kaggle_3m as a writable copy of the synthetic data set (6 patients x 10 slices)."""
    dest = project / "data/raw/kaggle_3m"
    shutil.copytree(synthetic_root, dest)
    (project / "data/raw/SOURCE.json").write_text('{"source": "synthetic"}')
    return dest


def write_data(data: Path, images, masks, tables: dict, copies: dict | None = None) -> Path:
    """A `data` folder in the layout stages.prepared reads: data/slices/{images,masks}.npy, an index.csv and
    data/prepared/{split}.csv (tables with `row` into the slices and `copy`, -1 or a row of {split}_copies_*.npy,
    given as (images, masks) in `copies`)."""
    import numpy as np

    from stages import prepared

    (data / "slices").mkdir(parents=True, exist_ok=True)
    (data / "prepared").mkdir(exist_ok=True)
    np.save(data / "slices/images.npy", images)
    np.save(data / "slices/masks.npy", masks)
    (data / "index.csv").write_text(f"a test index of {len(images)} slices\n")
    for split, table in tables.items():
        table.to_csv(data / "prepared" / f"{split}.csv", index=False)
    for split, (copy_images, copy_masks) in (copies or {}).items():
        np.save(data / "prepared" / f"{split}_copies_images.npy", copy_images)
        np.save(data / "prepared" / f"{split}_copies_masks.npy", copy_masks)
    prepared.write_record(data / "prepared", data, len(images))
    return data


SIZE = 64  # the side of write_prepared's slices


def write_prepared(folder, counts=(("train", 8), ("val", 4))):
    """A tiny `data` folder in the balance stage's layout; every other slice has a bright 'tumour'.
    The last two training slices are augmented copies (pixels in train_copies_*.npy)."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(0)
    n_all = sum(n for _, n in counts)
    images = rng.integers(0, 120, (n_all, SIZE, SIZE, 3), dtype=np.uint8)
    masks = np.zeros((n_all, SIZE, SIZE), np.uint8)
    masks[::2, 16:40, 20:44] = 1
    images[masks.astype(bool)] = 230
    tables, copies, start = {}, {}, 0
    for split, n in counts:
        rows = np.arange(start, start + n)
        start += n
        copy = np.full(n, -1)
        if split == "train":
            copy[-2:] = [0, 1]
            copies[split] = images[rows[-2:]], masks[rows[-2:]]
            rows[-2:] = rows[:2]  # a copy's row is its source slice's
        area = masks.reshape(n_all, -1).sum(axis=1)[start - n:start]
        tables[split] = pd.DataFrame({"patient": "TCGA_XX_0001", "case": "TCGA_XX_0001_20000101",
                                      "slice": range(1, n + 1), "image": "", "augmentation": "",
                                      "tumour": (area > 0).astype(int), "area": area, "row": rows, "copy": copy})
    return write_data(folder, images, masks, tables, copies)


@pytest.fixture
def prepared(tmp_path):
    return write_prepared(tmp_path)


@pytest.fixture
def cfg():
    """params.yaml's train section under the demo profile, shrunk to one epoch of a 4-filter model."""
    from stages.common import load_params, train_config

    params = load_params()
    params["profile"] = "demo"
    return {**train_config(params), "epochs": 1, "batch_size": 4, "filters": 4, "image_size": SIZE}
