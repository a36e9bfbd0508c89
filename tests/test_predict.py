"""The predict CLI: outputs, skipped inputs and exit codes on made-up slices; on the dev archive, that its
masks are exactly stages.inference.segment's (the call evaluation scores)."""
import io
import subprocess
import sys
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import tifffile

from stages.common import ROOT, BrainsegError, load_params
from stages.images import read_image
from stages.predict import (EXIT_OK, EXIT_SKIPPED, batches, collect_inputs, kaggle_slice, main, mask_tiff,
                            output_names, overlay)

EVALUATE = load_params("evaluate")


def tiny_segmenter(path, size=64, seed=0):
    """An untrained tiny U-Net saved at `path`: its near-0.5 probabilities make many borderline pixels,
    which is what a mask-equality test wants."""
    import keras

    from stages.models import build_model

    keras.utils.set_random_seed(seed)
    build_model("unet", (size, size, 3), filters=4).save(path)
    return path


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return tiny_segmenter(tmp_path_factory.mktemp("model") / "tiny.keras")


def slice_image(seed, height=256, width=256):
    """A made-up 3-channel slice: a bright disc (the 'brain') on black, plus noise."""
    rng = np.random.default_rng(seed)
    image = np.zeros((height, width, 3), np.uint8)
    cv2.circle(image, (width // 2, height // 2), min(height, width) // 3, (120, 160, 110), -1)
    return np.clip(image + rng.integers(0, 40, image.shape), 0, 255).astype(np.uint8)


def write_png(path, rgb):
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return path


# ------------------------------------------------------------------ pure functions

def test_overlay_outlines_the_mask_in_red_and_leaves_the_rest():
    image = np.full((64, 64, 3), 90, np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[20:40, 10:30] = 255
    out = overlay(image, mask)
    assert out.dtype == np.uint8 and out.shape == image.shape
    red = np.all(out == (255, 0, 0), axis=-1)
    assert red[20, 10:30].all() and red[39, 10:30].all() and red[20:40, 10].all()
    assert not red[25:35, 15:25].any() and not red[:15].any()
    assert (image == 90).all(), "the input must not be drawn on"
    assert (overlay(image, np.zeros((64, 64), bool)) == image).all()


def test_mask_tiff_is_kaggle_style_binary():
    mask = np.zeros((30, 40), bool)
    mask[5:9, 5:9] = True
    back = tifffile.imread(io.BytesIO(mask_tiff(mask)))
    assert back.dtype == np.uint8 and back.shape == (30, 40)
    assert set(np.unique(back)) == {0, 255} and (back == 255).sum() == 16


def test_kaggle_names():
    assert kaggle_slice("TCGA_CS_4941_19960909_12.tif") == ("TCGA_CS_4941", 12)
    assert kaggle_slice("TCGA_CS_4941_19960909_12_mask.tif") is None
    assert kaggle_slice("scan.png") is None


def test_collect_inputs_expands_folders_ignores_masks_and_orders_patients(tmp_path):
    case = tmp_path / "in" / "TCGA_CS_4941_19960909"
    case.mkdir(parents=True)
    for n in (10, 2):
        write_png(case / f"TCGA_CS_4941_19960909_{n}.tif", slice_image(n))  # content irrelevant here
        (case / f"TCGA_CS_4941_19960909_{n}_mask.tif").write_bytes(b"")
    (case / "notes.csv").write_text("x\n")
    loose = write_png(tmp_path / "a.png", slice_image(0))
    slices, skipped, masks = collect_inputs([str(tmp_path / "in"), str(loose), str(tmp_path / "nope.tif")],
                                            tmp_path / "work")
    assert [(s.patient, s.number) for s in slices] == [("TCGA_CS_4941", 2), ("TCGA_CS_4941", 10), (None, None)]
    assert masks == 2
    assert skipped == [{"file": str(tmp_path / "nope.tif"), "reason": "no such file or folder"}]


def test_a_zip_that_is_not_kaggle_layout_is_skipped_with_the_reason(tmp_path):
    with zipfile.ZipFile(tmp_path / "photos.zip", "w") as zf:
        zf.writestr("a.png", b"x")
    slices, skipped, _ = collect_inputs([str(tmp_path / "photos.zip")], tmp_path / "work")
    assert slices == [] and "kaggle_3m/data.csv" in skipped[0]["reason"]


def test_batches_keep_a_patient_together_and_cut_the_rest():
    from stages.predict import Slice
    items = [Slice(f"p{i}", None, "P", i) for i in range(5)] + [Slice(f"x{i}", None) for i in range(5)]
    assert [len(b) for b in batches(items, 2)] == [5, 2, 2, 1]


def test_output_names_are_unique():
    from stages.predict import Slice
    items = [Slice("a/x.png", Path("a/x.png")), Slice("b/x.png", Path("b/x.png")), Slice("x.jpg", Path("x.jpg"))]
    assert list(output_names(items).values()) == ["x", "x_2", "x_3"]


# ------------------------------------------------------------------ the CLI

def test_cli_writes_masks_overlays_csv_and_skips_bad_inputs(tmp_path, model_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    write_png(src / "scan.png", slice_image(1, 200, 240))  # not 256 px: masks come back at the input's size
    tifffile.imwrite(src / "TCGA_HT_7602_19951103_3.tif", slice_image(2))
    tifffile.imwrite(src / "TCGA_HT_7602_19951103_4.tif", slice_image(3))
    cv2.imwrite(str(src / "photo.jpg"), slice_image(4), [cv2.IMWRITE_JPEG_QUALITY, 95])
    (src / "notes.png").write_text("not an image")
    tifffile.imwrite(src / "grey.tif", np.zeros((64, 64), np.uint8))
    tifffile.imwrite(src / "deep.tif", np.zeros((64, 64, 3), np.uint16))
    cv2.imwrite(str(src / "huge.png"), np.zeros((4100, 4100), np.uint8))
    out = tmp_path / "out"

    code = main([str(src), "--model", str(model_path), "--out", str(out), "--no-progress"])

    assert code == EXIT_SKIPPED
    pred = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    assert sorted(pred["file"]) == sorted(f"{src}/{n}" for n in (
        "scan.png", "TCGA_HT_7602_19951103_3.tif", "TCGA_HT_7602_19951103_4.tif", "photo.jpg"))
    assert set(pred["model"]) == {"unet"}
    assert pred["max_probability"].between(0, 1).all()
    for row in pred.itertuples():
        mask = tifffile.imread(out / row.mask)
        source = read_image(src / row.file.split("/")[-1], shape=None) if row.file.endswith(".tif") else \
            cv2.imread(str(src / row.file.split("/")[-1]))
        assert mask.shape == source.shape[:2] and mask.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 255} and (mask == 255).sum() == row.area
        assert cv2.imread(str(out / row.overlay)).shape == source.shape
    skipped = pd.read_csv(out / "skipped.csv").set_index("file")["reason"]
    assert sorted(skipped.index) == sorted(f"{src}/{n}" for n in ("notes.png", "grey.tif", "deep.tif", "huge.png"))
    assert "channel" in skipped[f"{src}/grey.tif"] and "uint16" in skipped[f"{src}/deep.tif"]
    assert "pixels" in skipped[f"{src}/huge.png"] and "readable" in skipped[f"{src}/notes.png"]
    patients = pd.read_csv(out / "patients.csv")
    assert patients["patient"].tolist() == ["TCGA_HT_7602"] and patients["slices"].tolist() == [2]
    assert "skipped" in capsys.readouterr().err
    assert not list(out.rglob("*.tmp")), "atomic writes leave no temporary files"


def test_patients_or_the_pipelines_split_choose_whose_slices_are_segmented(tmp_path, model_path, capsys,
                                                                           monkeypatch):
    from stages import predict

    src = tmp_path / "in"
    for case, n in (("TCGA_HT_7602_19951103", 3), ("TCGA_HT_7602_19951103", 4), ("TCGA_CS_4941_19960909", 7)):
        (src / case).mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(src / case / f"{case}_{n}.tif", slice_image(n))
    write_png(src / "scan.png", slice_image(1))  # no Kaggle name: no patient to choose it by

    def predicted(*args):
        out = tmp_path / "out"
        assert main([str(src), "--model", str(model_path), "--out", str(out), "--no-progress", *args]) == EXIT_OK
        return sorted(pd.read_csv(out / "predictions.csv", keep_default_na=False)["file"].str.split("/").str[-1])

    assert predicted("--patients", "TCGA_HT_7602_19951103", "TCGA_DU_0000") == [
        "TCGA_HT_7602_19951103_3.tif", "TCGA_HT_7602_19951103_4.tif"]  # a case ID names its patient
    err = capsys.readouterr().err
    assert "2 slice(s) of other patients or without a Kaggle name left out" in err and "TCGA_DU_0000" in err

    split = tmp_path / "split.csv"
    monkeypatch.setattr(predict, "SPLIT", split)
    with pytest.raises(BrainsegError, match="split.csv: missing; run `dvc repro split`"):
        main([str(src), "--model", str(model_path), "--out", str(tmp_path / "o"), "--split", "test"])
    split.write_text("patient,fold\nTCGA_CS_4941,1\n")
    with pytest.raises(BrainsegError, match="split.csv: not the split stage's table"):
        main([str(src), "--model", str(model_path), "--out", str(tmp_path / "o"), "--split", "test"])
    pd.DataFrame({"patient": ["TCGA_HT_7602", "TCGA_CS_4941"], "split": ["train", "test"]}).to_csv(split, index=False)
    assert predicted("--split", "test") == ["TCGA_CS_4941_19960909_7.tif"]
    with pytest.raises(BrainsegError, match="none of the chosen patients' slices"):
        main([str(src), "--model", str(model_path), "--out", str(tmp_path / "o"), "--patients", "TCGA_DU_0000"])


def test_cli_all_good_exits_0(tmp_path, model_path):
    write_png(tmp_path / "a.png", slice_image(5, 64, 64))
    assert main([str(tmp_path / "a.png"), "--model", str(model_path), "--out", str(tmp_path / "o"),
                 "--no-progress"]) == EXIT_OK


def test_cli_serves_a_seed_ensemble_as_the_mean_of_its_members(tmp_path):
    from stages.inference import load_model
    from stages.models import average

    write_png(tmp_path / "a.png", slice_image(5, 64, 64))
    paths = [tiny_segmenter(tmp_path / f"m{seed}.keras", seed=seed) for seed in (1, 2)]
    average([load_model(path) for path in paths]).save(tmp_path / "ensemble.keras")
    peaks = []
    for model in (*paths, tmp_path / "ensemble.keras"):
        out = tmp_path / f"out-{model.stem}"
        assert main([str(tmp_path / "a.png"), "--model", str(model), "--out", str(out), "--no-progress"]) == EXIT_OK
        row = pd.read_csv(out / "predictions.csv").iloc[0]
        assert row["model"] == "unet"
        peaks.append(row["max_probability"])
    # a mean of the two maps: its peak is no higher than the higher member's, and is neither member's own
    assert peaks[2] <= max(peaks[:2]) and peaks[2] not in peaks[:2]


def test_cli_with_a_classifier_writes_verdicts_only(tmp_path):
    import keras

    from stages.models import build_model

    keras.utils.set_random_seed(0)
    build_model("cnn", (64, 64, 3), filters=4).save(tmp_path / "cnn.keras")
    write_png(tmp_path / "a.png", slice_image(6, 64, 64))
    assert main([str(tmp_path / "a.png"), "--model", str(tmp_path / "cnn.keras"), "--out", str(tmp_path / "o"),
                 "--no-progress"]) == EXIT_OK
    row = pd.read_csv(tmp_path / "o" / "predictions.csv", keep_default_na=False).iloc[0]
    assert row["model"] == "cnn" and row["area"] == "" and row["mask"] == "" and 0 <= row["max_probability"] <= 1
    assert not (tmp_path / "o" / "masks").exists()


def test_missing_model_names_the_dvc_command(tmp_path):
    write_png(tmp_path / "a.png", slice_image(5, 64, 64))
    with pytest.raises(BrainsegError, match="dvc repro"):
        main([str(tmp_path / "a.png"), "--model", str(tmp_path / "none.keras"), "--out", str(tmp_path / "o")])
    # the module entry point turns it into one line and exit code 2
    proc = subprocess.run([sys.executable, "-m", "stages.predict", str(tmp_path / "a.png"), "--model",
                           str(tmp_path / "none.keras"), "--out", str(tmp_path / "o")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "dvc repro" in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------------ real data: one implementation

def dev_patients_zip(dev_zip, dest, patients=2):
    """A Kaggle-layout zip holding the first `patients` patient folders of the dev archive (and data.csv)."""
    with zipfile.ZipFile(dev_zip) as src:
        names = src.namelist()
        cases = sorted({n.split("/")[1] for n in names if n.count("/") == 2 and n.endswith(".tif")})[:patients]
        keep = [n for n in names if n == "kaggle_3m/data.csv" or
                (n.endswith(".tif") and n.split("/")[1] in cases)]
        with zipfile.ZipFile(dest, "w") as out:
            for name in keep:
                out.writestr(name, src.read(name))
    return dest


@pytest.mark.parametrize("post", [{}, {"largest_3d": True, "min_component": 5, "tta_flip": True},
                                  {"largest_3d": True, "min_component": 5, "tta_flip": True, "tta_affine": True}],
                         ids=["params.yaml", "flip-chain", "all-postprocessing"])
def test_cli_masks_equal_evaluation_masks_on_dev_slices(dev_zip, tmp_path, model_path, post):
    """Two patients of the dev archive through the CLI (as a zip) and through evaluation's own path."""
    from stages.evaluate import _patient_rows
    from stages.index import build_index
    from stages.inference import average_views, load_model, predict_probs, segment, test_time_views, view_probs
    from stages.postprocess import postprocess
    from stages.predict import run

    params = {**EVALUATE, **post}
    archive = dev_patients_zip(dev_zip, tmp_path / "two.zip")
    out = tmp_path / "out"
    assert run([str(archive)], model_path, out, params, progress=False) == EXIT_OK

    # the slices as evaluation gets them: stages.index's reader, in patient then slice order
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(tmp_path / "x")
    index, images, _, _, _ = build_index(tmp_path / "x" / "kaggle_3m", progress=False)
    model = load_model(model_path)
    # the inference contract's one call, all slices in one stack
    masks, _ = segment(model, images, params, patients=index["patient"].to_numpy())
    # evaluate_model's loop: a patient at a time, the plain prediction, then the other test-time views, averaged
    # as it does, then postprocess
    scored = np.zeros_like(masks)
    engine = params.get("engine", "auto")  # as evaluate_model passes it
    tta = (bool(params["tta_flip"]), bool(params.get("tta_affine")))
    views = test_time_views(*tta)
    for patient, rows in _patient_rows(index):
        plain = predict_probs(model, images[rows], params["batch_size"], engine=engine)
        predicted = [plain, *view_probs(model, images[rows], views[1:], params["batch_size"], engine=engine)]
        scored[rows] = postprocess(average_views(predicted, views, [tta])[tta], params, [patient] * len(rows))
    assert np.array_equal(masks, scored)

    pred = pd.read_csv(out / "predictions.csv").set_index("file")
    assert len(pred) == len(index) > 20
    for row, mask in zip(index.itertuples(), masks):
        file = f"{archive}/{row.case}/{Path(row.image).name}"
        cli = tifffile.imread(out / pred.loc[file, "mask"])
        assert np.array_equal(cli, np.where(mask, 255, 0).astype(np.uint8)), file
        assert pred.loc[file, "area"] == mask.sum()
        assert pred.loc[file, "tumour"] == (mask.sum() >= params["detection_min_area"])  # evaluation's rule
    assert 0 < pred["area"].sum() < pred.shape[0] * 256 * 256, "a trivial all-or-nothing mask proves nothing"


def test_cli_says_when_a_slice_position_model_gets_slices_it_cannot_place(tmp_path, capsys):
    import keras

    from stages.models import build_model

    keras.utils.set_random_seed(0)
    path = tmp_path / "positioned.keras"
    build_model("unet", (64, 64, 3), filters=4, input_norm="volume", slice_position=True).save(path)
    src = tmp_path / "in"
    src.mkdir()
    for n in (1, 2):
        tifffile.imwrite(src / f"TCGA_HT_7602_19951103_{n}.tif", slice_image(n))
    assert main([str(src), "--model", str(path), "--out", str(tmp_path / "a"), "--no-progress"]) == EXIT_OK
    assert "middle of the head" not in capsys.readouterr().err  # a patient's volume: every slice placed
    write_png(src / "scan.png", slice_image(3))
    assert main([str(src), "--model", str(path), "--out", str(tmp_path / "b"), "--no-progress"]) == EXIT_OK
    assert "1 slice(s) without a Kaggle name were taken alone: unet also uses where the slice lies" in \
        capsys.readouterr().err


def test_min_position_applies_only_to_a_whole_kaggle_volume(monkeypatch):
    import stages.inference
    from stages.predict import analyse, whole_volume

    assert whole_volume(list(range(1, 21))) and whole_volume(range(1, 89))
    assert not whole_volume(list(range(1, 20)))         # fewer slices than any Kaggle volume: a part of one
    assert not whole_volume(list(range(5, 25)))         # the lowest slices are not there
    assert not whole_volume([1, 2, 4, *range(5, 23)])   # a gap
    assert not whole_volume(None)
    seen = []

    def segment(model, images, params, patients=None):
        seen.append(params["min_position"])
        return np.zeros(images.shape[:3], bool), np.zeros(images.shape[:3], np.float32)

    monkeypatch.setattr(stages.inference, "segment", segment)
    images = np.zeros((20, 8, 8, 3), np.uint8)
    params = {**EVALUATE, "min_position": 0.2}
    analyse(None, images, params, ["P"] * 20, list(range(1, 21)))
    analyse(None, images, params, ["P"] * 20, list(range(3, 23)))
    analyse(None, images, params, ["P"] * 20)
    assert seen == [0.2, 0, 0]
