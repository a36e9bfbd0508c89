"""Faults: a download failing halfway, a damaged archive, a stage killed mid-write, a full disk, a corrupt model,
and DVC around them. Afterwards the last good outputs are byte-identical, no half-written file is taken as
good, and the next run recovers (cleaning up what the failed one left)."""
import errno
import os
import shutil
import signal
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import yaml

from stages import balance, download, index, split
from stages.common import BrainsegError, atomic_path
from tests.conftest import ROOT, set_params

TINY = {"data.source": "synthetic", "data.synthetic.patients": 5, "data.synthetic.slices": 4}


def snapshot(project: Path) -> dict:
    """Every file under data/ and metrics/ (temporaries included, so a leftover shows), by path."""
    return {str(p.relative_to(project)): p.read_bytes()
            for folder in ("data", "metrics") for p in sorted((project / folder).rglob("*")) if p.is_file()}


def leftovers(project: Path) -> list:
    return [p for p in (project / "data").rglob(".*") if p.name.endswith((".tmp", ".old"))]


@pytest.fixture
def good(project):
    """A project whose tiny synthetic pipeline ran once: the last good outputs."""
    set_params(project, **TINY)
    for stage in (download, index, split, balance):
        stage.main()
    return snapshot(project)


def kaggle_zip(path: Path, root: Path, damage=None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for file in sorted(root.rglob("*")):
            zf.write(file, "kaggle_3m/" + file.relative_to(root).as_posix())
    if damage == "truncated":  # a download cut off in the middle
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "flipped":  # bytes damaged in the middle of one member's data
        data = bytearray(path.read_bytes())
        tiffs = [info for info in zipfile.ZipFile(path).infolist() if info.filename.endswith(".tif")]
        info = tiffs[len(tiffs) // 2]
        start = info.header_offset + 30 + len(info.filename) + 100
        data[start:start + 64] = bytes(255 - b for b in data[start:start + 64])
        path.write_bytes(data)
    return path


# Downloads

def test_kaggle_download_failing_halfway_keeps_the_last_good_data(good, project, synthetic_root, monkeypatch):
    import kagglehub

    cache = project.parent / "kagglehub-cache"

    def half_then_reset(handle):
        part = cache / "kaggle_3m" / "TCGA_CS_7000_19950101"
        part.mkdir(parents=True)
        (part / "TCGA_CS_7000_19950101_1.tif").write_bytes(b"II*\0 half a file")
        raise ConnectionResetError("Connection reset by peer")

    monkeypatch.setattr(kagglehub, "dataset_download", half_then_reset)
    set_params(project, **{"data.source": "kaggle"})
    with pytest.raises(BrainsegError, match="ConnectionResetError.*data.source=archive"):
        download.main()
    assert snapshot(project) == good and not leftovers(project)
    monkeypatch.setattr(kagglehub, "dataset_download", lambda handle: str(synthetic_root.parent))
    download.main()  # the next try, with the network back
    assert (project / "data/raw/kaggle_3m/data.csv").read_bytes() == (synthetic_root / "data.csv").read_bytes()
    assert not leftovers(project)


@pytest.mark.parametrize("damage,words", [("truncated", "not a readable zip"), ("flipped", "is damaged")])
def test_damaged_archive_keeps_the_last_good_data(good, project, damage, words):
    archive = project.parent / "archive.zip"
    kaggle_zip(archive, project / "data/raw/kaggle_3m", damage)
    set_params(project, **{"data.source": "archive", "data.archive": str(archive)})
    with pytest.raises(BrainsegError, match=words) as err:
        download.main()
    assert "archive.zip" in str(err.value) and "download the archive again" in str(err.value)
    assert snapshot(project) == good and not leftovers(project)
    kaggle_zip(archive, project / "data/raw/kaggle_3m")
    download.main()  # the zip is now the data; the folder of the earlier source goes
    assert sorted(p.name for p in (project / "data/raw").iterdir()) == ["SOURCE.json", "kaggle_3m.zip"]
    assert not leftovers(project)


def test_download_interrupted_before_its_record_is_caught_by_index(good, project):
    (project / "data/raw/SOURCE.json").unlink()
    with pytest.raises(BrainsegError, match=r"SOURCE.json: missing.*dvc repro download"):
        index.main()


# A stage killed (SIGKILL) while it writes its arrays: the writer both stages stream their arrays through (index:
# every decoded slice; balance: the augmented copies) is made to hang after its third write; the parent kills the
# process there.

KILLABLE = """
import time
from stages.common import run_main
from stages import {stage}
real_write, chunks = {stage}.NpyWriter.write, []

def write_then_hang(self, array):
    real_write(self, array)
    chunks.append(1)
    if len(chunks) == 3:
        print("writing", self.file.name, flush=True)
        time.sleep(120)

{stage}.NpyWriter.write = write_then_hang
run_main({stage}.main)
"""


@pytest.mark.parametrize("stage,temp", [("index", "data/.slices.*.tmp"), ("balance", "data/.prepared.*.tmp")],
                         ids=["index", "balance"])
def test_stage_killed_mid_write_keeps_the_last_good_outputs_and_recovers(good, project, stage, temp):
    child = subprocess.Popen([sys.executable, "-c", KILLABLE.format(stage=stage)], cwd=project, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    watchdog = threading.Timer(60, child.kill)  # never hang the suite if the stage dies before writing
    watchdog.start()
    try:
        line = child.stdout.readline()
        assert line.startswith("writing"), child.stderr.read()
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait() == -signal.SIGKILL
    finally:
        watchdog.cancel()
        child.stdout.close()
        child.stderr.close()
    stale = list(project.glob(temp))
    assert len(stale) == 1 and any(f.stat().st_size for f in stale[0].iterdir())  # a half-written file, there
    assert {k: v for k, v in snapshot(project).items() if "/." not in k} == good  # the outputs: untouched
    {"index": index, "balance": balance}[stage].main()  # the next run recovers ...
    assert snapshot(project) == good and not leftovers(project)  # ... with the same bytes, and cleans up


def test_killed_between_the_two_renames_the_last_good_folder_comes_back(tmp_path):
    dest = tmp_path / "prepared"
    (tmp_path / ".prepared.old").mkdir()  # killed after moving the old folder aside, before the new one took its place
    (tmp_path / ".prepared.old" / "train.csv").write_text("good")
    with pytest.raises(RuntimeError), atomic_path(dest, is_dir=True):
        raise RuntimeError("this run fails too")
    assert (dest / "train.csv").read_text() == "good"
    with atomic_path(dest, is_dir=True) as tmp:
        (tmp / "train.csv").write_text("new")
    assert (dest / "train.csv").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]


def test_stale_temporaries_of_other_outputs_are_left_alone(tmp_path):
    (tmp_path / ".data.csv.abcd1234.tmp").write_text("another output's")
    (tmp_path / ".data.zz99yy88.tmp").write_text("stale")
    with atomic_path(tmp_path / "data") as tmp:
        tmp.write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".data.csv.abcd1234.tmp", "data"]


# A full disk: the write that hits it raises OSError(ENOSPC) after writing part of its file.

def fill_disk(monkeypatch, owner, name, when=lambda path: True):
    real = getattr(owner, name)

    def full(*args, **kwargs):
        path = next(a for a in args if isinstance(a, (str, Path)))
        if not when(Path(path)):
            return real(*args, **kwargs)
        Path(path).write_bytes(b"\x93NUMPY half a file")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(owner, name, full)


@pytest.mark.parametrize("stage,owner,name,when", [
    (index, index.NpyWriter, "__init__", lambda path: True),               # the first write: the arrays
    (index, pd.DataFrame, "to_csv", lambda path: ".index.csv." in path.name),  # the last: index.csv
    (balance, balance.NpyWriter, "__init__", lambda path: "_masks" in path.name),  # halfway: copies' masks
], ids=["index-arrays", "index-csv", "balance-arrays"])
def test_full_disk_keeps_the_last_good_outputs_whole(good, project, stage, owner, name, when):
    shutil.rmtree(project / "data/raw/kaggle_3m/TCGA_HT_7004_19950105")  # new input: new outputs would differ
    before = {k: v for k, v in snapshot(project).items() if not k.startswith("data/raw/")}
    with pytest.MonkeyPatch.context() as mp:
        fill_disk(mp, owner, name, when)
        with pytest.raises(BrainsegError, match="no space left on the device.*Fix: free some disk space"):
            stage.main()
    assert {k: v for k, v in snapshot(project).items() if not k.startswith("data/raw/")} == before
    assert not leftovers(project)
    for later in (index, split, balance):  # space freed: the next run goes through
        later.main()
    assert len(pd.read_csv(project / "data/index.csv")) == 16 and not leftovers(project)


# A corrupt or hostile cached model: refused naming the file (stages.inference.load_model, safe mode).
# tests/test_inference.py covers a garbage file, a zip of garbage and a Lambda layer.

@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    keras = pytest.importorskip("keras")
    path = tmp_path_factory.mktemp("model") / "model.keras"
    inputs = keras.Input((8, 8, 3))
    keras.Model(inputs, keras.layers.Conv2D(1, 1, activation="sigmoid")(inputs), name="unet").save(path)
    return path


def rewrite_members(src: Path, dest: Path, change) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w") as zout:
        for name in zin.namelist():
            zout.writestr(name, change(name, zin.read(name)))


def truncated_file(src, dest):
    dest.write_bytes(src.read_bytes()[: src.stat().st_size // 2])


def empty_file(src, dest):
    dest.write_bytes(b"")


def truncated_weights(src, dest):
    rewrite_members(src, dest, lambda name, data: data[: len(data) // 2] if name.endswith(".h5") else data)


def foreign_class(src, dest):
    """config.json edited to build a layer from an arbitrary module's callable."""
    def change(name, data):
        return data.replace(b'"module": "keras.layers", "class_name": "Conv2D"',
                            b'"module": "os", "class_name": "system"') if name == "config.json" else data
    rewrite_members(src, dest, change)


@pytest.mark.parametrize("corrupt", [truncated_file, empty_file, truncated_weights, foreign_class],
                         ids=lambda f: f.__name__)
def test_corrupt_cached_model_is_refused_naming_the_file(saved_model, tmp_path, corrupt):
    from stages.inference import load_model

    dest = tmp_path / "models" / "model.keras"
    dest.parent.mkdir()
    corrupt(saved_model, dest)
    if corrupt is foreign_class:
        assert b'"module": "os"' in zipfile.ZipFile(dest).read("config.json")
    with pytest.raises(BrainsegError, match=str(dest)) as err:
        load_model(dest)
    assert "dvc repro" in str(err.value)
    assert load_model(saved_model).name == "unet"  # the good file still loads


# DVC around it: a second `dvc repro` runs nothing; a failed stage leaves the earlier outputs and the lock as
# they were; once the input is fixed `dvc repro` recovers.

def dvc(repo: Path, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1"}
    env.pop("PYTHONPATH", None)
    return subprocess.run([str(Path(sys.executable).parent / "dvc"), *args], cwd=repo, env=env, text=True,
                          capture_output=True, timeout=180)


def test_dvc_repro_is_idempotent_and_recovers_after_a_failed_stage(tmp_path):
    if not (Path(sys.executable).parent / "dvc").exists() or not shutil.which("git"):
        pytest.skip("dvc (requirements.txt) and git are needed")
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "stages", repo / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", repo)
    (repo / ".dvc").mkdir()
    shutil.copy(ROOT / ".dvc/config", repo / ".dvc")
    (repo / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    set_params(repo, **TINY)
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)

    first = dvc(repo, "repro", "balance")
    assert first.returncode == 0, first.stdout + first.stderr
    good = snapshot(repo)
    lock = (repo / "dvc.lock").read_text()
    again = dvc(repo, "repro", "balance")
    assert again.returncode == 0 and "Data and pipelines are up to date" in again.stdout
    assert "Running stage" not in again.stdout and snapshot(repo) == good

    good_raw, bad_copy = tmp_path / "good/kaggle_3m", tmp_path / "bad/kaggle_3m"
    shutil.copytree(repo / "data/raw/kaggle_3m", good_raw)
    shutil.copytree(good_raw, bad_copy)
    bad = bad_copy / "TCGA_CS_7000_19950101/TCGA_CS_7000_19950101_2.tif"
    bad.write_bytes(bad.read_bytes()[:400])
    kaggle_zip(repo / "incoming.zip", bad_copy)
    set_params(repo, **{"data.source": "archive", "data.archive": "incoming.zip"})
    failed = dvc(repo, "repro", "balance")
    assert failed.returncode != 0 and "Traceback" not in failed.stderr
    assert "error: 1 bad file(s)" in failed.stderr
    # named where it is: inside the kept zip
    assert "data/raw/kaggle_3m.zip/TCGA_CS_7000_19950101/TCGA_CS_7000_19950101_2.tif: is not a readable TIFF" \
        in failed.stderr
    after = snapshot(repo)
    for name in good:
        if not name.startswith(("data/raw/", "metrics/data.json")):
            assert after[name] == good[name], name  # index, split and balance outputs: as they were
    locked = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert locked["index"] == yaml.safe_load(lock)["stages"]["index"]  # DVC did not take the failed run as good
    assert not leftovers(repo)

    kaggle_zip(repo / "fixed.zip", good_raw)  # a good archive (the same slices as the synthetic run)
    set_params(repo, **{"data.archive": "fixed.zip"})
    fixed = dvc(repo, "repro", "balance")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    recovered = snapshot(repo)
    for name in ("data/index.csv", "data/slices/images.npy", "data/split.csv", "data/prepared/train.csv",
                 "data/prepared/train_copies_images.npy"):
        assert recovered[name] == good[name], name
    last = dvc(repo, "repro", "balance")
    assert last.returncode == 0 and "Data and pipelines are up to date" in last.stdout
