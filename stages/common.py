"""Things every stage shares: params, user-facing errors, atomic outputs, seeding."""
from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

# Stages run from the project root (DVC runs them there), so every data path is relative to the working
# directory; ROOT is where the code lives.
ROOT = Path(__file__).resolve().parent.parent
PARAMS = Path("params.yaml")


class BrainsegError(Exception):
    """An error the user can act on: the message names the file and the fix."""


def load_params(section: str | None = None, path: Path | str = PARAMS) -> dict:
    if not Path(path).is_file():
        raise BrainsegError(f"{path}: not found. Fix: run stages from the project root (where params.yaml is)")
    with open(path) as f:
        params = yaml.safe_load(f)
    return params if section is None else params[section]


def train_config(params: dict) -> dict:
    """`train` merged with the chosen hardware profile (cpu / gpu / demo), profile wins."""
    profile = params.get("profile", "cpu")
    if profile not in params["profiles"]:
        raise BrainsegError(
            f"params.yaml: profile '{profile}' is not one of {sorted(params['profiles'])}; "
            "set it with `dvc exp run -S profile=cpu`")
    return {**params["train"], **params["profiles"][profile], "profile": profile}


def profile_overrides(params: dict) -> dict:
    """The keys of `train` that the chosen profile sets otherwise, {key: (train's value, the profile's)}: what a
    `-S train.KEY=...` cannot change under that profile (the demo and gpu profiles' members: null, for one)."""
    profile = params["profiles"].get(params.get("profile", "cpu")) or {}
    return {key: (params["train"][key], value) for key, value in profile.items()
            if key in params["train"] and params["train"][key] != value}


def member_seeds(cfg: dict) -> list[int]:
    """train.members (of params.yaml's train section) as a list of seeds, checked; [] for one network (null). Here
    because balance reads it too: with balance.seed `members` it draws each member its own copies."""
    members = cfg.get("members")
    if members is None or members == []:
        return []
    if (not isinstance(members, list) or len(members) < 2 or len(set(members)) != len(members)
            or not all(isinstance(seed, int) and not isinstance(seed, bool) for seed in members)):
        raise BrainsegError(f"params.yaml: train.members {members!r} is not a list of two or more distinct integer "
                            "seeds; set it with `dvc exp run -S 'train.members=[42,7,1]'`, or null for one network")
    if cfg.get("seed") is not None:  # else a run of `-S train.seed=7` would silently train the members' seeds
        raise BrainsegError(f"params.yaml: train.seed {cfg['seed']} is set beside the seed ensemble train.members "
                            f"{members}, which trains one network per member seed and no other. Fix: "
                            f"`-S train.members=null` for one network of seed {cfg['seed']}, or list it in "
                            "train.members")
    if cfg.get("refit"):
        raise BrainsegError("params.yaml: train.members and train.refit are both on; a refit trains one network "
                            "again on the validation patients, so set `-S train.refit=false` for a seed ensemble "
                            "or `-S train.members=null` for a refit")
    return members


def training_seeds(params: dict) -> list[int]:
    """The seed of each network the train stage trains: a seed ensemble's members (train.members, or the chosen
    profile's), else the one network's, train.seed or the top-level seed where that is null."""
    cfg = train_config(params)
    return member_seeds(cfg) or [params["seed"] if cfg.get("seed") is None else cfg["seed"]]


@contextlib.contextmanager
def atomic_path(dest: Path | str, is_dir: bool = False):
    """Yield a temporary sibling of `dest`; rename it onto `dest` only if the block succeeds.

    A crash, a SIGKILL or a full disk mid-write therefore never leaves a half-written `dest`
    and never destroys the previous good one; the next successful write removes what a killed run left.
    One writer per `dest` at a time (as DVC runs stages).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    old = dest.with_name(f".{dest.name}.old")
    if is_dir:
        if old.exists() and not dest.exists():
            old.rename(dest)  # a run killed between the two renames below: put the last good output back
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
        tmp.chmod(0o755)  # mkdtemp's 0700 would make outputs private to their writer
    else:
        fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
        os.close(fd)
        tmp = Path(name)
        tmp.chmod(0o644)  # mkstemp's 0600 would make outputs private to their writer
    try:
        yield tmp
        if is_dir:
            if old.exists():
                shutil.rmtree(old)
            if dest.exists():
                dest.rename(old)
            tmp.rename(dest)
            if old.exists():
                shutil.rmtree(old)
        else:
            os.replace(tmp, dest)
    except BaseException as err:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise BrainsegError(f"{dest.parent.resolve()}: no space left on the device; the previous outputs there "
                                "are kept. Fix: free some disk space and run again") from err
        raise
    _remove_stale_temporaries(dest)


def _remove_stale_temporaries(dest: Path) -> None:
    # tempfile's names are the prefix, 8 random characters and the suffix: match exactly that, so the
    # temporaries of another output whose name starts with dest's (data vs data.csv) are left alone
    for stale in dest.parent.glob(f".{glob.escape(dest.name)}.{'?' * 8}.tmp"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


class NpyWriter:
    """A uint8 .npy file of known shape written front to back in chunks: plain sequential writes, no memory map
    (writing one page by page ran at a third of the speed here, and its flush waits for the disk) and no full
    copy in memory."""

    def __init__(self, path: Path, shape: tuple):
        self.file = open(path, "wb")
        np.lib.format.write_array_header_1_0(self.file, {"descr": "|u1", "fortran_order": False, "shape": shape})

    def write(self, array: np.ndarray) -> None:
        self.file.write(np.ascontiguousarray(array, np.uint8).data)

    def close(self) -> None:
        self.file.close()


def write_json(dest: Path | str, obj) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_csv(dest: Path | str, frame) -> None:
    with atomic_path(dest) as tmp:
        frame.to_csv(tmp, index=False, lineterminator="\n")


def run_main(main) -> None:
    """Run a stage's main(): a BrainsegError is printed as one clear line, not a traceback."""
    try:
        main()
    except BrainsegError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
