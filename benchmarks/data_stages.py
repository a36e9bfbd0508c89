"""Benchmark: the data stages (download from the archive, index, split, balance) on the dev archive,
against the time to just decode every TIFF once (read from the zip, pixels only, 2 threads). For comparison it
also times extracting the zip's files, which the download stage did before it kept zips whole.

    python -m benchmarks.data_stages [--archive ../shared/data/lgg-mri-segmentation-dev.zip]
    python -m benchmarks.data_stages -S balance.total=2x   # a setting changed as `dvc exp run -S` would
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import yaml

from benchmarks.gpu_recipe import override
from stages import balance, download, index, split
from stages.common import ROOT


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def decode_all(archive: Path) -> None:
    """Every TIFF of the zip's first kaggle_3m copy: its bytes, then pixels only with the fastest decoder here
    (OpenCV's libtiff), no checks, 2 threads."""
    with zipfile.ZipFile(archive) as zf:
        prefix = download.member_prefix(zf.namelist(), archive)
        names = [n for n in zf.namelist() if n.startswith(prefix) and n.endswith(".tif")]

        def decode(name):
            return cv2.imdecode(np.frombuffer(zf.read(name), np.uint8), cv2.IMREAD_UNCHANGED)

        with ThreadPoolExecutor(max_workers=2) as pool:
            list(pool.map(decode, names))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", default=str(ROOT.parent / "shared/data/lgg-mri-segmentation-dev.zip"))
    parser.add_argument("-S", dest="set", action="append", default=[], metavar="KEY=VALUE",
                        help="change a setting of params.yaml for this run, as `dvc exp run -S` does")
    args = parser.parse_args()
    archive = Path(args.archive).resolve()
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(source="archive", archive=str(archive))
    for assignment in args.set:
        override(params, assignment)
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        Path("params.yaml").write_text(yaml.safe_dump(params))
        times = {name: timed(stage.main) for name, stage in
                 [("download", download), ("index", index), ("split", split), ("balance", balance)]}
        decode = min(timed(lambda: decode_all(archive)) for _ in range(2))
        extract = timed(lambda: download.extract_zip(archive, Path("extracted")))
    total = sum(times.values())
    print(f"\nmachine: {os.cpu_count()} cores; archive: {archive.name}; balance.total: {params['balance']['total']}"
          + "".join(f"; -S {a}" for a in args.set))
    for name, seconds in times.items():
        print(f"  {name:9s} {seconds:6.1f} s")
    print(f"data stages total    {total:6.1f} s   (target < 30 s)")
    print(f"decode every TIFF    {decode:6.1f} s   (2 threads, best of 2)")
    print(f"ratio                {total / decode:6.2f} x  (target <= 2x)")
    print(f"extracting the zip's files instead (the download stage before it kept zips whole): {extract:.1f} s")


if __name__ == "__main__":
    main()
