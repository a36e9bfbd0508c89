import json
import zipfile

import numpy as np
import pandas as pd
import pytest
import tifffile

from stages import index
from stages.common import BrainsegError
from tests.conftest import set_params

CASE = "TCGA_CS_7000_19950101"



def test_pairs_every_slice_sorted_by_patient_and_number(synthetic_root):
    frame, problems = index.pair_slices(synthetic_root)
    assert problems == [] and len(frame) == 60
    first = frame[frame["case"] == CASE]
    assert first["slice"].tolist() == list(range(1, 11))  # numeric, not 1, 10, 2, ...
    assert first["institution"].iloc[0] == "CS" and first["patient"].iloc[0] == "TCGA_CS_7000"


def test_counts_and_data_csv_join(raw, project):
    index.main()
    counts = json.loads((project / "metrics/data.json").read_text())
    assert counts == {"bad_files": 0, "patients": 6, "patients_in_csv": 7, "patients_in_csv_without_folder": 1,
                      "slices": 60, "tumour_slices": counts["tumour_slices"], "tumour_fraction":
                      round(counts["tumour_slices"] / 60, 4), "source": "synthetic"}
    frame = pd.read_csv(project / "data/index.csv")
    assert frame["age_at_initial_pathologic"].notna().all()
    masks = np.load(project / "data/slices/masks.npy")
    assert masks.shape == (60, 256, 256) and set(np.unique(masks)) == {0, 1}
    assert (masks.reshape(60, -1).sum(1) == frame["area"]).all()
    assert (frame["tumour"] == (frame["area"] > 0)).all()


def test_slices_in_memory_equal_the_streamed_files(synthetic_root, tmp_path):
    frame, images, masks, problems, _ = index.build_index(synthetic_root, progress=False)
    _, file_images, file_masks, _, _ = index.build_index(synthetic_root, progress=False, out_dir=tmp_path)
    assert problems == [] and images.shape == (60, 256, 256, 3) and images.any()
    assert np.array_equal(np.load(tmp_path / "images.npy"), images) and np.array_equal(file_images, images)
    assert np.array_equal(np.load(tmp_path / "masks.npy"), masks) and np.array_equal(file_masks, masks)


def test_a_zip_is_read_in_place_with_the_same_pairs_problems_and_pixels_as_its_folder(raw, tmp_path):
    """Oddities a folder can hold, zipped: the zip reader lists, names and decodes them as the folder reader does."""
    (raw / CASE / ".DS_Store").write_bytes(b"hidden")
    (raw / CASE / "notes").mkdir()
    (raw / CASE / "notes" / "a.txt").write_text("a subfolder")
    (raw / CASE / f"{CASE}_4.tif").unlink()  # an orphan mask
    (raw / CASE / f"{CASE}_3.tif").write_bytes((raw / CASE / f"{CASE}_3.tif").read_bytes()[:500])  # truncated
    (raw / "TCGA_CS_7001_19950101").mkdir()  # an empty patient folder
    (raw / ".hidden_folder").mkdir()
    (raw / CASE / f"{CASE}_9.tif").unlink()
    (raw / CASE / f"{CASE}_9.tif").mkdir()  # a folder named like a slice
    (raw / CASE / f"{CASE}_9.tif" / "x").write_text("x")
    zipped = tmp_path / "kaggle_3m.zip"
    with zipfile.ZipFile(zipped, "w") as zf:
        for path in sorted(raw.rglob("*")):
            zf.write(path, "kaggle_3m/" + path.relative_to(raw).as_posix() + ("/" if path.is_dir() else ""))

    def relative(problems, root):
        return sorted((p["file"].removeprefix(str(root) + "/"), p["problem"]) for p in problems)

    results = {}
    for source in (raw, zipped):
        frame, images, masks, problems, counts = index.build_index(source, on_bad="skip", progress=False)
        results[source] = frame, images, masks, relative(problems, source), counts
    (frame, images, masks, problems, counts), again = results[raw], results[zipped]
    pd.testing.assert_frame_equal(frame, again[0])
    assert np.array_equal(images, again[1]) and np.array_equal(masks, again[2]) and counts == again[4]
    # notes, orphan, truncated, the folder named like a slice, empty folder: the same files, each once
    assert len(problems) == len(again[3]) == 5, (problems, again[3])
    assert [file for file, _ in problems] == [file for file, _ in again[3]]
    same_words = [(f, w) for f, w in problems if not f.endswith("_9.tif")]  # a folder: said each reader's way
    assert same_words == [(f, w) for f, w in again[3] if not f.endswith("_9.tif")]
    assert {file for file, _ in problems} == {f"{CASE}/notes", f"{CASE}/{CASE}_4_mask.tif", f"{CASE}/{CASE}_3.tif",
                                              f"{CASE}/{CASE}_9.tif", "TCGA_CS_7001_19950101"}


def break_truncated(raw):
    path = raw / CASE / f"{CASE}_3.tif"
    path.write_bytes(path.read_bytes()[:500])
    return path


def break_orphan_mask(raw):
    path = raw / CASE / f"{CASE}_4.tif"
    path.unlink()
    return raw / CASE / f"{CASE}_4_mask.tif"


def break_one_channel(raw):
    path = raw / CASE / f"{CASE}_5.tif"
    tifffile.imwrite(path, np.zeros((256, 256), np.uint8))
    return path


def break_mask_value(raw):
    path = raw / CASE / f"{CASE}_6_mask.tif"
    tifffile.imwrite(path, np.full((256, 256), 7, np.uint8))
    return path


@pytest.mark.parametrize("breaker,words", [
    (break_truncated, "not a readable TIFF"),
    (break_orphan_mask, "mask without image"),
    (break_one_channel, "1 channel(s), 3 expected"),
    (break_mask_value, "values [7]"),
])
def test_bad_file_fails_naming_it_and_keeps_earlier_outputs(raw, project, breaker, words):
    index.main()
    before = {p: p.read_bytes() for p in [project / "data/index.csv", project / "data/slices/images.npy",
                                          project / "metrics/data.json"]}
    bad = breaker(raw)
    with pytest.raises(BrainsegError) as err:
        index.main()
    assert str(bad.relative_to(project)) in str(err.value) and words in str(err.value) and "Fix" in str(err.value)
    assert all(p.read_bytes() == data for p, data in before.items())
    assert not list(project.glob("data/.*tmp")) and not list(project.glob("data/slices/.*"))


def test_skip_leaves_bad_pairs_out_and_reports_them(raw, project):
    set_params(project, **{"index.on_bad": "skip"})
    bad = [break_truncated(raw), break_orphan_mask(raw), break_mask_value(raw)]
    index.main()
    report = pd.read_csv(project / "data/index_report.csv")
    assert set(report["file"]) == {str(p.relative_to(project)) for p in bad}
    frame = pd.read_csv(project / "data/index.csv")
    assert len(frame) == 57 and not frame["slice"][frame["case"] == CASE].isin([3, 4, 6]).any()
    assert len(np.load(project / "data/slices/images.npy", mmap_mode="r")) == 57
    masks = np.load(project / "data/slices/masks.npy")  # the rewritten file's rows are the kept slices
    assert (masks.reshape(57, -1).sum(1) == frame["area"]).all() and set(np.unique(masks)) <= {0, 1}


def test_data_csv_problems(raw, project):
    csv = raw / "data.csv"
    lines = csv.read_text().splitlines()
    csv.write_text("\n".join([lines[0]] + lines[2:]) + "\nnot-a-patient,1\n")  # first patient's row missing
    set_params(project, **{"index.on_bad": "skip"})
    index.main()
    report = pd.read_csv(project / "data/index_report.csv")
    assert report["problem"].str.contains("no row for patient TCGA_CS_7000").any()
    csv.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(BrainsegError, match="data.csv"):
        index.main()


def test_missing_folder_says_which_stage_makes_it(project):
    with pytest.raises(BrainsegError, match="dvc repro download"):
        index.main()


def test_hidden_files_are_neither_slices_nor_errors(raw, project):
    (raw / CASE / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (raw / ".Trash").mkdir()
    index.main()
    assert len(pd.read_csv(project / "data/index.csv")) == 60
