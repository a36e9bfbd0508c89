"""Stage `index`: pair every slice with its mask, validate both, and join the patients' data.csv.

Reads the data set where the download stage left it (SOURCE.json's `data`): data/raw/kaggle_3m, or the zip
data/raw/kaggle_3m.zip, whose members it decodes in memory.

Outputs data/index.csv (one row per slice), data/slices/{images,masks}.npy (every valid slice decoded
once, in index order, so later stages never decode TIFFs again), data/index_report.csv (each bad file
with its problem and fix) and metrics/data.json (counts).
"""
from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from stages.common import BrainsegError, NpyWriter, atomic_path, load_params, run_main, write_json
from stages.images import SLICE_SHAPE, BadImage, read_image, read_mask
from stages.rawdata import open_raw

RAW = Path("data") / "raw"
INDEX = Path("data") / "index.csv"
REPORT = Path("data") / "index_report.csv"
SLICES = Path("data") / "slices"
SOURCE = Path("data") / "raw" / "SOURCE.json"
CASE_RE = re.compile(r"^TCGA_([A-Z0-9]{2})_([A-Z0-9]{4})_(\d{8})$")
FILE_RE = re.compile(r"^(TCGA_[A-Z0-9]{2}_[A-Z0-9]{4}_\d{8})_(\d+)(_mask)?\.tif$")
COLUMNS = ["patient", "case", "institution", "slice", "image", "mask", "tumour", "area"]


def problem(file, what: str, fix: str) -> dict:
    # bytes invalid in UTF-8 reach Python as surrogates, which no CSV or terminal accepts: show them as \xNN
    return {"file": os.fsencode(str(file)).decode("utf-8", "backslashreplace"), "problem": what, "fix": fix}


def pair_case(raw, case: str, names: list[str]) -> tuple[list[dict], list[dict]]:
    """Pair images with masks by name in one patient folder -> (pairs, problems). Reads no pixels.

    A slice number given twice (_7.tif and _07.tif) is ambiguous: that slice is left out, not guessed.
    """
    match = CASE_RE.match(case)
    if not match:
        return [], [problem(raw.label(case), "folder name is not a Kaggle case ID (TCGA_<inst>_<patient>_<date>)",
                            "rename it or move it out of kaggle_3m")]
    inst, pid, _ = match.groups()
    images, masks, problems, duplicates = {}, {}, [], set()
    for name in names:
        m = FILE_RE.match(name)
        if not m or m.group(1) != case:
            problems.append(problem(raw.label(case, name), "file name does not follow <CASE>_<slice>[_mask].tif "
                                                           "inside its case folder",
                                    "rename it to the Kaggle convention or remove it"))
            continue
        number = int(m.group(2))
        target = masks if m.group(3) else images
        if number in target:
            problems.append(problem(raw.label(case, name), f"duplicate slice number {number} (also "
                                    f"{target[number]}); the slice is left out", "keep one file per slice number"))
            duplicates.add(number)
            continue
        target[number] = name
    if not images and not masks and not problems:
        problems.append(problem(raw.label(case), "empty patient folder", "remove the folder or add its slices"))
    pairs = []
    for number in sorted(set(images) | set(masks)):
        if number in duplicates:
            continue
        if number not in masks:
            problems.append(problem(raw.label(case, images[number]), "image without mask",
                                    "add its _mask.tif or remove it"))
        elif number not in images:
            problems.append(problem(raw.label(case, masks[number]), "mask without image",
                                    "add its image or remove the mask"))
        else:
            # inside kaggle_3m, so the table is the same whichever source or storage the slices came from
            pairs.append({"patient": f"TCGA_{inst}_{pid}", "case": case, "institution": inst, "slice": number,
                          "image": f"{case}/{images[number]}", "mask": f"{case}/{masks[number]}"})
    return pairs, problems


def pair_slices(raw) -> tuple[pd.DataFrame, list[dict]]:
    """Every patient folder's pairs, from a rawdata.Folder / Zip or the path of either."""
    if not hasattr(raw, "cases"):
        raw = open_raw(raw)
    pairs, problems = [], []
    for case, names in raw.cases():  # hidden files (.DS_Store, editor swap files) are neither slices nor errors
        p, q = pair_case(raw, case, names)
        pairs += p
        problems += q
    frame = pd.DataFrame(pairs, columns=COLUMNS[:6])
    return frame.sort_values(["patient", "slice"], ignore_index=True), problems


def read_pair(raw, row) -> tuple[np.ndarray, np.ndarray]:
    image_file, mask_file = raw.label(*row.image.split("/")), raw.label(*row.mask.split("/"))
    image = read_image(raw.source(image_file), name=image_file)
    return image, read_mask(raw.source(mask_file), shape=image.shape[:2], name=mask_file)


def load_slices(raw, frame: pd.DataFrame, progress: bool = True,
                out_dir: Path | None = None) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Decode every pair -> (images (N,256,256,3), masks (N,256,256) in {0,1}, problems); bad rows are zero.

    With `out_dir` the slices stream, in order, into out_dir/images.npy and masks.npy, returned memory-mapped:
    sequential writes cost next to nothing beside the decode, where filling a writable memory map cost ~40% more.
    """
    n = len(frame)
    shapes = {"images": (n, *SLICE_SHAPE, 3), "masks": (n, *SLICE_SHAPE)}
    empty = tuple(np.zeros(shape[1:], np.uint8) for shape in shapes.values())
    problems = []

    def work(i_row):
        i, row = i_row
        try:
            image, mask = read_pair(raw, row)
            return image, mask // 255
        except BadImage as err:
            problems.append({**problem(err.file, err.reason, err.fix), "row": i})
            return empty

    with ThreadPoolExecutor(max_workers=2) as pool:  # TIFF decoding releases the GIL
        decoded = tqdm(pool.map(work, enumerate(frame.itertuples())), total=n, desc="decode", unit="slice",
                       disable=not progress)
        if out_dir is None:
            images, masks = (np.zeros(shape, np.uint8) for shape in shapes.values())
            for i, (image, mask) in enumerate(decoded):
                images[i], masks[i] = image, mask
        else:
            files = [NpyWriter(Path(out_dir) / f"{name}.npy", shape) for name, shape in shapes.items()]
            try:
                for pair in decoded:
                    for file, array in zip(files, pair):
                        file.write(array)
            finally:
                for file in files:
                    file.close()
            images, masks = (np.load(Path(out_dir) / f"{name}.npy", mmap_mode="r") for name in shapes)
    return images, masks, sorted(problems, key=lambda p: p["row"])


def read_clinical(raw) -> tuple[pd.DataFrame, list[dict]]:
    """data.csv -> (one row per patient, problems). A malformed or repeated row is reported, not used."""
    csv_path = raw.label("data.csv")
    try:
        clinical = pd.read_csv(raw.source(csv_path))
    except FileNotFoundError:
        raise BrainsegError(f"{csv_path}: missing. Fix: data.csv comes with the Kaggle data set; restore it") from None
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as err:
        raise BrainsegError(f"{csv_path}: not a readable CSV ({err}). Fix: restore Kaggle's data.csv") from None
    if "Patient" not in clinical.columns:
        raise BrainsegError(f"{csv_path}: no 'Patient' column. Fix: restore Kaggle's data.csv")
    ids = clinical["Patient"].fillna("").astype(str)
    bad = ~ids.str.fullmatch(r"TCGA_[A-Z0-9]{2}_[A-Z0-9]{4}")
    again = ~bad & ids.duplicated()
    problems = [problem(csv_path, f"row '{ids[i]}' has no TCGA patient ID (TCGA_<inst>_<patient>); row ignored",
                        "correct or delete the row") for i in clinical.index[bad]]
    problems += [problem(csv_path, f"patient {ids[i]} has a second row; the first is used",
                         "delete the duplicate row") for i in clinical.index[again]]
    return clinical[~bad & ~again].rename(columns={"Patient": "patient"}), problems


def build_index(root: Path, on_bad: str = "fail", progress: bool = True, out_dir: Path | None = None):
    """A kaggle_3m folder or zip -> (index DataFrame, images, masks, problems, counts). Raises listing every bad
    file when on_bad='fail'. With `out_dir` the slices are written there as images.npy / masks.npy as they decode."""
    if on_bad not in ("fail", "skip"):
        raise BrainsegError(f"params.yaml: index.on_bad '{on_bad}' is not fail or skip")
    raw = open_raw(root)
    try:
        return _build_index(raw, on_bad, progress, out_dir)
    finally:
        raw.close()


def _build_index(raw, on_bad: str, progress: bool, out_dir: Path | None):
    root = raw.label()
    frame, problems = pair_slices(raw)
    images, masks, bad = load_slices(raw, frame, progress, out_dir)
    problems += bad
    if problems and on_bad == "fail":
        listed = "\n".join(f"  {p['file']}: {p['problem']} (fix: {p['fix']})" for p in problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise BrainsegError(f"{len(problems)} bad file(s) in {root}:\n{listed}{more}\n"
                            "Fix them, or set index.on_bad: skip to leave them out (listed in data/index_report.csv)")
    if bad:  # only then: boolean indexing copies every slice
        keep = np.ones(len(frame), bool)
        keep[[p["row"] for p in bad]] = False
        frame, images, masks = frame[keep].reset_index(drop=True), images[keep], masks[keep]
        if out_dir is not None:  # rewrite the files without the bad rows (new inodes: the old maps stay valid)
            for name, array in (("images", images), ("masks", masks)):
                part = Path(out_dir) / f"{name}.part"
                with open(part, "wb") as f:
                    np.save(f, np.asarray(array))
                os.replace(part, Path(out_dir) / f"{name}.npy")
    frame["area"] = masks.reshape(len(frame), -1).sum(1) if len(frame) else []
    frame["tumour"] = frame["area"] > 0
    clinical, csv_problems = read_clinical(raw)
    problems += csv_problems
    missing = sorted(set(frame["patient"]) - set(clinical["patient"]))
    problems += [problem(raw.label("data.csv"), f"no row for patient {p} (its clinical columns stay empty)",
                         "add the patient's row from Kaggle's data.csv") for p in missing]
    frame = frame.merge(clinical, on="patient", how="left")
    counts = {
        "patients": int(frame["patient"].nunique()),
        "patients_in_csv": int(len(clinical)),
        "patients_in_csv_without_folder": int(len(set(clinical["patient"]) - set(frame["patient"]))),
        "slices": int(len(frame)),
        "tumour_slices": int(frame["tumour"].sum()),
        "tumour_fraction": round(float(frame["tumour"].mean()), 4) if len(frame) else 0.0,
        "bad_files": len(problems),
    }
    return frame, images, masks, problems, counts


def main() -> None:
    params = load_params()
    if not SOURCE.is_file():  # the download was interrupted after the data and before its record
        raise BrainsegError(f"{SOURCE}: missing. Fix: run `dvc repro download` again")
    source = load_params(path=SOURCE)
    # each output goes to its temporary and all are renamed together at the end, so a failure (a full disk,
    # a bad file) keeps the previous slices, report and index whole: never new slices beside an old index
    with atomic_path(SLICES, is_dir=True) as slices, atomic_path(REPORT) as report, atomic_path(INDEX) as table:
        frame, images, masks, problems, counts = build_index(RAW / source.get("data", "kaggle_3m"),
                                                             params["index"]["on_bad"], out_dir=slices)
        del images, masks  # read-only maps of the files written
        pd.DataFrame(problems, columns=["file", "problem", "fix"]).to_csv(report, index=False, lineterminator="\n")
        frame.to_csv(table, index=False, lineterminator="\n")
    write_json(Path("metrics") / "data.json", {**counts, "source": source["source"]})
    print(f"{counts['slices']} slices of {counts['patients']} patients, {counts['tumour_slices']} with tumour; "
          f"{len(problems)} problem(s) in {REPORT}")


if __name__ == "__main__":
    run_main(main)
