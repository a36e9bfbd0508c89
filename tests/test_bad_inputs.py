"""Bad input is refused or skipped with a message naming the file and the fix, never a bare traceback.

Each kind of bad data is tried through the index stage (on_bad fail: BrainsegError naming the file; on_bad
skip: the slice left out and the file listed in data/index_report.csv) and, for images, through
stages.images.decode_upload (the predict CLI and the web app). test_index.py covers a header-only truncated
TIFF, a mask without image, a 1-channel image, mask values 7 and a missing data.csv row; test_download.py
covers '..', absolute and symlink zip members, a zip bomb and too many members.
"""
import io
import os
import shutil
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import tifffile

from stages import download, index
from stages.common import BrainsegError
from stages.images import BadImage, decode_upload
from tests.conftest import ROOT, set_params

CASE = "TCGA_CS_7000_19950101"



def shown(path: Path) -> str:
    """A path as messages and the report show it: relative, bytes invalid in UTF-8 as \\xNN."""
    return os.fsencode(str(path)).decode("utf-8", "backslashreplace")


def image(case: Path, n: int, mask: bool = False) -> Path:
    return case / f"{case.name}_{n}{'_mask' if mask else ''}.tif"


def rgb(size=256) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)


# Each breaker damages the copy of case CASE and returns (the file to name, words of the problem, the slice
# numbers of CASE that must be left out when skipping: a set, or None when the whole case goes).

def zero_byte_image(case):
    image(case, 3).write_bytes(b"")
    return image(case, 3), "not a readable TIFF", {3}


def truncated_deflate_image(case):
    path = image(case, 3)  # compressed as in the dev archive, cut in the middle of the pixel data
    tifffile.imwrite(path, tifffile.imread(path), photometric="rgb", compression="zlib", predictor=True)
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
    return path, "not a readable TIFF", {3}


def png_named_tif(case):
    image(case, 3).write_bytes(cv2.imencode(".png", rgb())[1].tobytes())
    return image(case, 3), "not a readable TIFF", {3}


def uint16_image(case):
    tifffile.imwrite(image(case, 3), rgb().astype(np.uint16) * 200, photometric="rgb")
    return image(case, 3), "uint16 pixels, 8-bit (uint8) expected", {3}


def float_image(case):
    tifffile.imwrite(image(case, 3), rgb().astype(np.float32) / 255, photometric="rgb")
    return image(case, 3), "float32 pixels", {3}


def four_channel_image(case):
    tifffile.imwrite(image(case, 3), np.dstack([rgb(), rgb()[..., :1]]), photometric="rgb", extrasamples=[2])
    return image(case, 3), "4 channel(s), 3 expected", {3}


def image_of_another_size(case):
    tifffile.imwrite(image(case, 3), rgb(512), photometric="rgb")
    tifffile.imwrite(image(case, 3, mask=True), np.zeros((512, 512), np.uint8))
    return image(case, 3), "is 512x512, 256x256 expected", {3}


def rgb_mask(case):
    tifffile.imwrite(image(case, 3, mask=True), np.zeros((256, 256, 3), np.uint8), photometric="rgb")
    return image(case, 3, mask=True), "a 1-channel uint8 mask expected", {3}


def uint16_mask(case):
    tifffile.imwrite(image(case, 3, mask=True), np.zeros((256, 256), np.uint16))
    return image(case, 3, mask=True), "a 1-channel uint8 mask expected", {3}


def mask_of_another_size(case):
    tifffile.imwrite(image(case, 3, mask=True), np.zeros((128, 128), np.uint8))
    return image(case, 3, mask=True), "is 128x128, its image is 256x256", {3}


def mask_of_zeros_and_ones(case):
    path = image(case, 3, mask=True)
    mask = np.zeros((256, 256), np.uint8)
    mask[100:120, 100:120] = 1  # a 0/1 mask: the commonest export mistake
    tifffile.imwrite(path, mask)
    return path, "values [1], only 0 and 255 allowed", {3}


def image_without_mask(case):
    image(case, 3, mask=True).unlink()
    return image(case, 3), "image without mask", {3}


def duplicate_slice_number(case):
    path = case / f"{case.name}_07.tif"  # _7.tif and _07.tif are both slice 7: which is it?
    shutil.copy(image(case, 7), path)
    return image(case, 7), "duplicate slice number 7", {7}


def name_invalid_in_utf8(case):
    path = Path(os.fsdecode(os.fsencode(str(case)) + b"/\xff\xfe_scan.tif"))
    path.write_bytes(image(case, 1).read_bytes())
    return path, "file name does not follow", set()


def name_with_spaces(case):
    path = case / f"{case.name}_4 (copy).tif"
    shutil.copy(image(case, 4), path)
    return path, "file name does not follow", set()


def file_of_another_case(case):
    path = case / "TCGA_DU_7001_19950102_11.tif"
    shutil.copy(image(case, 4), path)
    return path, "inside its case folder", set()


def folder_not_in_kaggle_naming(case):
    renamed = case.with_name("TCGA_CS_7000")  # the date is missing
    case.rename(renamed)
    return renamed, "folder name is not a Kaggle case ID", None


def folder_with_spaces(case):
    copy = case.with_name(f"{case.name} (1)")
    shutil.copytree(case, copy)
    return copy, "folder name is not a Kaggle case ID", set()


def folder_invalid_in_utf8(case):
    path = Path(os.fsdecode(os.fsencode(str(case.parent)) + b"/TCGA_\xe9"))
    path.mkdir()
    return path, "folder name is not a Kaggle case ID", set()


def empty_patient_folder(case):
    path = case.with_name("TCGA_HT_9999_20000101")
    path.mkdir()
    return path, "empty patient folder", set()


def folder_named_like_a_slice(case):
    image(case, 11).mkdir()
    shutil.copy(image(case, 1, mask=True), image(case, 11, mask=True))
    return image(case, 11), "not a readable TIFF", set()


BREAKERS = [zero_byte_image, truncated_deflate_image, png_named_tif, uint16_image, float_image, four_channel_image,
            image_of_another_size, rgb_mask, uint16_mask, mask_of_another_size, mask_of_zeros_and_ones,
            image_without_mask, duplicate_slice_number, name_invalid_in_utf8, name_with_spaces, file_of_another_case,
            folder_not_in_kaggle_naming, folder_with_spaces, folder_invalid_in_utf8, empty_patient_folder,
            folder_named_like_a_slice]


@pytest.mark.parametrize("breaker", BREAKERS, ids=lambda f: f.__name__)
def test_bad_data_fails_naming_the_file_and_the_fix(raw, project, breaker):
    bad, words, _ = breaker(raw / CASE)
    with pytest.raises(BrainsegError) as err:
        index.main()
    message = str(err.value)
    assert shown(bad.relative_to(project)) in message and words in message
    assert "Fix" in message and "index.on_bad: skip" in message
    assert not (project / "data/index.csv").exists() and not (project / "data/slices").exists()


@pytest.mark.parametrize("breaker", BREAKERS, ids=lambda f: f.__name__)
def test_bad_data_skipped_is_reported_and_left_out(raw, project, breaker):
    set_params(project, **{"index.on_bad": "skip"})
    bad, words, dropped = breaker(raw / CASE)
    index.main()
    report = pd.read_csv(project / "data/index_report.csv")
    row = report[report["file"] == shown(bad.relative_to(project))]
    assert len(row) == 1 and words in row["problem"].iloc[0] and row["fix"].iloc[0]
    frame = pd.read_csv(project / "data/index.csv")
    kept = set(frame.loc[frame["patient"] == "TCGA_CS_7000", "slice"])
    assert kept == (set() if dropped is None else set(range(1, 11)) - dropped)
    assert len(frame) == len(np.load(project / "data/slices/images.npy", mmap_mode="r"))
    assert frame["image"].str.endswith(".tif").all() and frame["image"].is_unique


def test_the_cli_prints_one_error_line_and_exits_2(raw, project):
    truncated_deflate_image(raw / CASE)
    name_invalid_in_utf8(raw / CASE)
    run = subprocess.run([sys.executable, "-m", "stages.index"], cwd=project, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr and "[ERROR" not in run.stderr  # nor OpenCV's / libtiff's noise
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "2 bad file(s)" in errors[0]
    assert f"{CASE}_3.tif: is not a readable TIFF" in run.stderr and "\\xff\\xfe_scan.tif" in run.stderr


# data.csv: missing or unreadable is an error in either mode (it carries the clinical columns);
# rows that cannot be used are reported and left out, rows for patients without a folder are counted.

@pytest.mark.parametrize("content,words", [
    (None, "missing"),
    (b"", "not a readable CSV"),
    (b"\xff\xfe\x00garbage", "not a readable CSV"),
    (b"Patient,age\nTCGA_CS_7000,30\nTCGA_CS_7001,31,extra,fields\n", "Expected 2 fields in line 3"),
    (b"patient_id,age\nTCGA_CS_7000,30\n", "no 'Patient' column"),
])
def test_unusable_data_csv_is_an_error_even_when_skipping(raw, project, content, words):
    set_params(project, **{"index.on_bad": "skip"})
    csv = raw / "data.csv"
    csv.unlink() if content is None else csv.write_bytes(content)
    with pytest.raises(BrainsegError, match=words) as err:
        index.main()
    assert "data/raw/kaggle_3m/data.csv" in str(err.value) and "Fix" in str(err.value)


def test_malformed_and_repeated_data_csv_rows_are_reported_not_used(raw, project):
    csv = raw / "data.csv"
    lines = csv.read_text().splitlines()
    age = lines[1].split(",")
    age[-4] = "99"  # a second, different row for the first patient: the first one wins
    csv.write_text("\n".join(lines + [",".join(age), "not-a-patient,1", ",2", "TCGA_ZZ_123,3"]) + "\n")
    index.main()  # on_bad fail: data.csv rows are reported, they do not stop the stage
    report = pd.read_csv(project / "data/index_report.csv")
    assert set(report["file"]) == {"data/raw/kaggle_3m/data.csv"} and len(report) == 4
    assert report["problem"].str.contains("TCGA_CS_7000 has a second row").sum() == 1
    assert report["problem"].str.contains("no TCGA patient ID").sum() == 3
    frame = pd.read_csv(project / "data/index.csv")
    assert (frame.loc[frame["patient"] == "TCGA_CS_7000", "age_at_initial_pathologic"] == 30).all()


def test_data_csv_rows_of_patients_without_folders_are_counted_not_errors(raw, project):
    csv = raw / "data.csv"
    csv.write_text(csv.read_text() + "".join(f"TCGA_EZ_{8000 + i},1,1,1,1,1,1,1,1,2,1,3,2,1,40,3,2,0\n"
                                             for i in range(5)))
    index.main()
    counts = pd.read_json(project / "metrics/data.json", typ="series")
    assert counts["patients_in_csv_without_folder"] == 6 and counts["bad_files"] == 0


# The same kinds through decode_upload: what the predict CLI and the web app read.

def tiff(array, **kwargs) -> bytes:
    out = io.BytesIO()
    tifffile.imwrite(out, array, **kwargs)
    return out.getvalue()


def encoded(suffix, array) -> bytes:
    return cv2.imencode(suffix, array)[1].tobytes()


GOOD_TIFF = tiff(rgb(64), photometric="rgb")
GOOD_PNG = encoded(".png", rgb(64))
GOOD_JPEG = encoded(".jpg", rgb(64))


@pytest.mark.parametrize("name,data,words", [
    ("zero.tif", b"", "not a readable TIFF"),
    ("header.tif", GOOD_TIFF[:300], "not a readable TIFF"),
    ("half.tif", GOOD_TIFF[: len(GOOD_TIFF) // 2], "not a readable TIFF"),
    ("png_inside.tif", GOOD_PNG, "not a readable TIFF"),
    ("deep.tif", tiff(rgb(64).astype(np.uint16) * 200, photometric="rgb"), "uint16 pixels"),
    ("float.tif", tiff(rgb(64).astype(np.float32), photometric="rgb"), "float32 pixels"),
    ("grey.tif", tiff(rgb(64)[..., 0]), "1 channel(s), 3 expected"),
    ("rgba.tif", tiff(np.dstack([rgb(64), rgb(64)[..., :1]]), photometric="rgb", extrasamples=[2]),
     "4 channel(s), 3 expected"),
    ("zero.png", b"", "not a readable PNG or JPEG"),
    ("half.png", GOOD_PNG[: len(GOOD_PNG) // 2], "could not be decoded"),
    ("half.jpg", GOOD_JPEG[: len(GOOD_JPEG) // 2], "could not be decoded"),
    ("text.png", b"hello, not an image", "not a readable PNG or JPEG"),
    ("deep.png", encoded(".png", rgb(64).astype(np.uint16) * 200), "uint16 pixels"),
    ("grey.png", encoded(".png", rgb(64)[..., 0]), "1 channel(s), 3 expected"),
    ("rgba.png", encoded(".png", np.dstack([rgb(64), rgb(64)[..., :1]])), "4 channel(s), 3 expected"),
    ("grey.jpg", encoded(".jpg", rgb(64)[..., 0]), "1 channel(s), 3 expected"),
    ("slice.gif", GOOD_PNG, "has suffix '.gif'"),
    ("no_suffix", GOOD_TIFF, "has suffix ''"),
], ids=lambda v: v if isinstance(v, str) and len(v) < 20 else "")
def test_bad_upload_is_refused_naming_it(name, data, words):
    with pytest.raises(BadImage) as err:
        decode_upload(data, name)
    assert err.value.file == name and words in str(err.value) and "Fix: " in str(err.value)


@pytest.mark.parametrize("name", ["scan 1 (copy).TIF", "\udcff\udcfe slice.tif", "IRM cerveau é.png", "x.jpeg"])
def test_odd_upload_names_are_fine_when_the_image_is(name):
    data = {".tif": GOOD_TIFF, ".png": GOOD_PNG, ".jpeg": GOOD_JPEG}[Path(name).suffix.lower()]
    out = decode_upload(data, name)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8


# Decompression bombs: refused from the declared size, before a pixel is allocated. The check runs in a
# subprocess whose address space is capped at what it already uses plus 512 MiB, so an attempt to allocate the
# 30 GB these images declare would fail with MemoryError instead of the size message.

def tiff_bomb(path: Path, side=100_000) -> Path:
    tifffile.imwrite(path, np.zeros((8, 8, 3), np.uint8), photometric="rgb", compression="zlib")
    with tifffile.TiffFile(path, mode="r+b") as tif:  # a tiny file whose header declares side x side pixels
        for tag in ("ImageWidth", "ImageLength", "RowsPerStrip"):
            tif.pages[0].tags[tag].overwrite(side)
    return path


def png_bomb(side=100_000) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + chunk(b"IEND", b""))


def jpeg_bomb(side=65_000) -> bytes:
    data = bytearray(GOOD_JPEG)
    at = data.index(b"\xff\xc0")  # the frame header: precision, height, width
    data[at + 5:at + 9] = struct.pack(">HH", side, side)
    return bytes(data)


BOMB_CHECK = """
import resource, sys
from pathlib import Path
from stages import images, index
from stages.common import BrainsegError

vm = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (512 << 20), vm + (512 << 20)))
tries = {
    "read_image": lambda: images.read_image("bomb.tif"),
    "read_mask": lambda: images.read_mask("bomb.tif"),
    "upload_tiff": lambda: images.decode_upload(Path("bomb.tif").read_bytes(), "bomb.tif"),
    "upload_png": lambda: images.decode_upload(Path("bomb.png").read_bytes(), "bomb.png"),
    "upload_png_5000": lambda: images.decode_upload(Path("bomb5000.png").read_bytes(), "bomb5000.png"),
    "upload_jpeg": lambda: images.decode_upload(Path("bomb.jpg").read_bytes(), "bomb.jpg"),
    "index_stage": index.main,
}
for name, attempt in tries.items():
    try:
        attempt()
        print(name, "ACCEPTED")
    except BrainsegError as err:
        print(name, "REFUSED", str(err).replace(chr(10), " "))
"""


def test_decompression_bombs_refused_before_allocating(raw, project):
    tiff_bomb(project / "bomb.tif")
    shutil.copy(project / "bomb.tif", raw / CASE / f"{CASE}_5.tif")
    (project / "bomb.png").write_bytes(png_bomb())
    (project / "bomb5000.png").write_bytes(png_bomb(5000))
    (project / "bomb.jpg").write_bytes(jpeg_bomb())
    run = subprocess.run([sys.executable, "-c", BOMB_CHECK], cwd=project, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert run.returncode == 0, run.stderr
    results = dict(line.split(" ", 1) for line in run.stdout.splitlines())
    assert len(results) == 7 and all(r.startswith("REFUSED") for r in results.values()), run.stdout
    assert "MemoryError" not in run.stdout
    for name in ("read_image", "read_mask", "upload_tiff"):
        assert "bomb.tif: declares 100000x100000 pixels" in results[name]
    assert "bomb5000.png: declares 5000x5000 pixels" in results["upload_png_5000"]
    assert "bomb.png: is far bigger than" in results["upload_png"]
    assert "bomb.jpg: is far bigger than" in results["upload_jpeg"]
    assert f"{CASE}_5.tif: declares 100000x100000 pixels" in results["index_stage"]


# Hostile archives beyond test_download.py's: Windows-style escapes, a member lying about its size, the total
# expansion ceiling, members that clash. Each is refused and nothing lands outside the destination.

def zip_with(path: Path, *members) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("kaggle_3m/data.csv", "Patient\n")
        for name, data in members:
            zf.writestr(name, data)
    return path


def outside(tmp_path: Path) -> set:
    return {p.name for p in tmp_path.iterdir()}


@pytest.mark.parametrize("name,words", [
    ("kaggle_3m\\..\\..\\evil", "'..'"),
    ("C:/evil", "absolute"),
    ("\\evil", "absolute"),
])
def test_windows_style_escapes_refused(tmp_path, name, words):
    zip_with(tmp_path / "evil.zip", (name, b"x"))
    with pytest.raises(BrainsegError, match=words):
        download.extract_zip(tmp_path / "evil.zip", tmp_path / "out")
    assert outside(tmp_path) == {"evil.zip"}


def test_member_lying_about_its_size_is_refused(tmp_path):
    path = zip_with(tmp_path / "liar.zip", ("kaggle_3m/TCGA_CS_0000_20000101/big.tif", b"\0" * (1 << 20)))
    data = bytearray(path.read_bytes())
    central = data.rindex(b"kaggle_3m/TCGA_CS_0000_20000101/big.tif") - 46  # its central directory entry
    assert data[central:central + 4] == b"PK\x01\x02"
    data[central + 24:central + 28] = struct.pack("<I", 100)  # declares 100 bytes: no zip-bomb ratio to see
    path.write_bytes(data)
    assert zipfile.ZipFile(path).getinfo("kaggle_3m/TCGA_CS_0000_20000101/big.tif").file_size == 100
    with pytest.raises(BrainsegError, match="big.tif' cannot be extracted"):
        download.extract_zip(path, tmp_path / "out")
    assert max(p.stat().st_size for p in (tmp_path / "out").rglob("*") if p.is_file()) <= 100
    with pytest.raises(BrainsegError, match="big.tif' is damaged"):  # the download stage keeps zips whole
        download.keep_zip(path, tmp_path / "kept.zip")
    assert not (tmp_path / "kept.zip").exists()


def test_total_expansion_ceiling(tmp_path, monkeypatch):
    monkeypatch.setattr(download, "MAX_TOTAL_BYTES", 1 << 20)
    zip_with(tmp_path / "big.zip", *[(f"kaggle_3m/TCGA_CS_0000_20000101/{i}.tif", os.urandom(300_000))
                                     for i in range(4)])
    with pytest.raises(BrainsegError, match="would expand to 1 MiB"):
        download.extract_zip(tmp_path / "big.zip", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_clashing_members_refused(project, synthetic_root):
    zip_with(project / "clash.zip", ("kaggle_3m/TCGA_CS_0000_20000101", b"a file"),
             ("kaggle_3m/TCGA_CS_0000_20000101/x.tif", b"under a file"))
    set_params(project, **{"data.source": "archive", "data.archive": "clash.zip"})
    with pytest.raises(BrainsegError, match="TCGA_CS_0000_20000101' clashes"):
        download.main()
    assert outside(project / "data/raw") == set()
    with pytest.raises(BrainsegError, match="cannot be extracted"):
        download.extract_zip(project / "clash.zip", project / "out")
