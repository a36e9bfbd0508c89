import json
import zipfile

import numpy as np
import pytest
import tifffile

from benchmarks import archive_parts
from stages.common import BrainsegError


def files(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_parts_rebuild_every_slice_pixel_identically_within_the_limit(synthetic_root, tmp_path):
    limit_mb = 0.15
    parts = archive_parts.pack(synthetic_root, tmp_path / "parts", limit_mb=limit_mb, workers=2)
    assert len(parts) > 1
    patients = [{n.split("/")[1] for n in zipfile.ZipFile(p).namelist() if n.count("/") == 2} for p in parts]
    assert sum(map(len, patients)) == len(set().union(*patients)) == 6  # whole patients, each in one part
    for part in parts:
        names = zipfile.ZipFile(part).namelist()
        assert all(n.endswith((".webp", "_mask.tif", "data.csv", "manifest.json")) for n in names)
        if len(names) > 1 + 2 * 10:  # more than one patient: the limit held
            assert part.stat().st_size <= limit_mb * 2**20

    root = archive_parts.unpack(parts, tmp_path / "out", workers=2)
    assert root == tmp_path / "out/kaggle_3m" and files(root) == files(synthetic_root)
    for name in files(synthetic_root):
        if name.endswith(".tif"):
            assert np.array_equal(tifffile.imread(root / name), tifffile.imread(synthetic_root / name)), name
        else:
            assert (root / name).read_bytes() == (synthetic_root / name).read_bytes()


def test_a_part_that_does_not_match_its_manifest_is_refused(synthetic_root, tmp_path):
    [part] = archive_parts.pack(synthetic_root, tmp_path / "parts", limit_mb=100, workers=2)
    with zipfile.ZipFile(part) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    manifest = json.loads(members["manifest.json"])
    victim = next(n for n in manifest if n.endswith(".webp"))
    manifest[victim] = "0" * 64
    members["manifest.json"] = json.dumps(manifest).encode()
    with zipfile.ZipFile(part, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    with pytest.raises(BrainsegError, match=f"{victim} does not match its manifest"):
        archive_parts.unpack([part], tmp_path / "out", workers=2)
