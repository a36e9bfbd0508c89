"""DVC stage `evaluate`: score the trained model on the test split; or, as a CLI, on any Kaggle-layout data.

    python -m stages.evaluate                         # the DVC stage: models/model.keras on data/prepared/test*
    python -m stages.evaluate --model models/model.keras --data ../shared/data/lgg-mri-segmentation-dev.zip \
        --out metrics/dev.json                        # every slice of the given patients, same metrics

Stage outputs (metric definitions in stages.metrics):
- metrics/eval.json: segmentation scores (headline dice_volume_mean, with its median, worst patient and 95%
  bootstrap interval over patients: stages.intervals), slice detection, post-processing
  measured off and on (postprocess_compare), model facts and the data source. Classifiers write
  classifier_* keys instead. `validation` holds the same headline on the validation patients; with
  evaluate.choose_on_validation the post-processing that scores best there is the one applied to test.
- metrics/per_patient.csv: one row per test patient, worst first.
- plots/roc.csv (fpr,tpr), plots/confusion.csv (actual,predicted per slice),
  plots/overlays/{best,median,worst}.png: the slice with the largest true tumour of the best, median and worst
  test patient, true outline green, predicted outline red.
"""
from __future__ import annotations

import argparse
import filecmp
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from stages import engines, inference, intervals, metrics, prepared, preprocess
from stages.common import BrainsegError, atomic_path, load_params, run_main, write_csv, write_json
from stages.postprocess import POSTPROCESS_STEPS, postprocess, tumour_present

MODEL = Path("models/model.keras")
# the model the train stage chose the epochs with, which chooses the post-processing on validation here: the same as
# model.keras unless train.refit trained model.keras again on the validation patients too
SELECTION = Path("models/selection.keras")
DATA = Path("data")  # data/prepared's tables and the data/slices they point into
SOURCE = Path("data/raw/SOURCE.json")
EVAL_JSON = Path("metrics/eval.json")
PER_PATIENT = Path("metrics/per_patient.csv")
# segmenters: the validation patients' Dice under each postprocess_compare setting, which k-fold runs pool
# (benchmarks.crossval) into a cross-validated per-volume Dice; classifiers: their per-patient accuracy
PER_PATIENT_VALIDATION = Path("metrics/per_patient_validation.csv")
ROC = Path("plots/roc.csv")
CONFUSION = Path("plots/confusion.csv")
OVERLAYS = Path("plots/overlays")

# Size of the small-component removal measured in postprocess_compare when params leave it off (0).
COMPARE_MIN_COMPONENT = 64


@dataclass
class Evaluation:
    """Everything evaluate_model computes; the stage and the CLI decide what to write."""
    metrics: dict
    per_patient: pd.DataFrame
    roc: pd.DataFrame
    confusion: pd.DataFrame
    overlays: dict[str, np.ndarray] = field(default_factory=dict)  # name -> BGR image
    # segmenters: patient, slices, true_volume and one per-volume Dice column per postprocess_compare setting
    per_patient_compare: pd.DataFrame | None = None


def compare_settings(params: dict) -> dict[str, dict]:
    """Post-processing measured both ways: each step switched on in turn, on top of the previous ones."""
    raw = {**params, "min_component": 0, "largest_3d": False, "tta_flip": False, "tta_affine": False}
    with_min = {**raw, "min_component": int(params.get("min_component") or COMPARE_MIN_COMPONENT)}
    with_3d = {**with_min, "largest_3d": True}
    with_flip = {**with_3d, "tta_flip": True}
    return {"threshold": raw, "min_component": with_min, "largest_3d": with_3d, "tta_flip": with_flip,
            "tta_affine": {**with_flip, "tta_affine": True}}


def _key(settings: dict) -> tuple:
    return (settings.get("threshold", 0.5), int(settings.get("min_component") or 0),
            float(settings.get("min_position") or 0), bool(settings.get("largest_3d")),
            *inference.view_set(settings))


def _representative(truth: np.ndarray, pred: np.ndarray) -> int:
    """The slice with the largest true tumour (else the largest prediction, else the middle slice)."""
    for mask in (truth, pred):
        area = mask.reshape(len(mask), -1).sum(axis=1) if mask.ndim == 3 else mask.astype(int)
        if area.max() > 0:
            return int(area.argmax())
    return len(truth) // 2


def overlay(image: np.ndarray, truth: np.ndarray, pred: np.ndarray | None, caption: str) -> np.ndarray:
    """MRI slice (RGB composite as stored) with the true outline in green and the predicted one in red.

    Drawn at twice the size of a 256 px slice so the caption and thin outlines stay readable; returns BGR.
    """
    scale = 2 if max(image.shape[:2]) <= 256 else 1
    bgr = cv2.cvtColor(cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR),
                       cv2.COLOR_RGB2BGR)
    # green drawn wider underneath, so where the outlines agree both stay visible
    for mask, colour, width in ((truth, (0, 255, 0), 3), (pred, (0, 0, 255), 1)):
        if mask is None:
            continue
        big = cv2.resize(mask.astype(np.uint8), None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(big, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(bgr, contours, -1, colour, width)
    header = np.zeros((44, bgr.shape[1], 3), np.uint8)
    legend = "green: true outline" + (", red: predicted outline" if pred is not None else "")
    for y, text in ((17, caption), (37, legend)):
        cv2.putText(header, text, (6, y), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
    return np.vstack([header, bgr])


def _patient_rows(table: pd.DataFrame):
    """(patient, array rows in slice order) for each patient, in table order."""
    for patient, group in table.groupby("patient", sort=False):
        if "slice" in group:
            group = group.sort_values("slice", kind="stable")
        yield patient, group.index.to_numpy()


def _slice_no(table: pd.DataFrame, rows: np.ndarray, i: int):
    return table.at[rows[i], "slice"] if "slice" in table else i + 1


def _warm_up(model, images: np.ndarray, rows: np.ndarray, batch_size: int, engine: str,
             cascade: float | None) -> None:
    """Trace the predict function (two batch sizes, so later batches of any size reuse it) or convert the
    model for LiteRT before timing; with evaluate.cascade, both of its parts (a gate of 0 passes every slice on)."""
    for n in (1, 2):
        inference.predict_probs(model, images[rows[:n]], batch_size, engine=engine,
                                cascade=None if cascade is None else 0.0)


def _segment_patient(patient, truth, averages: dict, settings: dict, params: dict) -> dict:
    """Post-process one patient's probabilities under every setting (each distinct one once) and count pixels.
    `averages`: {(tta_flip, tta_affine): probabilities} for the view sets the settings use."""
    patients = [patient] * len(truth)
    done, counts = {}, {}
    for name, s in settings.items():
        if _key(s) not in done:
            p = averages[inference.view_set(s)]
            done[_key(s)] = (postprocess(p, s, patients), p)
        counts[name] = metrics.slice_counts(truth, done[_key(s)][0], patients)
    pred, p = done[_key(params)]
    return {"counts": counts, "pred": pred, "decided": tumour_present(pred, params),
            "score": p.reshape(len(p), -1).max(axis=1)}


def _compare_table(configured: pd.DataFrame, frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Per patient: slices, true volume and the per-volume Dice under each compared post-processing."""
    table = metrics.per_patient_table(configured).drop(columns=["dice", "predicted_volume"])
    for name, frame in frames.items():
        table[name] = table.patient.map(metrics.dice_per_volume(frame))
    return table.sort_values("patient", kind="stable").reset_index(drop=True)


def _segmenter_summary(counts: dict[str, list], params: dict) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    """Headline scores (configured post-processing), the post-processing comparison, the per-patient table
    and the per-patient table of the comparison."""
    empty = metrics.slice_counts(np.zeros((0, 1, 1)), np.zeros((0, 1, 1)), [])
    frames = {name: pd.concat(c, ignore_index=True) if c else empty for name, c in counts.items()}
    configured = frames.pop("headline")
    result = metrics.segmentation_scores(configured)
    result.update(intervals.volume_spread(metrics.dice_per_volume(configured)))
    result["postprocess"] = {
        **{k: params.get(k) for k in ("threshold", "min_component", "min_position", "largest_3d", "tta_flip",
                                      "tta_affine", "detection_min_area")},
        "compare_min_component": compare_settings(params)["min_component"]["min_component"]}
    result["postprocess_compare"] = {}
    for name, frame in frames.items():
        scores = metrics.segmentation_scores(frame)
        result["postprocess_compare"][name] = {k: scores[k] for k in ("dice_volume_mean", "dice_slice_mean")}
    return result, metrics.per_patient_table(configured), _compare_table(configured, frames)


def _classifier_summary(detection: dict, per_patient: list[dict], params: dict) -> tuple[dict, pd.DataFrame]:
    result = {f"classifier_{k}": detection[k] for k in ("accuracy", "sensitivity", "specificity", "roc_auc")}
    result["classifier_confusion"] = {k: detection[k] for k in ("tp", "fp", "fn", "tn")}
    result["postprocess"] = {k: params.get(k) for k in ("threshold", "tta_flip")}
    table = pd.DataFrame(per_patient, columns=["patient", "slices", "accuracy", "tumour_slices",
                                               "predicted_tumour_slices"])
    return result, table.sort_values(["accuracy", "patient"], kind="stable").reset_index(drop=True)


def _overlays(per_patient: pd.DataFrame, views: dict, column: str, label: str) -> dict[str, np.ndarray]:
    """Overlays of the worst, median and best patient of `per_patient` (sorted worst first)."""
    if per_patient.empty:
        return {}
    picks = {"worst": 0, "median": len(per_patient) // 2, "best": len(per_patient) - 1}
    overlays = {}
    for name, pos in picks.items():
        row = per_patient.iloc[pos]
        image, truth, pred, where = views[row.patient]
        overlays[name] = overlay(image, truth, pred, f"{name}: {row.patient}, {where}, {label} {row[column]:.3f}")
    return overlays


def evaluate_model(model, images: np.ndarray, masks: np.ndarray, table: pd.DataFrame, params: dict,
                   progress: bool = True, desc: str = "evaluate") -> Evaluation:
    """Score `model` on the slices listed in `table`.

    images uint8 (N,H,W,3) and masks (N,H,W) in {0,1} may be memory-mapped; `table` has columns patient
    (and slice) and its index gives each row's position in images / masks. `params` is the evaluate
    section of params.yaml. Patients are streamed one at a time, so memory stays at one patient's volume.
    Segmenters: detection calls a slice 'tumour' by stages.postprocess.tumour_present (post-processed
    predicted area reaches detection_min_area); the ROC score is the slice's maximum probability. Classifiers:
    their probability against the threshold, and as the ROC score.
    """
    kind = inference.model_kind(model)
    batch_size = int(params.get("batch_size", 32))
    engine = params.get("engine", "auto")
    cascade = params.get("cascade")
    parts = inference.cascade_parts(model) if cascade is not None else None
    served = parts[0] if parts else model  # what the engine runs: with evaluate.cascade, the first member alone
    # "headline" is what params ask for; the others are the post-processing comparison
    settings = {"headline": params, **(compare_settings(params) if kind == "segmenter" else {})}
    # every view set a setting asks for, each view predicted once per patient and averaged per set
    view_sets = {inference.view_set(s) for s in settings.values()}
    tta_views = inference.views_covering(view_sets)
    counts = {name: [] for name in settings}
    present, decided, score, classified, views = [], [], [], [], {}
    elapsed = 0.0
    if len(table):
        _warm_up(model, images, table.index.to_numpy(), batch_size, engine, cascade)
    cascaded = np.zeros(2, int)  # the plain prediction's slices screened by the first member, run by every member
    patients = list(_patient_rows(table))
    for patient, rows in tqdm(patients, desc=desc, unit="patient", disable=not progress):
        x, truth = np.asarray(images[rows]), np.asarray(masks[rows]).astype(bool)
        shared = inference.cascade_share(model)
        start = time.perf_counter()
        probs = inference.predict_probs(model, x, batch_size, engine=engine, cascade=cascade)
        elapsed += time.perf_counter() - start  # slices per second: the plain prediction, preprocessing included
        cascaded += np.subtract(inference.cascade_share(model), shared)
        predicted = [probs, *inference.view_probs(model, x, tta_views[1:], batch_size, engine=engine,
                                                  cascade=cascade)]
        averages = inference.average_views(predicted, tta_views, view_sets)
        has_tumour = truth.reshape(len(rows), -1).any(axis=1)
        present.append(has_tumour)
        if kind == "classifier":
            p = averages[inference.view_set(params)]
            yes = p > params.get("threshold", 0.5)
            decided.append(yes)
            score.append(p)
            classified.append({"patient": patient, "slices": len(rows), "accuracy": float(np.mean(yes == has_tumour)),
                               "tumour_slices": int(has_tumour.sum()), "predicted_tumour_slices": int(yes.sum())})
            i = _representative(truth, yes)
            views[patient] = (x[i], truth[i], None, f"slice {_slice_no(table, rows, i)}, p(tumour) {p[i]:.2f}")
            continue
        scored = _segment_patient(patient, truth, averages, settings, params)
        for name, frame in scored["counts"].items():
            counts[name].append(frame)
        decided.append(scored["decided"])
        score.append(scored["score"])
        i = _representative(truth, scored["pred"])
        views[patient] = (x[i], truth[i], scored["pred"][i], f"slice {_slice_no(table, rows, i)}")

    present, decided, score = (np.concatenate(a) if a else np.zeros(0) for a in (present, decided, score))
    detection = metrics.detection_scores(present, decided, score)
    compare = None
    if kind == "classifier":
        result, per_patient = _classifier_summary(detection, classified, params)
        overlays = _overlays(per_patient, views, "accuracy", "accuracy")
    else:
        result, per_patient, compare = _segmenter_summary(counts, params)
        result["detection"] = detection
        overlays = _overlays(per_patient, views, "dice", "Dice")
    result["model"] = {"name": model.name, "kind": kind, "parameters": int(model.count_params()),
                       "input_size": preprocess.input_size(model),
                       "engine": engines.engine_in_use(served, engine) if len(table) else None,
                       "slices_per_second": round(len(present) / elapsed, 2) if elapsed else None}
    if cascaded[0]:
        result["model"]["cascade"] = {"gate": cascade, "slices_every_member_ran_on": int(cascaded[1]),
                                      "share": round(cascaded[1] / cascaded[0], 4)}
    result["data"] = {"patients": len(patients), "slices": int(len(present)), "tumour_slices": int(present.sum())}
    return Evaluation(result, per_patient, metrics.roc_points(present, score),
                      metrics.confusion_rows(present, decided), overlays, compare)


def data_source(root: Path) -> str:
    """Where the data came from, as the download stage recorded it in data/raw/SOURCE.json
    ("archive (lgg-mri-segmentation-dev.zip)", "kaggle", "synthetic"); "unknown" without it."""
    try:
        record = json.loads((root / SOURCE).read_text())
        source = str(record.get("source", "unknown"))
    except (OSError, ValueError, AttributeError):
        return "unknown"
    return f"{source} ({record['archive']})" if record.get("archive") else source


def write_outputs(evaluation: Evaluation, root: Path) -> None:
    """The stage's outputs under `root`, each written atomically."""
    write_json(root / EVAL_JSON, evaluation.metrics)
    write_csv(root / PER_PATIENT, evaluation.per_patient)
    write_csv(root / ROC, evaluation.roc)
    write_csv(root / CONFUSION, evaluation.confusion)
    with atomic_path(root / OVERLAYS, is_dir=True) as tmp:
        for name, image in evaluation.overlays.items():
            if not cv2.imwrite(str(tmp / f"{name}.png"), image):
                raise BrainsegError(f"{root / OVERLAYS / name}.png: could not be written")


def choose_postprocess(validation: Evaluation, params: dict) -> tuple[str, dict]:
    """The postprocess_compare setting with the best per-volume Dice on the validation patients
    (ties go to the one with fewer steps) and the evaluate params that apply it."""
    # no validation patients (None): nothing to choose from, so the fewest steps
    scores = {name: -1.0 if v["dice_volume_mean"] is None else v["dice_volume_mean"]
              for name, v in validation.metrics["postprocess_compare"].items()}
    return best_postprocess(scores, params)


def best_postprocess(scores: dict[str, float], params: dict) -> tuple[str, dict]:
    """The compare_settings name with the highest score (ties go to the one with fewer steps: scores in
    compare_settings' order) and the evaluate params that apply it."""
    name = max(scores, key=lambda n: (scores[n], -list(scores).index(n)))
    chosen = compare_settings(params)[name]
    return name, {**params, **{k: chosen[k] for k in POSTPROCESS_STEPS}}


def validation_summary(validation: Evaluation) -> dict:
    """The validation patients' headline (and post-processing comparison), nested under `validation`."""
    m = validation.metrics
    if m["model"]["kind"] == "classifier":
        return {"patients": m["data"]["patients"], "classifier_accuracy": m["classifier_accuracy"]}
    return {"patients": m["data"]["patients"], "dice_volume_mean": m["dice_volume_mean"],
            "dice_volume_median": m["dice_volume_median"],
            **{k: m[k] for k in ("dice_volume_worst", "dice_volume_worst_patient", "dice_volume_ci95_low",
                                 "dice_volume_ci95_high")},
            "postprocess_compare": m["postprocess_compare"]}


def stage_models(params: dict, root: Path = Path(".")):
    """(the model to test, the model to choose on validation with): models/model.keras and, when train.refit made
    it a second model, models/selection.keras; the same object otherwise (also where no selection.keras exists,
    as in runs from before the refit)."""
    model = _load_checked(root / MODEL, params)
    selection = root / SELECTION
    if not selection.is_file() or filecmp.cmp(selection, root / MODEL, shallow=False):
        return model, model
    return model, _load_checked(selection, params)


def _load_checked(path: Path, params: dict):
    model = inference.load_model(path)
    if model.name != params["model"]:
        raise BrainsegError(f"{path} holds a '{model.name}' model but params.yaml says model: "
                            f"{params['model']}; run `dvc repro` to train it")
    return model


def run_stage(params: dict, root: Path = Path(".")) -> Evaluation:
    """The DVC stage: models/model.keras on data/prepared/val* then test*, outputs under `root`.

    Validation patients are scored first; with `evaluate.choose_on_validation` (segmenters) the
    post-processing that is best on them is applied to the test patients, so test is looked at once.
    After a refit (train.refit), the validation patients were trained on: they are scored with the model the first
    run kept (models/selection.keras), which chose the refit's epochs too, and the test patients with the refit.
    """
    model, chooser = stage_models(params, root)
    images, masks, table = prepared.originals(root / DATA, "test")
    settings = params["evaluate"]
    validation = evaluate_model(chooser, *prepared.originals(root / DATA, "val"), settings, desc="validation")
    chosen = None
    if settings.get("choose_on_validation") and inference.model_kind(model) == "segmenter":
        chosen, settings = choose_postprocess(validation, settings)
    evaluation = evaluate_model(model, images, masks, table, settings, desc="test")
    evaluation.metrics["postprocess"]["chosen_on_validation"] = chosen
    evaluation.metrics["model"]["refit"] = chooser is not model
    evaluation.metrics["validation"] = validation_summary(validation)
    evaluation.metrics["data_source"] = data_source(root)
    write_outputs(evaluation, root)
    # classifiers have no post-processing to compare: their validation table is per_patient.csv's
    compare = validation.per_patient_compare
    write_csv(root / PER_PATIENT_VALIDATION, validation.per_patient if compare is None else compare)
    return evaluation


def evaluate_dataset(model_path: Path, data: Path, params: dict) -> Evaluation:
    """Every slice of the patients in a Kaggle-layout zip or folder, scored like the test split."""
    from stages import index  # only this path needs it

    model = inference.load_model(model_path)
    # a zip is read in place, a folder may hold kaggle_3m further down (stages.rawdata)
    table, images, masks, _, _ = index.build_index(data, on_bad=params.get("index", {}).get("on_bad", "fail"))
    table = table.reset_index(drop=True)  # the index is each row's position in images / masks
    evaluation = evaluate_model(model, images, masks, table, params["evaluate"])
    evaluation.metrics["data_source"] = str(data)
    return evaluation


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m stages.evaluate",
        description="Without arguments: the DVC evaluate stage. With --model, --data and --out: score a model "
                    "on every slice of a Kaggle-layout zip or folder.")
    parser.add_argument("--model", type=Path, help="a .keras model, e.g. models/model.keras")
    parser.add_argument("--data", type=Path, help="a Kaggle LGG zip or folder (kaggle_3m layout)")
    parser.add_argument("--out", type=Path, help="where to write the metrics JSON")
    parser.add_argument("--per-patient", type=Path, help="optional CSV of per-patient scores, worst first")
    args = parser.parse_args(argv)
    params = load_params()
    if args.model is None and args.data is None and args.out is None:
        if args.per_patient is not None:
            parser.error("--per-patient needs --model, --data and --out")
        run_stage(params)
        return
    missing = [f"--{k}" for k in ("model", "data", "out") if getattr(args, k) is None]
    if missing:
        parser.error(f"{', '.join(missing)} required with the others")
    if not args.data.exists():
        raise BrainsegError(f"{args.data}: no such zip or folder")
    evaluation = evaluate_dataset(args.model, args.data, params)
    write_json(args.out, evaluation.metrics)
    if args.per_patient:
        write_csv(args.per_patient, evaluation.per_patient)
    print(f"{args.out}: " + (f"dice_volume_mean {evaluation.metrics['dice_volume_mean']}"
                             if "dice_volume_mean" in evaluation.metrics
                             else f"classifier_accuracy {evaluation.metrics['classifier_accuracy']}"))


if __name__ == "__main__":
    run_main(main)
