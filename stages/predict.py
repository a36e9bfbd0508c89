"""Predict tumour masks for new MRI slices: `python -m stages.predict INPUT... --model PATH --out DIR`.

INPUT is any mix of .tif/.tiff/.png/.jpg slices, folders of them (searched recursively) and Kaggle-layout
zips; `--patients ID...` or `--split test` (the pipeline's data/split.csv) keeps the slices of those patients
alone. For each slice DIR gets masks/<name>.tif (0/255, the input's size), overlays/<name>.png (the slice with
the tumour outlined in red) and a row of predictions.csv; patients.csv sums up the slices whose names follow
Kaggle's convention (TCGA_<inst>_<patient>_<date>_<slice>.tif). Kaggle's own *_mask.tif files are ignored.

Segmentation is stages.inference.segment with params.yaml's `evaluate` section, the very call evaluation
scores, so a slice gets the same mask here as in metrics/. Slices that cannot be used are listed with the
reason (DIR/skipped.csv) and the run goes on. Exit code: 0 all predicted, 3 some inputs skipped, 2 fatal.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import tifffile
from tqdm import tqdm

from stages.common import BrainsegError, atomic_path, load_params, run_main, write_csv
from stages.images import UPLOAD_SUFFIXES, BadImage, decode_upload
from stages.index import FILE_RE
from stages.postprocess import serving_settings

DEFAULT_MODEL = Path("models/model.keras")
SPLIT = Path("data") / "split.csv"  # what the split stage writes (stages.split imports scikit-learn, slow to load)
EXIT_OK, EXIT_FATAL, EXIT_SKIPPED = 0, 2, 3
MAX_FILE_BYTES = 64 << 20  # far above any MRI slice; refused before it is read into memory
OUTLINE_RGB = (255, 0, 0)
PREDICTION_COLUMNS = ["file", "tumour", "area", "max_probability", "model", "patient", "slice", "mask", "overlay"]
PATIENT_COLUMNS = ["patient", "slices", "tumour_slices", "tumour_area", "max_probability", "first_tumour_slice",
                   "last_tumour_slice", "model"]


@dataclass
class Slice:
    """One input slice: `file` is how reports name it, `path` where its bytes are."""
    file: str
    path: Path
    patient: str | None = None
    number: int | None = None


# ---------------------------------------------------------------- drawing and encoding (shared with the app)

def overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """uint8 RGB slice (H,W,3) + mask (H,W; bool or 0/255) -> a copy with the tumour outlined in red."""
    out = np.ascontiguousarray(image, dtype=np.uint8).copy()
    binary = (np.asarray(mask) > 0).astype(np.uint8)
    contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    # one pixel on Kaggle's 256 px slices, proportionally thicker on bigger images so it stays visible
    thickness = max(1, round(max(out.shape[:2]) / 256))
    cv2.drawContours(out, contours, -1, OUTLINE_RGB, thickness)
    return out


def mask_tiff(mask: np.ndarray) -> bytes:
    """A mask as Kaggle stores them: 1-channel uint8 TIFF, 0 background and 255 tumour."""
    buf = io.BytesIO()
    tifffile.imwrite(buf, np.where(np.asarray(mask) > 0, 255, 0).astype(np.uint8), photometric="minisblack")
    return buf.getvalue()


def png(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise BrainsegError("PNG encoding failed")
    return buf.tobytes()


def write_bytes(dest: Path, data: bytes) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)


# ---------------------------------------------------------------- prediction (shared with the app)

MIN_VOLUME_SLICES = 20  # the fewest slices of any Kaggle volume


def whole_volume(numbers) -> bool:
    """Whether Kaggle slice numbers (in order) are a whole volume: 1, 2, ..., n with n >= MIN_VOLUME_SLICES."""
    return numbers is not None and len(numbers) >= MIN_VOLUME_SLICES and list(numbers) == list(
        range(1, len(numbers) + 1))


def analyse(model, images: np.ndarray, params_evaluate: dict, patients=None, numbers=None) -> list[dict]:
    """Segment same-sized uint8 slices (N,H,W,3) -> per slice: mask (uint8 0/255), tumour, area, max_probability.

    `patients` (one id per slice) keeps evaluate.largest_3d from joining slices of different patients.
    `numbers`: the slices' Kaggle numbers; evaluate.min_position, which places each slice in its patient's
    volume, applies only where they are a whole volume (whole_volume): a few uploaded slices of a patient would
    otherwise lose their lowest ones.
    A classifier model gives no mask: mask and area are None, tumour is its probability above the threshold.
    """
    from stages.inference import segment  # TensorFlow loads only when a prediction is made
    from stages.postprocess import tumour_present

    if params_evaluate.get("min_position") and not whole_volume(numbers):
        params_evaluate = {**params_evaluate, "min_position": 0}
    masks, probs = segment(model, images, params_evaluate, patients=patients)
    masks, probs = np.asarray(masks), np.asarray(probs)
    if masks.ndim == 1:
        return [{"mask": None, "area": None, "tumour": bool(m), "max_probability": float(p)}
                for m, p in zip(masks, probs)]
    present = tumour_present(masks, params_evaluate)  # evaluation's detection rule, the same function
    return [{"mask": np.where(mask, 255, 0).astype(np.uint8), "area": int(np.count_nonzero(mask)),
             "tumour": bool(tumour), "max_probability": float(prob.max())}
            for mask, tumour, prob in zip(masks, present, probs)]


# ---------------------------------------------------------------- inputs

def kaggle_slice(name: str) -> tuple[str, int] | None:
    """TCGA_CS_4941_19960909_12.tif -> ('TCGA_CS_4941', 12); None for other names."""
    match = FILE_RE.match(name)
    if not match or match.group(3):
        return None
    return "_".join(match.group(1).split("_")[:3]), int(match.group(2))


def is_kaggle_mask(path: Path) -> bool:
    return path.stem.lower().endswith("_mask")


def make_slice(file: str, path: Path) -> Slice:
    kaggle = kaggle_slice(path.name)
    return Slice(file, path, *(kaggle or (None, None)))


def collect_inputs(inputs: list[str], workdir: Path) -> tuple[list[Slice], list[dict], int]:
    """Command-line inputs -> (slices in patient/slice then name order, skipped [{file, reason}], masks ignored).

    Zips are unpacked (safely, by stages.download) below `workdir`; folders are searched recursively.
    """
    from stages.download import materialise

    slices, skipped, masks = [], [], 0

    def add_folder(folder: Path, label: str) -> None:
        nonlocal masks
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            if path.suffix.lower() not in UPLOAD_SUFFIXES:
                continue  # data.csv, README.md and the like beside the slices
            if is_kaggle_mask(path):
                masks += 1
                continue
            slices.append(make_slice(f"{label}/{path.relative_to(folder).as_posix()}", path))

    for i, arg in enumerate(inputs):
        path = Path(arg)
        if path.is_dir():
            add_folder(path, arg.rstrip("/\\") or arg)
        elif path.is_file() and path.suffix.lower() == ".zip":
            try:
                root = materialise(path, workdir / f"zip{i}")
            except BrainsegError as err:
                skipped.append({"file": arg, "reason": str(err)})
                continue
            add_folder(root, arg)
        elif path.is_file():
            if is_kaggle_mask(path):
                masks += 1
            else:
                slices.append(make_slice(arg, path))
        else:
            skipped.append({"file": arg, "reason": "no such file or folder"})
    # a patient's slices in order, so largest_3d sees the same volume evaluation does
    slices.sort(key=lambda s: (s.patient is None, s.patient or "", s.number or 0, s.file))
    return slices, skipped, masks


def patient_id(name: str) -> str:
    """A Kaggle patient as predictions.csv names it: TCGA_CS_4941, also from its case ID TCGA_CS_4941_19960909."""
    return "_".join(name.strip().split("_")[:3])


def split_patients(split: str, path: Path | None = None) -> list[str]:
    """The patients the pipeline's split stage put in `split` (train, val or test), from `path` (default SPLIT)."""
    path = SPLIT if path is None else path
    try:
        table = pd.read_csv(path)
        patients = table.loc[table["split"] == split, "patient"].tolist()
    except FileNotFoundError:
        raise BrainsegError(f"{path}: missing; run `dvc repro split` to make the pipeline's split (or name the "
                            "patients with --patients)") from None
    except (ValueError, KeyError) as err:  # pandas' parser and empty-file errors are ValueErrors
        raise BrainsegError(f"{path}: not the split stage's table ({type(err).__name__}: {err}); run "
                            "`dvc repro split`") from None
    if not patients:
        raise BrainsegError(f"{path}: no patient in split '{split}'; run `dvc repro split`")
    return patients


def select_patients(slices: list[Slice], patients) -> tuple[list[Slice], int, list[str]]:
    """The slices of `patients` (Kaggle patient or case IDs) -> (those slices, how many others were left out,
    the patients none of the inputs had)."""
    wanted = {patient_id(p) for p in patients}
    kept = [item for item in slices if item.patient in wanted]
    return kept, len(slices) - len(kept), sorted(wanted - {item.patient for item in kept})


def read_slice(item: Slice) -> np.ndarray:
    """The same decoder as the web app's uploads (size, depth and channel checks before decoding)."""
    size = item.path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise BadImage(item.file, f"is {size >> 20} MiB, more than {MAX_FILE_BYTES >> 20} MiB",
                       "use a single MRI slice")
    return decode_upload(item.path.read_bytes(), item.path.name)


def batches(slices: list[Slice], batch_size: int):
    """A Kaggle patient's slices together (its volume, for largest_3d), other slices batch_size at a time."""
    group: list[Slice] = []
    for item in slices:
        if group and (item.patient != group[-1].patient or (item.patient is None and len(group) >= batch_size)):
            yield group
            group = []
        group.append(item)
    if group:
        yield group


def output_names(slices: list[Slice]) -> dict[str, str]:
    """A unique output stem per input; a second a.png (another folder, or a.jpg) becomes a_2."""
    names, used = {}, set()
    for item in slices:
        stem, n = item.path.stem, 1
        while (stem if n == 1 else f"{stem}_{n}") in used:
            n += 1
        name = stem if n == 1 else f"{stem}_{n}"
        used.add(name)
        names[item.file] = name
    return names


# ---------------------------------------------------------------- the run

def predict_slices(model, slices: list[Slice], out: Path, params_evaluate: dict,
                   progress: bool = True) -> tuple[list[dict], list[dict]]:
    """Segment every slice, writing masks/ and overlays/ under `out` -> (prediction rows, skipped)."""
    names = output_names(slices)
    rows, skipped = [], []
    bar = tqdm(total=len(slices), desc="predict", unit="slice", disable=not progress, file=sys.stderr)
    for group in batches(slices, int(params_evaluate.get("batch_size", 32))):
        decoded = []
        for item in group:
            try:
                decoded.append((item, read_slice(item)))
            except BadImage as err:
                skipped.append({"file": item.file, "reason": f"{err.reason}. Fix: {err.fix}"})
                bar.update(1)
        # segment() takes one array, so slices of different sizes go in separate calls
        by_shape: dict[tuple, list] = {}
        for item, image in decoded:
            by_shape.setdefault(image.shape, []).append((item, image))
        for members in by_shape.values():
            images = np.stack([image for _, image in members])
            patients = [item.patient or item.file for item, _ in members]
            numbers = [item.number for item, _ in members] if all(item.patient for item, _ in members) else None
            for (item, image), result in zip(members, analyse(model, images, params_evaluate, patients, numbers)):
                name, files = names[item.file], {"mask": "", "overlay": ""}
                if result["mask"] is not None:  # a classifier says only whether there is a tumour
                    files = {"mask": f"masks/{name}.tif", "overlay": f"overlays/{name}.png"}
                    write_bytes(out / files["mask"], mask_tiff(result["mask"]))
                    write_bytes(out / files["overlay"], png(overlay(image, result["mask"])))
                rows.append({"file": item.file, "tumour": int(result["tumour"]),
                             "area": "" if result["area"] is None else result["area"],
                             "max_probability": round(result["max_probability"], 6), "model": model.name,
                             "patient": item.patient or "", "slice": "" if item.number is None else item.number,
                             **files})
                bar.update(1)
    bar.close()
    return rows, skipped


def patient_summary(predictions: pd.DataFrame) -> pd.DataFrame:
    """One row per Kaggle patient: slices, tumour slices, total tumour area, highest probability."""
    kaggle = predictions[predictions["patient"].astype(str) != ""]
    rows = []
    for patient, group in kaggle.groupby("patient", sort=True):
        tumour = group[group["tumour"] == 1]
        areas = pd.to_numeric(group["area"], errors="coerce")  # empty for a classifier
        rows.append({"patient": patient, "slices": len(group), "tumour_slices": len(tumour),
                     "tumour_area": int(areas.sum()) if areas.notna().any() else "",
                     "max_probability": float(group["max_probability"].max()),
                     "first_tumour_slice": int(tumour["slice"].min()) if len(tumour) else "",
                     "last_tumour_slice": int(tumour["slice"].max()) if len(tumour) else "",
                     "model": group["model"].iloc[0]})
    return pd.DataFrame(rows, columns=PATIENT_COLUMNS)


def run(inputs: list[str], model_path: Path | str, out: Path | str, params_evaluate: dict,
        progress: bool = True, patients=None) -> int:
    """The whole CLI minus argument parsing -> exit code (0 all predicted, 3 some skipped). `patients`: Kaggle
    patient (or case) IDs whose slices alone are segmented; None: every slice."""
    out, model_path = Path(out), Path(model_path)
    if not model_path.is_file():  # said before TensorFlow's slow import, not after
        raise BrainsegError(f"{model_path}: no trained model there; run `dvc repro` to train it "
                            "(or pass --model PATH)")
    from stages.inference import load_model

    model = load_model(model_path)
    with tempfile.TemporaryDirectory(prefix="brainseg-predict-") as work:
        slices, skipped, masks = collect_inputs(inputs, Path(work))
        if not slices and not skipped:
            raise BrainsegError(f"no slices found in {' '.join(inputs)}. Fix: pass .tif/.tiff/.png/.jpg slices, "
                                "folders of them or a Kaggle-layout zip")
        if patients is not None:
            slices, left_out, absent = select_patients(slices, patients)
            if absent:
                print(f"no slices of {len(absent)} of the chosen patients among the inputs: {' '.join(absent)}",
                      file=sys.stderr)
            if not slices:
                raise BrainsegError(f"none of the chosen patients' slices are in {' '.join(inputs)}. Fix: pass the "
                                    "folder or zip that holds them, named as Kaggle names them")
            print(f"{left_out} slice(s) of other patients or without a Kaggle name left out", file=sys.stderr)
        rows, bad = predict_slices(model, slices, out, params_evaluate, progress)
    skipped += bad
    predictions = pd.DataFrame(rows, columns=PREDICTION_COLUMNS)
    write_csv(out / "predictions.csv", predictions)
    summary = patient_summary(predictions)
    if len(summary):
        write_csv(out / "patients.csv", summary)
        print(summary.drop(columns="model").to_string(index=False))
    write_csv(out / "skipped.csv", pd.DataFrame(skipped, columns=["file", "reason"]))
    note = f" ({masks} Kaggle *_mask files ignored)" if masks else ""
    print(f"{len(rows)} slices predicted with {model.name}, {int(predictions['tumour'].sum())} with tumour; "
          f"results in {out}{note}")
    from stages.inference import lone_slice_note

    lone = int((predictions["patient"].astype(str) == "").sum())
    if lone and lone_slice_note(model):
        print(f"{lone} slice(s) without a Kaggle name were taken alone: {lone_slice_note(model)}. Pass a patient's "
              "slices with their Kaggle names to give each one its volume", file=sys.stderr)
    for item in skipped:
        print(f"skipped {item['file']}: {item['reason']}", file=sys.stderr)
    if skipped:
        print(f"{len(skipped)} input(s) skipped; listed in {out / 'skipped.csv'}", file=sys.stderr)
        return EXIT_SKIPPED
    return EXIT_OK


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m stages.predict", description=__doc__.split("\n\n")[0],
                                     epilog="exit code: 0 all slices predicted, 3 some inputs skipped, 2 fatal")
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="slice files (.tif .tiff .png .jpg), folders of them, or a Kaggle-layout zip")
    parser.add_argument("--model", default=str(DEFAULT_MODEL),
                        help="trained model (default: models/model.keras, made by `dvc repro`)")
    parser.add_argument("--out", required=True, help="output folder (created; existing files are replaced)")
    chosen = parser.add_mutually_exclusive_group()
    chosen.add_argument("--patients", nargs="+", metavar="ID",
                        help="segment only these Kaggle patients (TCGA_CS_4941, or the case TCGA_CS_4941_19960909)")
    chosen.add_argument("--split", choices=("train", "val", "test"),
                        help=f"segment only the patients the pipeline's split put there ({SPLIT})")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    patients = split_patients(args.split) if args.split else args.patients
    return run(args.inputs, args.model, args.out, serving_settings(load_params("evaluate")),
               progress=not args.no_progress, patients=patients)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter hides the report
    run_main(lambda: sys.exit(main()))
