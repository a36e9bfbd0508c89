import json
import stat
import time
import zipfile

import numpy as np
import pandas as pd
import pytest

from stages import download, index
from stages.common import BrainsegError
from tests.conftest import set_params


def kaggle_zip(path, root, prefixes=("kaggle_3m/", "lgg-mri-segmentation/kaggle_3m/"), extra=()):
    """A zip shaped like Kaggle's website archive.zip: two copies of kaggle_3m/, plus `extra` members."""
    with zipfile.ZipFile(path, "w") as zf:
        for prefix in prefixes:
            for file in sorted(root.rglob("*")):
                if file.is_file():
                    zf.write(file, prefix + file.relative_to(root).as_posix())
        for name, data in extra:
            zf.writestr(name, data)
    return path


def test_archive_zip_is_kept_whole_and_indexes_like_its_extracted_folder(project, synthetic_root):
    kaggle_zip(project / "archive.zip", synthetic_root)
    set_params(project, **{"data.source": "archive", "data.archive": "archive.zip"})
    download.main()
    assert sorted(p.name for p in (project / "data/raw").iterdir()) == ["SOURCE.json", "kaggle_3m.zip"]
    assert (project / "data/raw/kaggle_3m.zip").read_bytes() == (project / "archive.zip").read_bytes()
    record = json.loads((project / "data/raw/SOURCE.json").read_text())
    assert record == {"source": "archive", "archive": "archive.zip", "data": "kaggle_3m.zip", "prefix": "kaggle_3m/"}
    # the shallowest of the two copies is read; slices, table and counts as from the extracted folder
    frame, images, masks, problems, counts = index.build_index(project / "data/raw/kaggle_3m.zip", progress=False)
    frame2, images2, masks2, problems2, counts2 = index.build_index(synthetic_root, progress=False)
    assert problems == problems2 == [] and counts == counts2
    np.testing.assert_array_equal(images, images2)
    np.testing.assert_array_equal(masks, masks2)
    pd.testing.assert_frame_equal(frame, frame2)  # image and mask are paths inside kaggle_3m: the same


def test_switching_between_a_zip_and_a_folder_leaves_only_the_data_source_json_names(project, synthetic_root):
    kaggle_zip(project / "archive.zip", synthetic_root)
    set_params(project, **{"data.source": "archive", "data.archive": "archive.zip"})
    download.main()
    set_params(project, **{"data.source": "synthetic", "data.synthetic.patients": 2, "data.synthetic.slices": 3})
    download.main()
    assert sorted(p.name for p in (project / "data/raw").iterdir()) == ["SOURCE.json", "kaggle_3m"]
    assert json.loads((project / "data/raw/SOURCE.json").read_text())["data"] == "kaggle_3m"
    set_params(project, **{"data.source": "archive"})
    download.main()
    assert sorted(p.name for p in (project / "data/raw").iterdir()) == ["SOURCE.json", "kaggle_3m.zip"]
    index.main()
    assert json.loads((project / "metrics/data.json").read_text())["slices"] == 60


def test_archive_folder(project, synthetic_root):
    set_params(project, **{"data.source": "archive", "data.archive": str(synthetic_root.parent)})
    download.main()
    assert (project / "data/raw/kaggle_3m/data.csv").read_bytes() == (synthetic_root / "data.csv").read_bytes()


def test_synthetic_source(project):
    set_params(project, **{"data.source": "synthetic", "data.synthetic.patients": 2, "data.synthetic.slices": 3})
    download.main()
    assert len(list((project / "data/raw/kaggle_3m").glob("*/*_mask.tif"))) == 6


def test_kaggle_source_uses_kagglehub(project, synthetic_root, monkeypatch):
    import kagglehub

    calls = []
    monkeypatch.setattr(kagglehub, "dataset_download",
                        lambda handle: calls.append(handle) or str(synthetic_root.parent))
    set_params(project, **{"data.source": "kaggle"})
    download.main()
    assert calls == ["mateuszbuda/lgg-mri-segmentation"]
    assert (project / "data/raw/kaggle_3m/data.csv").is_file()


def test_kaggle_without_network_names_the_ways_forward_fast(project, monkeypatch):
    import kagglehub
    import requests

    def offline(handle):
        raise requests.exceptions.ConnectionError("Failed to resolve 'api.kaggle.com'")

    monkeypatch.setattr(kagglehub, "dataset_download", offline)
    set_params(project, **{"data.source": "kaggle"})
    start = time.monotonic()
    with pytest.raises(BrainsegError) as err:
        download.main()
    assert time.monotonic() - start < 5
    for way in ("credentials", "data.source=archive", "data.source=synthetic"):
        assert way in str(err.value)


def hostile(zip_path, name, data=b"x", link=False):
    with zipfile.ZipFile(zip_path, "w") as zf:
        zf.writestr("kaggle_3m/data.csv", "Patient\n")
        info = zipfile.ZipInfo(name)
        if link:
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, data)
    return zip_path


@pytest.mark.parametrize("name,link,words", [
    ("kaggle_3m/../../evil", False, "'..'"),
    ("/etc/evil", False, "absolute"),
    ("kaggle_3m/link", True, "symbolic link"),
])
def test_hostile_members_refused_and_earlier_output_kept(project, synthetic_root, name, link, words):
    set_params(project, **{"data.source": "archive", "data.archive": str(synthetic_root.parent)})
    download.main()
    before = sorted(p.name for p in (project / "data/raw/kaggle_3m").iterdir())
    hostile(project / "evil.zip", name, link=link)
    set_params(project, **{"data.archive": "evil.zip"})
    with pytest.raises(BrainsegError, match=words):
        download.main()
    assert sorted(p.name for p in (project / "data/raw/kaggle_3m").iterdir()) == before
    assert not (project.parent / "evil").exists() and not list(project.glob("data/raw/.kaggle_3m*"))


def test_zip_bomb_refused_before_extraction(tmp_path):
    with zipfile.ZipFile(tmp_path / "bomb.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("kaggle_3m/data.csv", "Patient\n")
        zf.writestr("kaggle_3m/TCGA_CS_0000_20000101/big.tif", b"\0" * (64 << 20))
    with pytest.raises(BrainsegError, match="zip bomb"):
        download.extract_zip(tmp_path / "bomb.zip", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_too_many_members_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(download, "MAX_MEMBERS", 5)
    with zipfile.ZipFile(tmp_path / "many.zip", "w") as zf:
        for i in range(6):
            zf.writestr(f"kaggle_3m/{i}", b"")
    with pytest.raises(BrainsegError, match="members"):
        download.extract_zip(tmp_path / "many.zip", tmp_path / "out")


def test_zip_of_another_data_set_refused(tmp_path):
    with zipfile.ZipFile(tmp_path / "cats.zip", "w") as zf:
        zf.writestr("cats/cat1.jpg", b"meow")
    with pytest.raises(BrainsegError, match="not the LGG"):
        download.extract_zip(tmp_path / "cats.zip", tmp_path / "out")


def test_not_a_zip_and_missing_path(tmp_path):
    (tmp_path / "fake.zip").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(BrainsegError, match="not a readable zip"):
        download.materialise(tmp_path / "fake.zip", tmp_path / "out")
    with pytest.raises(BrainsegError, match="no such file"):
        download.materialise(tmp_path / "nothing.zip", tmp_path / "out")
