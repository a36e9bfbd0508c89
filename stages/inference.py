"""Load a trained model and run it: the one inference path of evaluation, the predict CLI and the web app.

    model = load_model("models/model.keras")
    masks, probs = segment(model, images, load_params("evaluate"), patients)

Images are uint8 (N,H,W,3) slices at any size; they are resized to the model's input size by
stages.preprocess and the probabilities come back at the images' own size.

Engine: stages.engines runs the network (a LiteRT graph on a CPU, float32 or int8, else Keras); `engine`
picks one (auto | keras | litert | litert_int8).
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import keras
import numpy as np

# layers and losses register the custom objects (brainseg>Name) that saved models name, so load_model finds them
from stages import engines, layers, losses, postprocess, preprocess  # noqa: F401
from stages.common import BrainsegError

RETRAIN = "run `dvc repro` to train it (or `dvc exp run -S model=NAME` for another architecture)"


def load_model(path: Path | str) -> keras.Model:
    """Load a .keras model in safe mode (no arbitrary code), for inference only (not compiled).

    Raises BrainsegError naming the file when it is missing, unreadable or unsafe (a Lambda layer).
    """
    path = Path(path)
    if not path.is_file():
        raise BrainsegError(f"{path}: no trained model there; {RETRAIN}")
    if not zipfile.is_zipfile(path):
        raise BrainsegError(f"{path}: not a Keras .keras file (corrupt or truncated); delete it and {RETRAIN}")
    try:
        return keras.models.load_model(path, safe_mode=True, compile=False)
    except Exception as err:
        if "Lambda" in str(err):
            raise BrainsegError(f"{path}: holds a Lambda layer, which safe mode refuses to load (it could run "
                                f"arbitrary code); build the model without Lambda layers and {RETRAIN}") from err
        raise BrainsegError(f"{path}: cannot be loaded as a Keras model ({type(err).__name__}: {err}); "
                            f"delete it and {RETRAIN}") from err


def _final_output(model: keras.Model):
    """The prediction output: the last one of a multi-output model (DoubleU-Net's second mask)."""
    return model.outputs[-1]


def model_kind(model: keras.Model) -> str:
    """'segmenter' for a (H,W,1) probability-map output, 'classifier' for a (1,) probability output."""
    return "segmenter" if len(_final_output(model).shape) == 4 else "classifier"


def _predict(model: keras.Model, images: np.ndarray, batch_size: int, progress: bool,
             engine: str = "auto") -> np.ndarray:
    run = engines.runner(model, engine)
    size = preprocess.input_size(model)
    segmenter = model_kind(model) == "segmenter"
    n, h, w = images.shape[:3]
    batches = range(0, n, batch_size)
    if progress:
        from tqdm import tqdm
        batches = tqdm(batches, desc="predict", unit="batch")
    out = []
    for start in batches:
        batch = images[start:start + batch_size]
        x = preprocess.to_model_input(batch, size or h)
        y = run(x)
        out.append(preprocess.to_native(y, h, w) if segmenter else y.reshape(len(batch)))
    if not out:
        return np.zeros((0, h, w) if segmenter else (0,), np.float32)
    return np.concatenate(out)


def lone_slice_note(model: keras.Model) -> str:
    """For a model that uses the rest of a patient's volume, what it makes of a slice that comes alone, in words
    (predict_probs); "" for a 2D model."""
    uses = ((["where the slice lies (train.slice_position), so a lone slice is taken to lie in the middle of the "
              "head"] if preprocess.slice_positioned(model) else [])
            + (["the slices around it (train.neighbours), so a lone slice stands in for its own neighbours"]
               if preprocess.neighbour_count(model) else []))
    return f"{model.name} also uses " + "; and ".join(uses) if uses else ""


# tta_affine's views, each of the slice and (with tta_flip) of its mirror: (rotation degrees, zoom). Within what
# balance's copies teach the network (rotations up to 25 degrees); chosen on validation patients (README)
AFFINE_VIEWS = ((10.0, 1.0), (-10.0, 1.0), (0.0, 0.9), (0.0, 1.1))


def test_time_views(tta_flip: bool = False, tta_affine: bool = False) -> list[tuple[bool, tuple | None]]:
    """The views a prediction averages, as (mirrored, (angle, zoom) or None); the plain slice first."""
    flips = (False, True) if tta_flip else (False,)
    return [(flip, None) for flip in flips] + ([(flip, view) for flip in flips for view in AFFINE_VIEWS]
                                               if tta_affine else [])


def views_covering(view_sets) -> list[tuple[bool, tuple | None]]:
    """The fewest views (test_time_views) from which every one of `view_sets`' averages can be made."""
    view_sets = list(view_sets)
    return test_time_views(any(flip for flip, _ in view_sets), any(affine for _, affine in view_sets))


def view_set(params: dict) -> tuple[bool, bool]:
    """(tta_flip, tta_affine) as `evaluate` params (or one of evaluate.compare_settings) ask for them: the key of
    the views' average that setting post-processes (average_views)."""
    return bool(params.get("tta_flip")), bool(params.get("tta_affine"))


def average_views(predicted: list[np.ndarray], views: list, view_sets) -> dict[tuple, np.ndarray]:
    """{(tta_flip, tta_affine): the mean of the views that set asks for} from every view's probabilities
    (`predicted`, in the order of `views`), so each view is predicted once however many sets use it."""
    averages = {}
    for tta_flip, tta_affine in view_sets:
        chosen = [p for p, (flip, warp) in zip(predicted, views)
                  if (tta_flip or not flip) and (tta_affine or warp is None)]
        averages[tta_flip, tta_affine] = chosen[0] if len(chosen) == 1 else np.mean(chosen, axis=0, dtype=np.float32)
    return averages


def view_probs(model: keras.Model, images: np.ndarray, views, batch_size: int = 32, progress: bool = False,
               engine: str = "auto", patients=None) -> list[np.ndarray]:
    """predict_probs' probabilities for each of `views` (test_time_views), each taken back to the slices' frame
    (un-mirrored, warped back), so they can be averaged pixel by pixel."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[-1] != 3:
        raise BrainsegError(f"expected RGB slices shaped (N,H,W,3), got {images.shape}")
    ids = np.zeros(len(images)) if patients is None else np.asarray(patients)
    if len(ids) != len(images):
        raise BrainsegError(f"{len(ids)} patient ids for {len(images)} slices")
    out = []
    for flip, warp in views:
        x = images[:, :, ::-1] if flip else images
        if warp is not None:
            x = preprocess.warp_slices(x, *warp)
        probs = _model_probs(model, x, ids, batch_size, progress, engine)
        if probs.ndim == 3:  # a segmenter's maps go back to the slices' frame; a classifier's scores need not
            if warp is not None:
                probs = preprocess.warp_slices(probs, *warp, inverse=True)
            if flip:
                probs = probs[:, :, ::-1]
        out.append(probs)
    return out


def _model_probs(model: keras.Model, images: np.ndarray, ids: np.ndarray, batch_size: int, progress: bool,
                 engine: str) -> np.ndarray:
    """The network's probabilities for uint8 slices, with the input its training used (see predict_probs)."""
    return _predict(model, preprocess.network_input(model, images, ids), batch_size, progress, engine)


def predict_probs(model: keras.Model, images: np.ndarray, batch_size: int = 32, tta_flip: bool = False,
                  progress: bool = False, engine: str = "auto", patients=None,
                  tta_affine: bool = False) -> np.ndarray:
    """Tumour probabilities for uint8 slices (N,H,W,3) (or one slice (H,W,3), returned as N=1).

    Segmenter: float32 (N,H,W) at the images' size. Classifier: float32 (N,) tumour probability.
    tta_flip averages with the prediction on the left-right mirrored slices (mirrored back):
    0.5 * (p(x) + flip(p(flip(x)))); tta_affine adds the slices (and mirrors) rotated by 10 degrees either way
    and zoomed by 0.9 and 1.1, each prediction warped back (AFFINE_VIEWS). `engine`: auto | keras | litert |
    litert_int8 (see stages.engines).
    A model trained with `train.input_norm: volume` gets each patient's slices standardised together
    (`patients`: one id per slice; None: all the slices are one patient's). A model trained with
    `train.slice_position` gets each slice's place in its patient's volume, which assumes every patient's
    slices are all there, in slice order (a lone slice is placed in the middle: preprocess.slice_positions);
    so does a model trained with `train.neighbours`, which gets the FLAIR of the slices around each one (a lone
    slice, or the end of a volume, stands in for the neighbours it lacks: preprocess.neighbour_rows).
    """
    views = test_time_views(tta_flip, tta_affine)
    predicted = view_probs(model, images, views, batch_size, progress, engine, patients)
    return average_views(predicted, views, [(tta_flip, tta_affine)])[tta_flip, tta_affine]


def segment(model: keras.Model, images: np.ndarray, params: dict, patients=None,
            batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Predict and post-process as the `evaluate` params say (threshold, min_component, largest_3d, tta_flip,
    tta_affine, engine).

    Returns (masks, probs). Segmenter: masks bool (N,H,W), probs float32 (N,H,W).
    Classifier: masks bool (N,) 'tumour present' (probability above the threshold), probs float32 (N,).
    `patients` (one id per slice, each patient's slices in slice order) lets largest_3d work per patient
    volume; without it every slice is its own volume for largest_3d, while a model trained with
    `train.input_norm: volume` standardises all the slices together (predict_probs).
    """
    probs = predict_probs(model, images, batch_size or params.get("batch_size", 32),
                          tta_flip=params.get("tta_flip", False), engine=params.get("engine", "auto"),
                          patients=patients, tta_affine=params.get("tta_affine", False))
    if probs.ndim == 1:
        return probs > params.get("threshold", 0.5), probs
    return postprocess.postprocess(probs, params, patients), probs
