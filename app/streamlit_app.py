"""brainseg web app: upload MRI slices, see the predicted tumour outline, download the mask.

    streamlit run app/streamlit_app.py --server.headless true --server.maxUploadSize 10

Models are the *.keras files in models/ (or in $BRAINSEG_MODELS_DIR). Segmentation is the predict CLI's
(stages.predict.analyse -> stages.inference.segment with params.yaml's `evaluate` section), decoding is
stages.images.decode_upload, which refuses non-images, 16-bit or 1-channel slices and decompression bombs.
Uploads named as Kaggle's slices (TCGA_<inst>_<patient>_<date>_<slice>.tif) are segmented a patient at a time,
as the CLI does: a model trained with `train.input_norm: volume` then standardises them together, and
largest_3d sees the patient's volume, a model trained with `train.slice_position` learns where each slice lies, and
one trained with `train.neighbours` sees the slices around each one.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `streamlit run` puts only app/ on sys.path; the stages live one up
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import streamlit as st  # noqa: E402

from stages.common import BrainsegError, load_params  # noqa: E402
from stages.images import UPLOAD_SUFFIXES, BadImage, decode_upload  # noqa: E402
from stages.postprocess import serving_settings  # noqa: E402
from stages.predict import analyse, kaggle_slice, mask_tiff, overlay  # noqa: E402

MAX_UPLOAD_MB = 10  # a 256x256 slice is 200 KB; the server-wide cap is server.maxUploadSize (.streamlit/config.toml)
MODELS_ENV = "BRAINSEG_MODELS_DIR"


def models_dir() -> Path:
    return Path(os.environ.get(MODELS_ENV) or ROOT / "models")


def find_models(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.keras")) if folder.is_dir() else []


@st.cache_resource(max_entries=4, show_spinner="Loading the model…")
def cached_model(path: str, mtime: float):
    """One load per model file version (`mtime` makes a retrained model load again)."""
    from stages.inference import load_model

    return load_model(path)


def decode(data: bytes, name: str):
    """One uploaded file -> uint8 (H,W,3) RGB; a BadImage (BrainsegError) for anything unusable."""
    if len(data) > MAX_UPLOAD_MB << 20:
        raise BadImage(name, f"is {len(data) >> 20} MiB, more than {MAX_UPLOAD_MB} MiB", "upload one MRI slice")
    return decode_upload(data, name)


def volumes(named_images: list[tuple[str, object]]) -> list[list[int]]:
    """Indices of the uploads to segment together: a Kaggle patient's same-sized slices in slice order (its
    volume), every other upload alone. Groups come in the order of their first upload."""
    groups: dict[object, list[tuple[int, int]]] = {}
    for index, (name, image) in enumerate(named_images):
        kaggle = kaggle_slice(Path(name).name)
        key = (kaggle[0], image.shape) if kaggle else index
        groups.setdefault(key, []).append((kaggle[1] if kaggle else 0, index))
    return [[index for _, index in sorted(group)] for group in groups.values()]


def segment_uploads(model, named_images: list[tuple[str, object]], params_evaluate: dict) -> list[dict]:
    """Decoded uploads [(name, image)] -> what the page shows for each, in upload order."""
    from stages.inference import lone_slice_note

    results: list[dict | None] = [None] * len(named_images)
    note = lone_slice_note(model)
    for group in volumes(named_images):
        images = np.stack([named_images[i][1] for i in group])
        patient = kaggle_slice(Path(named_images[group[0]][0]).name)
        patients = [patient[0] if patient else named_images[group[0]][0]] * len(group)
        numbers = [kaggle_slice(Path(named_images[i][0]).name)[1] for i in group] if patient else None
        for i, result in zip(group, analyse(model, images, params_evaluate, patients, numbers)):
            results[i] = page_result(named_images[i][0], named_images[i][1], result, len(group), note)
    return results


def page_result(name: str, image, result: dict, volume_slices: int = 1, lone_note: str = "") -> dict:
    segmented = result["mask"] is not None  # a classifier model gives a verdict only
    return {"name": name, "image": image, "overlay": overlay(image, result["mask"]) if segmented else None,
            "tumour": result["tumour"], "probability": result["max_probability"], "area": result["area"],
            "mask_tiff": mask_tiff(result["mask"]) if segmented else None,
            "mask_name": f"{Path(name).stem}_mask.tif", "volume_slices": volume_slices,
            "lone_note": lone_note if volume_slices == 1 else ""}


def process_upload(model, data: bytes, name: str, params_evaluate: dict) -> dict:
    """One uploaded file, through the page's own path -> what the page shows; a BadImage for anything unusable."""
    return segment_uploads(model, [(name, decode(data, name))], params_evaluate)[0]


def verdict(result: dict) -> str:
    area = "" if result["area"] is None else f", area {result['area']} pixels"
    if result["tumour"]:
        return f"Tumour present: probability {result['probability']:.2f}{area}"
    return f"No tumour found: highest probability {result['probability']:.2f}{area}"


def show_result(result: dict, index: int) -> None:
    st.subheader(result["name"])
    left, right = st.columns(2)
    left.image(result["image"], caption="Input slice", width=320)
    if result["overlay"] is not None:
        right.image(result["overlay"], caption="Predicted tumour (red outline)", width=320)
    if result["volume_slices"] > 1:
        st.caption(f"Segmented together with the {result['volume_slices']} uploaded slices of its patient")
    if result["lone_note"]:
        st.caption(f"Segmented alone: {result['lone_note']}. Upload all of a patient's slices with their Kaggle "
                   "names to give each one its volume")
    (st.error if result["tumour"] else st.success)(verdict(result))
    if result["mask_tiff"] is not None:
        st.download_button("Download mask (TIFF, 0/255)", result["mask_tiff"], file_name=result["mask_name"],
                           mime="image/tiff", key=f"download-{index}", on_click="ignore")


def choose_model():
    """Sidebar model picker -> a loaded model, or None (with a message) when there is none to use."""
    folder = models_dir()
    paths = find_models(folder)
    if not paths:
        st.warning(f"No trained model (*.keras) in {folder}. Train one with `dvc repro`, "
                   f"or point {MODELS_ENV} at a folder of models.")
        return None
    path = st.sidebar.selectbox("Model", paths, format_func=lambda p: p.name)
    try:
        model = cached_model(str(path), path.stat().st_mtime)
    except BrainsegError as err:
        st.error(str(err))
        return None
    st.sidebar.caption(f"{model.name}: input {model.input_shape[1]}x{model.input_shape[2]} px")
    return model


def main() -> None:
    st.set_page_config(page_title="brainseg: glioma segmentation", layout="wide")
    st.title("Lower-grade glioma segmentation")
    st.caption("Upload FLAIR MRI slices (3-channel, 8-bit, as in the Kaggle LGG data set). Slices with Kaggle's "
               "names (TCGA_<inst>_<patient>_<date>_<slice>.tif) are segmented a patient at a time: upload a "
               "patient's whole volume for the intensity standardisation the model was trained with. "
               "For research only, not for diagnosis.")
    model = choose_model()
    if model is None:
        return
    params = serving_settings(load_params("evaluate"))
    uploads = st.file_uploader("MRI slices (TIFF, PNG, JPEG)", type=[s.lstrip(".") for s in UPLOAD_SUFFIXES],
                               accept_multiple_files=True, max_upload_size=MAX_UPLOAD_MB)
    if not uploads:
        st.info("Upload one or more slices to see the predicted tumour outline.")
        return
    decoded = []
    for upload in uploads:
        try:
            decoded.append((upload.name, decode(upload.getvalue(), upload.name)))
        except BrainsegError as err:
            st.error(f"Skipped {err}")
        except Exception as err:  # the page must survive any bad file: say what failed, keep the others
            st.error(f"Skipped {upload.name}: it could not be processed ({type(err).__name__}: {err})")
    if not decoded:
        return
    try:
        results = segment_uploads(model, decoded, params)
    except Exception as err:  # a model that cannot take these slices: say so instead of a traceback
        st.error(f"The slices could not be segmented ({type(err).__name__}: {err})")
        return
    for index, result in enumerate(results):
        show_result(result, index)


if __name__ == "__main__":  # `streamlit run` (and AppTest) run the script as __main__; tests import it
    main()
