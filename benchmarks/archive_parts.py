"""Move a Kaggle-layout archive through a size-limited transfer, losslessly: pack it into parts, rebuild it.

The dev archive (176 MB of deflated TIFFs) does not fit the 64 MiB that one call to a lent GPU machine
carries. Lossless WebP holds the same slices in about 70% of the bytes (121 MiB in all), so three parts of
under 60 MiB do, each patient whole in one part. Masks (tiny) and data.csv travel as they are. Every part
carries a manifest of each slice's pixel SHA-256, and rebuilding checks it, so the rebuilt folder is
pixel-identical to the archive (TIFFs written uncompressed).

  python -m benchmarks.archive_parts pack ../shared/data/lgg-mri-segmentation-dev.zip .gpu --limit-mb 59.5
  python -m benchmarks.archive_parts unpack .gpu/part-*.zip --out /root/lgg     # -> /root/lgg/kaggle_3m
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

import cv2
import numpy as np
import tifffile
from tqdm import tqdm

from stages.common import BrainsegError
from stages.rawdata import open_raw

MANIFEST = "manifest.json"
WEBP_LOSSLESS = [cv2.IMWRITE_WEBP_QUALITY, 101]  # above 100: OpenCV's lossless mode


def digest(pixels: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).hexdigest()


def read_bytes(raw, name: str) -> bytes:
    """The bytes of kaggle_3m/`name` from a Folder or Zip reader."""
    source = raw.source(raw.label(*name.split("/")))
    return source.read_bytes() if isinstance(source, Path) else source.getvalue()


def encode(raw, name: str) -> tuple[str, bytes, str]:
    """(member name in a part, its bytes, the pixels' digest) for kaggle_3m/`name`."""
    data = read_bytes(raw, name)
    name = f"kaggle_3m/{name}"
    pixels = tifffile.imread(io.BytesIO(data)) if name.endswith(".tif") else None
    if name.endswith(".tif") and not name.endswith("_mask.tif"):
        ok, webp = cv2.imencode(".webp", pixels, WEBP_LOSSLESS)  # channel order kept as is: decode gives it back
        if not ok or not np.array_equal(cv2.imdecode(webp, cv2.IMREAD_UNCHANGED), pixels):
            raise BrainsegError(f"{name}: WebP did not hold these pixels losslessly; carry the TIFF instead")
        return name[:-4] + ".webp", webp.tobytes(), digest(pixels)
    return name, data, digest(pixels) if pixels is not None else hashlib.sha256(data).hexdigest()


def pack(archive: Path, out: Path, limit_mb: float = 59.5, workers: int = 4) -> list[Path]:
    """Parts `out`/part-N.zip of at most `limit_mb` each (whole patients per part; data.csv in the first)."""
    raw = open_raw(Path(archive))
    try:
        names = [f"{case}/{entry}" for case, entries in raw.cases() for entry in entries] + ["data.csv"]
        with ThreadPoolExecutor(workers) as pool:
            packed = list(tqdm(pool.map(lambda n: encode(raw, n), names), total=len(names), desc="packing"))
    finally:
        raw.close()
    by_case: dict[str, list] = {}
    for member in packed:
        by_case.setdefault(str(PurePosixPath(member[0]).parent), []).append(member)
    parts: list[list] = [[]]
    size = 0
    for case in sorted(by_case):
        case_bytes = sum(len(data) for _, data, _ in by_case[case])
        if parts[-1] and size + case_bytes > limit_mb * 2**20:
            parts.append([])
            size = 0
        parts[-1] += by_case[case]
        size += case_bytes
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, members in enumerate(parts, 1):
        path = out / f"part-{i}.zip"
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:  # WebP and TIFF are compressed already
            for name, data, _ in members:
                zf.writestr(name, data)
            zf.writestr(MANIFEST, json.dumps({name: sha for name, _, sha in members}, indent=0))
        paths.append(path)
    return paths


def unpack(parts: list[Path], out: Path, workers: int = 16) -> Path:
    """Rebuild kaggle_3m under `out` from the parts, checking every file against its part's manifest."""
    root = out / "kaggle_3m"

    def rebuild(zf: zipfile.ZipFile, name: str, sha: str) -> None:
        data = zf.read(name)
        dest = root.parent / name
        if name.endswith(".webp"):
            pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
            dest = dest.with_suffix(".tif")
            ok = digest(pixels) == sha
            if ok:
                tifffile.imwrite(dest, pixels, photometric="rgb")
        else:
            ok = (digest(tifffile.imread(io.BytesIO(data))) if name.endswith(".tif")
                  else hashlib.sha256(data).hexdigest()) == sha
            if ok:
                dest.write_bytes(data)
        if not ok:
            raise BrainsegError(f"{zf.filename}: {name} does not match its manifest; pack the archive again")

    for part in parts:
        with zipfile.ZipFile(part) as zf:
            manifest = json.loads(zf.read(MANIFEST))
            for folder in {(root.parent / name).parent for name in manifest}:
                folder.mkdir(parents=True, exist_ok=True)
            with ThreadPoolExecutor(workers) as pool:
                list(tqdm(pool.map(lambda item: rebuild(zf, *item), manifest.items()), total=len(manifest),
                          desc=f"rebuilding {part.name}"))
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack")
    p.add_argument("archive", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--limit-mb", type=float, default=59.5)
    u = sub.add_parser("unpack")
    u.add_argument("parts", type=Path, nargs="+")
    u.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.command == "pack":
        for path in pack(args.archive, args.out, args.limit_mb):
            print(f"{path}: {path.stat().st_size / 2**20:.1f} MiB")
    else:
        print(unpack(args.parts, args.out))


if __name__ == "__main__":
    main()
