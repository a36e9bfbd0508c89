"""Stage `download`: put the Kaggle LGG data set, in Kaggle's layout, in data/raw.

Sources (params.yaml `data.source`): kaggle (kagglehub), archive (a zip as Kaggle's website gives it,
or an extracted folder), synthetic (the built-in generator, for the demo and code-path tests).
A zip is checked (every member's path, size and CRC) and kept whole as data/raw/kaggle_3m.zip, which the index
stage reads in place; the other sources give the folder data/raw/kaggle_3m. SOURCE.json says which.
"""
from __future__ import annotations

import shutil
import stat
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from stages.common import BrainsegError, atomic_path, load_params, run_main, write_json

RAW = Path("data") / "raw"
MAX_MEMBERS = 20_000          # Kaggle's archive has about 7,900 files per copy
MAX_TOTAL_BYTES = 8 << 30     # Kaggle's archive expands to about 1.5 GiB (two copies)
MAX_RATIO = 200               # expansion ratio of one member; TIFF slices compress a few times at most

WAYS_FORWARD = (
    "three ways forward: (1) Kaggle credentials (~/.kaggle/kaggle.json or KAGGLE_USERNAME/KAGGLE_KEY) and "
    "network; (2) `dvc exp run -S data.source=archive -S data.archive=PATH/archive.zip` with the zip from "
    "https://www.kaggle.com/datasets/mateuszbuda/lgg-mri-segmentation; (3) `dvc exp run -S data.source=synthetic` "
    "for the built-in demo data")


def kaggle_root(folder: Path) -> Path:
    """The kaggle_3m folder inside an extracted download (the folder itself, or the shallowest one below)."""
    if (folder / "data.csv").is_file() and folder.name == "kaggle_3m":
        return folder
    found = sorted((p for p in folder.rglob("kaggle_3m") if p.is_dir()), key=lambda p: len(p.parts))
    if not found:
        raise BrainsegError(f"{folder}: no kaggle_3m folder inside; this is not the LGG MRI Segmentation data set. "
                            "Fix: point data.archive at Kaggle's archive.zip or its extracted folder")
    return found[0]


def member_prefix(names: list[str], zip_path) -> str:
    """The kaggle_3m/ prefix to extract: Kaggle's archive.zip holds two copies, take the shallowest."""
    prefixes = sorted({n[: n.index("kaggle_3m/") + len("kaggle_3m/")] for n in names if "kaggle_3m/" in n},
                      key=len)
    if not prefixes or not any(n == prefixes[0] + "data.csv" for n in names):
        raise BrainsegError(f"{zip_path}: no kaggle_3m/data.csv inside; this zip is not the LGG MRI Segmentation "
                            "data set. Fix: download archive.zip from Kaggle's dataset page")
    return prefixes[0]


def check_members(zf: zipfile.ZipFile, zip_path) -> None:
    """Refuse a hostile or broken zip before anything is written."""
    infos = zf.infolist()
    if len(infos) > MAX_MEMBERS:
        raise BrainsegError(f"{zip_path}: {len(infos)} members, more than {MAX_MEMBERS}; refused. "
                            "Fix: use Kaggle's archive.zip as downloaded")
    total = 0
    for info in infos:
        path = PurePosixPath(info.filename)
        if info.filename.startswith(("/", "\\")) or path.is_absolute() or ":" in path.parts[0]:
            raise BrainsegError(f"{zip_path}: member '{info.filename}' has an absolute path; refused")
        if ".." in path.parts or "\\" in info.filename:
            raise BrainsegError(f"{zip_path}: member '{info.filename}' climbs out with '..'; refused")
        if stat.S_ISLNK(info.external_attr >> 16):
            raise BrainsegError(f"{zip_path}: member '{info.filename}' is a symbolic link; refused")
        if info.compress_size and info.file_size / info.compress_size > MAX_RATIO and info.file_size > 1 << 20:
            raise BrainsegError(f"{zip_path}: member '{info.filename}' expands {info.file_size // info.compress_size}x "
                                f"(zip bomb?); refused")
        total += info.file_size
    if total > MAX_TOTAL_BYTES:
        raise BrainsegError(f"{zip_path}: would expand to {total >> 20} MiB, more than {MAX_TOTAL_BYTES >> 20} MiB; "
                            "refused")


def open_kaggle_zip(zip_path: Path) -> tuple[zipfile.ZipFile, str]:
    """-> (the open zip, its kaggle_3m/ prefix), its members checked; nothing is read or written yet."""
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as err:
        raise BrainsegError(f"{zip_path}: not a readable zip ({err}). Fix: download the archive again") from None
    try:
        check_members(zf, zip_path)
        return zf, member_prefix(zf.namelist(), zip_path)
    except BaseException:
        zf.close()
        raise


def extract_zip(zip_path: Path, dest: Path) -> None:
    """Extract the kaggle_3m folder of `zip_path` to `dest` (a new folder), checking members first."""
    zf, prefix = open_kaggle_zip(zip_path)
    with zf:
        dest.mkdir(parents=True)
        for info in zf.infolist():
            if not info.filename.startswith(prefix) or info.is_dir():
                continue
            target = dest / info.filename[len(prefix):]
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as out:
                    # read at most the declared size + 1: a member lying about its size is caught, not obeyed
                    data = src.read(info.file_size + 1)
                    if len(data) > info.file_size:
                        raise BrainsegError(f"{zip_path}: member '{info.filename}' is larger than declared; refused")
                    out.write(data)
            except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, FileExistsError,
                    NotADirectoryError, IsADirectoryError) as err:  # a damaged download or a malformed zip
                raise BrainsegError(f"{zip_path}: member '{info.filename}' cannot be extracted "
                                    f"({type(err).__name__}: {err}). Fix: download the archive again") from None


def copy_folder(folder: Path, dest: Path) -> None:
    src = kaggle_root(folder)
    links = [p for p in src.rglob("*") if p.is_symlink()]
    if links:
        raise BrainsegError(f"{links[0]}: symbolic links are refused in the data folder. Fix: copy real files")
    shutil.copytree(src, dest)


def materialise(source: Path | str, dest: Path) -> Path:
    """A zip or a folder in Kaggle's layout -> dest (a new folder holding data.csv and the patient folders)."""
    source = Path(source)
    if source.is_dir():
        copy_folder(source, dest)
    elif source.is_file():
        extract_zip(source, dest)
    else:
        raise BrainsegError(f"{source}: no such file or folder. Fix: set data.archive to Kaggle's archive.zip "
                            "or the folder it extracts to")
    return dest


def download_kaggle(dataset: str) -> Path:
    """kagglehub's download (cached under ~/.cache/kagglehub); any failure names the ways forward."""
    import kagglehub  # imported here: the other sources must work without touching the network stack

    try:
        return Path(kagglehub.dataset_download(dataset))
    except Exception as err:
        raise BrainsegError(f"Kaggle download of {dataset} failed ({type(err).__name__}: {str(err)[:200]}); "
                            + WAYS_FORWARD) from None


def refuse_clashes(names: list[str], archive: Path) -> None:
    """A name given twice, or both a file and a folder, has no single meaning (extraction would fail on it)."""
    seen, folders = set(), set()
    for name in names:
        parts = name.rstrip("/").split("/")
        folders.update("/".join(parts[:k]) for k in range(1, len(parts)))
    for name in names:
        if name in seen or (not name.endswith("/") and name in folders):
            raise BrainsegError(f"{archive}: member '{name}' clashes with another (given twice, or both a file and "
                                "a folder); refused. Fix: download the archive again")
        seen.add(name)


def keep_zip(archive: Path, dest: Path) -> str:
    """Check a Kaggle zip as an extraction would (paths, sizes, CRCs) and copy it whole to `dest`; -> its
    kaggle_3m/ prefix. Reading every member costs ~0.3 s for the dev archive; writing its 4,382 files ~2 s."""
    zf, prefix = open_kaggle_zip(archive)
    with zf:
        refuse_clashes([n for n in zf.namelist() if n.startswith(prefix)], archive)
        for info in zf.infolist():
            if info.filename.startswith(prefix) and not info.is_dir():
                try:
                    with zf.open(info) as src:  # reads at most the declared size; the CRC is checked at its end
                        while src.read(1 << 20):
                            pass
                except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as err:
                    raise BrainsegError(f"{archive}: member '{info.filename}' is damaged ({type(err).__name__}: "
                                        f"{err}). Fix: download the archive again") from None
    shutil.copyfile(archive, dest)
    return prefix


def fetch(data: dict, raw: Path = RAW) -> dict:
    """Make raw/kaggle_3m (a folder) or raw/kaggle_3m.zip from params `data`; returns what SOURCE.json records.

    The new data set is renamed into place whole, then SOURCE.json names it, then the other form is removed:
    a failure at any point leaves a SOURCE.json that names complete data."""
    source = data["source"]
    archive = Path(data.get("archive") or "").resolve() if source == "archive" else None
    if archive is not None and archive.is_file():
        with atomic_path(raw / "kaggle_3m.zip") as tmp:
            prefix = keep_zip(archive, tmp)
        record = {"source": "archive", "archive": archive.name, "data": "kaggle_3m.zip", "prefix": prefix}
    else:
        with atomic_path(raw / "kaggle_3m", is_dir=True) as tmp:
            tmp.rmdir()
            if source == "kaggle":
                materialise(download_kaggle(data["kaggle_dataset"]), tmp)
                record = {"source": "kaggle", "dataset": data["kaggle_dataset"]}
            elif source == "archive":
                materialise(archive, tmp)
                record = {"source": "archive", "archive": archive.name}
            elif source == "synthetic":
                from stages.synthetic import write_dataset

                write_dataset(tmp, **data["synthetic"])
                record = {"source": "synthetic", **data["synthetic"]}
            else:
                raise BrainsegError(f"params.yaml: data.source '{source}' is not kaggle, archive or synthetic")
        record["data"] = "kaggle_3m"
    write_json(raw / "SOURCE.json", record)
    stale = raw / ("kaggle_3m" if record["data"] == "kaggle_3m.zip" else "kaggle_3m.zip")
    if stale.is_dir():
        shutil.rmtree(stale)
    elif stale.exists():
        stale.unlink()
    return record


def main() -> None:
    record = fetch(load_params("data"))
    print(f"data ready at {RAW / record['data']} from {record['source']}")


if __name__ == "__main__":
    run_main(main)
