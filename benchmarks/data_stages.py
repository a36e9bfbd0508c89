"""Benchmark: the data stages (download from the archive, index, split, balance) on the dev archive,
against the time to just decode every TIFF once.

    python -m benchmarks.data_stages [--archive ../shared/data/lgg-mri-segmentation-dev.zip]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import yaml

from stages import balance, download, index, split
from stages.common import ROOT


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def decode_all(folder: Path) -> None:
    """Pixels only, with the fastest decoder here (OpenCV's libtiff), no checks, 2 threads."""
    files = [str(f) for f in sorted(folder.rglob("*.tif"))]
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(lambda f: cv2.imread(f, cv2.IMREAD_UNCHANGED), files))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", default=str(ROOT.parent / "shared/data/lgg-mri-segmentation-dev.zip"))
    archive = Path(parser.parse_args().archive).resolve()
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(source="archive", archive=str(archive))
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        Path("params.yaml").write_text(yaml.safe_dump(params))
        times = {name: timed(stage.main) for name, stage in
                 [("download", download), ("index", index), ("split", split), ("balance", balance)]}
        decode = min(timed(lambda: decode_all(Path("data/raw/kaggle_3m"))) for _ in range(2))
    total = sum(times.values())
    print(f"\nmachine: {os.cpu_count()} cores; archive: {archive.name}")
    for name, seconds in times.items():
        print(f"  {name:9s} {seconds:6.1f} s")
    print(f"data stages total    {total:6.1f} s   (target < 30 s)")
    print(f"decode every TIFF    {decode:6.1f} s   (2 threads, best of 2)")
    print(f"ratio                {total / decode:6.2f} x  (target <= 2x)")


if __name__ == "__main__":
    main()
