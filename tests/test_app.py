"""The web app's logic with Streamlit's AppTest (no browser): model choice, uploads, bad uploads, download."""
import io

import cv2
import numpy as np
import pytest
import tifffile
from streamlit.testing.v1 import AppTest

from stages.common import ROOT, load_params
from stages.images import BadImage

APP = str(ROOT / "app" / "streamlit_app.py")
TIMEOUT = 120  # the first run imports TensorFlow and loads the model


def bright_model(path, size=64, name="bright"):
    """A stand-in segmenter (hand-set, no training, no data): tumour where FLAIR (the 2nd channel) is
    brighter than pre-contrast (the 1st), as glioma is. Its masks have a visible outline, so a screenshot
    shows the overlay working."""
    import keras

    inputs = keras.Input((size, size, 3))
    conv = keras.layers.Conv2D(1, 1, activation="sigmoid")
    model = keras.Model(inputs, conv(inputs), name=name)
    # sigmoid(40 * (FLAIR - pre-contrast - 0.15)): above 0.5 where FLAIR exceeds pre-contrast by 15% of full scale
    conv.set_weights([np.array([-40.0, 40.0, 0.0], np.float32).reshape(1, 1, 3, 1), np.array([-6.0], np.float32)])
    model.save(path)
    return path


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    bright_model(folder / "bright.keras")
    bright_model(folder / "other.keras", name="other")
    return folder


def flair_slice(size=96):
    """A slice with one bright FLAIR blob: the bright model finds a tumour there."""
    image = np.full((size, size, 3), 40, np.uint8)
    cv2.circle(image, (size // 2, size // 2), size // 6, (60, 250, 60), -1)
    return image


def tiff_bytes(image):
    buf = io.BytesIO()
    tifffile.imwrite(buf, image)
    return buf.getvalue()


def png_bytes(image):
    return cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))[1].tobytes()


def app(monkeypatch, folder):
    monkeypatch.setenv("BRAINSEG_MODELS_DIR", str(folder))
    return AppTest.from_file(APP, default_timeout=TIMEOUT).run()


# ------------------------------------------------------------------ pure functions

def test_process_upload_gives_overlay_verdict_and_mask(models_dir):
    from app.streamlit_app import process_upload, verdict
    from stages.inference import load_model

    image = flair_slice()
    result = process_upload(load_model(models_dir / "bright.keras"), tiff_bytes(image), "s.tif",
                            load_params("evaluate"))
    assert result["tumour"] and result["probability"] > 0.9 and 0 < result["area"] < 96 * 96
    assert result["overlay"].shape == image.shape and (result["overlay"] != image).any()
    mask = tifffile.imread(io.BytesIO(result["mask_tiff"]))
    assert mask.shape == (96, 96) and set(np.unique(mask)) == {0, 255} and (mask == 255).sum() == result["area"]
    assert result["mask_name"] == "s_mask.tif"
    assert verdict(result).startswith("Tumour present")


def test_kaggle_slices_are_grouped_by_patient_in_slice_order():
    from app.streamlit_app import volumes

    square, wide = np.zeros((8, 8, 3), np.uint8), np.zeros((8, 12, 3), np.uint8)
    uploads = [("TCGA_CS_4941_19960909_12.tif", square), ("own.png", square),
               ("TCGA_CS_4941_19960909_3.tif", square), ("TCGA_DU_5849_19950405_1.tif", square),
               ("TCGA_CS_4941_19960909_7.tif", square), ("TCGA_CS_4941_19960909_8.tif", wide),
               ("TCGA_CS_4941_19960909_2_mask.tif", square), ("other.png", square)]
    # a mask-named file and a differently sized slice are not part of the volume
    assert volumes(uploads) == [[2, 4, 0], [1], [3], [5], [6], [7]]


def test_a_volume_normalised_model_sees_the_patients_uploads_together():
    """The app standardises a patient's uploaded slices together, as evaluation and the CLI do: one slice
    alone would be scaled by its own statistics, not its volume's."""
    from app.streamlit_app import segment_uploads
    from stages.inference import predict_probs
    from stages.models import build_model

    import keras

    # fixed weights: an unseeded 4-filter network can come out with a dead last layer, whose highest probability
    # is 0.5 on every slice, alone or not, which would prove nothing either way
    keras.utils.set_random_seed(0)
    model = build_model("unet", (32, 32, 3), 4, input_norm="volume")
    rng = np.random.default_rng(0)
    slices = rng.integers(0, 250, (3, 32, 32, 3), dtype=np.uint8)
    slices[2] //= 4  # a dim end slice: alone, standardisation would brighten it
    names = [f"TCGA_CS_4941_19960909_{n}.tif" for n in (3, 1, 2)]
    params = {**load_params("evaluate"), "threshold": 0.5, "largest_3d": False, "min_component": 0,
              "tta_flip": False, "engine": "keras"}
    results = segment_uploads(model, list(zip(names, slices)), params)
    volume = predict_probs(model, slices[[1, 2, 0]], engine="keras")  # the volume in slice order
    assert [r["name"] for r in results] == names and all(r["volume_slices"] == 3 for r in results)
    assert np.allclose([r["probability"] for r in results], volume[[2, 0, 1]].max(axis=(1, 2)), atol=1e-6)
    alone = predict_probs(model, slices[2:], engine="keras")
    assert not np.isclose(results[0]["probability"], alone.max(), atol=1e-4)


def test_a_slice_position_model_places_a_patients_uploads_in_slice_order_and_a_lone_upload_in_the_middle():
    from app.streamlit_app import segment_uploads
    from stages.inference import predict_probs
    from stages.models import build_model

    model = build_model("unet", (32, 32, 3), 4, input_norm="volume", slice_position=True)
    slices = np.random.default_rng(1).integers(0, 250, (4, 32, 32, 3), dtype=np.uint8)
    names = [f"TCGA_CS_4941_19960909_{n}.tif" for n in (3, 1, 2)] + ["own.png"]
    params = {**load_params("evaluate"), "threshold": 0.5, "largest_3d": False, "min_component": 0,
              "tta_flip": False, "engine": "keras"}
    results = segment_uploads(model, list(zip(names, slices)), params)
    volume = predict_probs(model, slices[[1, 2, 0]], engine="keras")  # positions 0, 0.5, 1 in slice order
    assert np.allclose([r["probability"] for r in results[:3]], volume[[2, 0, 1]].max(axis=(1, 2)), atol=1e-6)
    assert [r["lone_note"] for r in results] == ["", "", "", "unet also uses where the slice lies "
                                                 "(train.slice_position), so a lone slice is taken to lie in the "
                                                 "middle of the head"]
    assert np.isclose(results[3]["probability"], predict_probs(model, slices[3:], engine="keras").max(), atol=1e-6)


@pytest.mark.parametrize("name,data,reason", [
    ("x.png", b"<html>not an image</html>", "readable"),
    ("x.pdf", b"%PDF-1.4", "suffix"),
    ("x.tif", tiff_bytes(np.zeros((32, 32), np.uint8)), "channel"),
    ("x.tif", tiff_bytes(np.zeros((32, 32, 3), np.uint16)), "uint16"),
    ("x.png", cv2.imencode(".png", np.zeros((4100, 4100), np.uint8))[1].tobytes(), "pixels"),
    ("x.png", b"\0" * (11 << 20), "MiB"),
], ids=["not-image", "suffix", "one-channel", "16-bit", "bomb", "too-big"])
def test_process_upload_refuses_bad_files(name, data, reason):
    from app.streamlit_app import process_upload

    with pytest.raises(BadImage, match=reason):
        process_upload(None, data, name, load_params("evaluate"))


def test_find_models(tmp_path, models_dir):
    from app.streamlit_app import find_models

    assert [p.name for p in find_models(models_dir)] == ["bright.keras", "other.keras"]
    assert find_models(tmp_path / "missing") == []


# ------------------------------------------------------------------ the page

def test_no_models_says_how_to_train(monkeypatch, tmp_path):
    at = app(monkeypatch, tmp_path)
    assert not at.exception
    assert "dvc repro" in at.warning[0].value
    assert len(at.file_uploader) == 0


def test_page_lists_models_and_waits_for_an_upload(monkeypatch, models_dir):
    at = app(monkeypatch, models_dir)
    assert not at.exception
    assert at.sidebar.selectbox[0].options == ["bright.keras", "other.keras"]
    assert "Upload" in at.info[0].value
    at.sidebar.selectbox[0].set_value(models_dir / "other.keras").run()
    assert not at.exception and "other" in at.sidebar.caption[0].value


def test_upload_shows_verdict_then_survives_a_bad_file(monkeypatch, models_dir):
    at = app(monkeypatch, models_dir)
    good = ("blob.png", png_bytes(flair_slice()), "image/png")
    at.file_uploader[0].set_value([good]).run()
    assert not at.exception
    assert at.error[0].value.startswith("Tumour present")
    assert len(at.get("image")) == 2  # input and overlay
    assert at.get("download_button")
    # a bad file next to a good one: a message for it, the good one still shown, no traceback
    at.file_uploader[0].set_value([("broken.tif", b"II*\0garbage", "image/tiff"), good]).run()
    assert not at.exception
    messages = [e.value for e in at.error]
    assert messages[0].startswith("Skipped broken.tif") and messages[1].startswith("Tumour present")
    assert at.subheader[0].value == "blob.png"


def test_empty_slice_says_no_tumour(monkeypatch, models_dir):
    at = app(monkeypatch, models_dir)
    at.file_uploader[0].upload("dark.png", png_bytes(np.full((64, 64, 3), 30, np.uint8)), "image/png").run()
    assert not at.exception
    assert at.success[0].value.startswith("No tumour found")
