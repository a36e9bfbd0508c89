"""The raw data set as the download stage leaves it: a kaggle_3m folder, or the zip that holds one, read in place.

A zip is not extracted: writing its 4,000-8,000 small TIFFs back to disk (and DVC then hashing and caching each
one) cost more than decoding them. Both kinds list their patient folders and hand out each file to decode (a path,
or a member's bytes), and name every file as a path, `<zip>/<case>/<file>` inside a zip, so errors point at it.
"""
from __future__ import annotations

import io
import zipfile
import zlib
from pathlib import Path

from stages.common import BrainsegError
from stages.images import BadImage


def open_raw(path: Path | str) -> "Folder | Zip":
    """A kaggle_3m folder (or a folder holding one) or a zip of Kaggle's layout."""
    from stages.download import kaggle_root  # the download stage owns the layout rules

    path = Path(path)
    if path.is_dir():  # the folder itself unless it is a download holding kaggle_3m further down
        return Folder(path if path.name == "kaggle_3m" or (path / "data.csv").exists() else kaggle_root(path))
    if path.is_file():
        return Zip(path)
    raise BrainsegError(f"{path}: no such file or folder. Fix: run `dvc repro download` first, or point at "
                        "Kaggle's archive.zip or the folder it extracts to")


class Folder:
    def __init__(self, root: Path):
        self.root = Path(root)

    def cases(self) -> list[tuple[str, list[str]]]:
        """(patient folder, its entries' names) for every non-hidden folder; files beside them are not slices."""
        return [(folder.name, sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")))
                for folder in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))]

    def label(self, *parts: str) -> str:
        return str(self.root.joinpath(*parts))

    def source(self, label: str) -> Path:
        return Path(label)

    def close(self) -> None:
        pass


class Zip:
    """The shallowest kaggle_3m/ of a zip (Kaggle's website archive holds two copies), checked like an extraction."""

    def __init__(self, path: Path):
        from stages.download import open_kaggle_zip

        self.path = Path(path)
        self.zf, self.prefix = open_kaggle_zip(self.path)
        self.members = {}  # label -> member name
        self._cases: dict[str, set[str]] = {}
        for name in self.zf.namelist():
            if not name.startswith(self.prefix):
                continue
            parts = name[len(self.prefix):].split("/")
            if len(parts) == 1:  # data.csv and other files beside the patient folders
                self.members[self.label(parts[0])] = name
                continue
            case, entry = parts[0], parts[1]
            if case.startswith("."):
                continue
            entries = self._cases.setdefault(case, set())
            if entry and not entry.startswith("."):  # a deeper path shows as its first folder, as iterdir would
                entries.add(entry)
                if len(parts) == 2:
                    self.members[self.label(case, entry)] = name

    def cases(self) -> list[tuple[str, list[str]]]:
        return [(case, sorted(self._cases[case])) for case in sorted(self._cases)]

    def label(self, *parts: str) -> str:
        return "/".join([str(self.path), *parts])

    def source(self, label: str) -> io.BytesIO:
        """The member's bytes, in memory (ZipFile reads members from several threads under its own lock)."""
        if label not in self.members:  # a folder named like a slice: the folder reader fails on it the same way
            raise BadImage(label, "is not a file in the archive", "rename or remove that folder in the archive")
        try:
            return io.BytesIO(self.zf.read(self.members[label]))  # the CRC is checked as it is read
        except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as err:
            raise BadImage(label, f"cannot be read from the archive ({type(err).__name__}: {err})",
                           "download the archive again") from None

    def close(self) -> None:
        self.zf.close()
