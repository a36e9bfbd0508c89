"""Benchmark: the data stages (download from the archive, index, split, balance) on the dev archive,
against the time to just decode every TIFF once (read from the zip, pixels only, 2 threads). Both are timed
`--repeats` times, alternated (the four stages in a fresh folder, then the decode, and again), and their medians are
compared: this machine's speed comes and goes by a quarter within minutes, and one run of each put the ratio
anywhere from 1.8x to 2.4x. For comparison it also times extracting the zip's files, which the download stage did
before it kept zips whole.

    python -m benchmarks.data_stages [--archive ../shared/data/lgg-mri-segmentation-dev.zip] [--repeats 3]
    python -m benchmarks.data_stages -S balance.total=2x   # a setting changed as `dvc exp run -S` would
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
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


STAGES = [("download", download), ("index", index), ("split", split), ("balance", balance)]


def run_stages(params: dict) -> dict[str, float]:
    """Each data stage's seconds, run in order in a fresh folder holding `params` as params.yaml."""
    with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp):
        Path("params.yaml").write_text(yaml.safe_dump(params))
        return {name: timed(stage.main) for name, stage in STAGES}


def figures(values: list[float]) -> str:
    """The median, then every run's figure when there were several."""
    each = f"   (runs: {' / '.join(f'{v:.1f}' for v in values)})" if len(values) > 1 else ""
    return f"{statistics.median(values):6.1f} s{each}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", default=str(ROOT.parent / "shared/data/lgg-mri-segmentation-dev.zip"))
    parser.add_argument("--repeats", type=int, default=3, help="runs of the stages and of the decode, alternated")
    parser.add_argument("-S", dest="set", action="append", default=[], metavar="KEY=VALUE",
                        help="change a setting of params.yaml for this run, as `dvc exp run -S` does")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: give 1 or more")
    archive = Path(args.archive).resolve()
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(source="archive", archive=str(archive))
    for assignment in args.set:
        override(params, assignment)
    runs, decodes = [], []
    for _ in range(args.repeats):
        runs.append(run_stages(params))
        decodes.append(timed(lambda: decode_all(archive)))
    with tempfile.TemporaryDirectory() as tmp:
        extract = timed(lambda: download.extract_zip(archive, Path(tmp) / "extracted"))
    totals = [sum(run.values()) for run in runs]
    total, decode = statistics.median(totals), statistics.median(decodes)
    print(f"\nmachine: {os.cpu_count()} cores; archive: {archive.name}; balance.total: {params['balance']['total']}"
          + "".join(f"; -S {a}" for a in args.set) + f"; medians of {args.repeats} run(s), alternated")
    for name, _ in STAGES:
        print(f"  {name:9s}          {figures([run[name] for run in runs])}")
    print(f"data stages total    {figures(totals)}   (target < 30 s)")
    print(f"decode every TIFF    {figures(decodes)}   (2 threads)")
    each = " / ".join(f"{t / d:.2f}" for t, d in zip(totals, decodes))
    print(f"ratio                {total / decode:6.2f} x  (target <= 2x; the medians' ratio"
          + (f"; each run's own: {each})" if args.repeats > 1 else ")"))
    print(f"extracting the zip's files instead (the download stage before it kept zips whole): {extract:.1f} s")


if __name__ == "__main__":
    main()
