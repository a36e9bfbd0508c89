"""Load a trained model and run it: the one inference path of evaluation, the predict CLI and the web app.

    model = load_model("models/model.keras")
    masks, probs = segment(model, images, load_params("evaluate"), patients)

Images are uint8 (N,H,W,3) slices at any size; they are resized to the model's input size by
stages.preprocess and the probabilities come back at the images' own size.

Engine: stages.engines runs the network (a LiteRT graph on a CPU, float32 or int8, else Keras); `engine`
picks one (auto | keras | litert | litert_int8).
"""
from __future__ import annotations

import weakref
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
             engine: str = "auto", cascade: float | None = None, ids: np.ndarray | None = None) -> np.ndarray:
    if cascade is not None and (isinstance(cascade, bool) or not isinstance(cascade, (int, float))
                                or not 0 <= cascade <= 1):
        raise BrainsegError(f"evaluate.cascade is {cascade!r}: set it in params.yaml to a probability from 0 to 1 "
                            f"(the first member's map must reach it for the other members to run), or null")
    parts = cascade_parts(model) if cascade is not None else None
    segmenter = model_kind(model) == "segmenter"
    n, h, w = images.shape[:3]
    if not n:
        return np.zeros((0, h, w) if segmenter else (0,), np.float32)
    if parts is None:
        out = _run(engines.runner(model, engine), model, images, batch_size, progress, "predict")
    else:
        first, rest, k = parts
        out = _run(engines.runner(first, engine), model, images, batch_size, progress, "predict, first member")
        screened = with_neighbours(out.reshape(n, -1).max(axis=1) >= cascade, ids)
        if screened.any():
            others = _run(engines.runner(rest, engine), model, images[screened], batch_size, progress,
                          f"predict, members 2-{k}")
            out[screened] = (out[screened] + (k - 1) * others) / k
        counts = _CASCADE_COUNTS.setdefault(model, [0, 0])
        counts[0] += n
        counts[1] += int(screened.sum())
    return preprocess.to_native(out, h, w) if segmenter else out.reshape(n)


def _run(run, model: keras.Model, images: np.ndarray, batch_size: int, progress: bool, desc: str) -> np.ndarray:
    """A runner's outputs for one or more slices, at the model's size, batch by batch."""
    size = preprocess.input_size(model) or images.shape[1]
    batches = range(0, len(images), batch_size)
    if progress:
        from tqdm import tqdm
        batches = tqdm(batches, desc=desc, unit="batch")
    return np.concatenate([run(preprocess.to_model_input(images[start:start + batch_size], size))
                           for start in batches])


# evaluate.cascade: a seed ensemble's first member screens every slice, and the other members run only on the
# slices where its map reaches the gate somewhere, and on their neighbours. Elsewhere the first member's map stands
# for the mean: with k members the mean passes the threshold where the first says under the gate only if the others
# say, on average, over (k * threshold - gate) / (k - 1). About two thirds of a head's slices hold no tumour, so
# this saves most of the others' work (README, quality levers)
_CASCADES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # ensemble -> (first, rest, k), or None
_CASCADE_COUNTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # ensemble -> [screened, run by all]


def with_neighbours(screened: np.ndarray, ids: np.ndarray | None = None) -> np.ndarray:
    """`screened` with each screened slice's neighbours in its patient's volume (`ids`: one patient id per slice,
    slices in order; None: one patient): a tumour's first and last slices, which the first member may miss, lie
    next to slices it finds."""
    same = np.ones(len(screened) - 1, bool) if ids is None else np.asarray(ids)[1:] == np.asarray(ids)[:-1]
    out = screened.copy()
    out[1:] |= screened[:-1] & same
    out[:-1] |= screened[1:] & same
    return out


def ensemble_members(model: keras.Model) -> list[keras.Model]:
    """A seed ensemble's member networks (stages.models.average), in order; [] for one network."""
    return [layer for layer in model.layers if isinstance(layer, keras.Model) and layer.name.startswith("member_")]


def cascade_parts(model: keras.Model) -> tuple[keras.Model, keras.Model, int] | None:
    """(the first member, the mean of the others, the number of members) of a segmenting seed ensemble, each a
    model named as the ensemble (so engines picks their engine as the whole's); None for one network or a
    classifier, which evaluate.cascade leaves as they are."""
    if model not in _CASCADES:
        members = ensemble_members(model)
        _CASCADES[model] = (_mean_of(model, members[:1]), _mean_of(model, members[1:]), len(members)) \
            if len(members) > 1 and model_kind(model) == "segmenter" else None
    return _CASCADES[model]


def _mean_of(model: keras.Model, members: list[keras.Model]) -> keras.Model:
    inputs = keras.Input(model.inputs[0].shape[1:], name="image")
    outputs = [member(inputs) for member in members]
    outputs = [y[-1] if isinstance(y, (list, tuple)) else y for y in outputs]
    mean = outputs[0] if len(outputs) == 1 else keras.layers.Average(dtype="float32", name="average")(outputs)
    return keras.Model(inputs, mean, name=model.name)


def cascade_share(model: keras.Model) -> tuple[int, int]:
    """(slices screened, slices every member ran on) by evaluate.cascade for `model` so far."""
    return tuple(_CASCADE_COUNTS.get(model, (0, 0)))


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
               engine: str = "auto", patients=None, cascade: float | None = None) -> list[np.ndarray]:
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
        probs = _model_probs(model, x, ids, batch_size, progress, engine, cascade)
        if probs.ndim == 3:  # a segmenter's maps go back to the slices' frame; a classifier's scores need not
            if warp is not None:
                probs = preprocess.warp_slices(probs, *warp, inverse=True)
            if flip:
                probs = probs[:, :, ::-1]
        out.append(probs)
    return out


def _model_probs(model: keras.Model, images: np.ndarray, ids: np.ndarray, batch_size: int, progress: bool,
                 engine: str, cascade: float | None = None) -> np.ndarray:
    """The network's probabilities for uint8 slices, with the input its training used (see predict_probs)."""
    return _predict(model, preprocess.network_input(model, images, ids), batch_size, progress, engine, cascade, ids)


def predict_probs(model: keras.Model, images: np.ndarray, batch_size: int = 32, tta_flip: bool = False,
                  progress: bool = False, engine: str = "auto", patients=None,
                  tta_affine: bool = False, cascade: float | None = None) -> np.ndarray:
    """Tumour probabilities for uint8 slices (N,H,W,3) (or one slice (H,W,3), returned as N=1).

    Segmenter: float32 (N,H,W) at the images' size. Classifier: float32 (N,) tumour probability.
    tta_flip averages with the prediction on the left-right mirrored slices (mirrored back):
    0.5 * (p(x) + flip(p(flip(x)))); tta_affine adds the slices (and mirrors) rotated by 10 degrees either way
    and zoomed by 0.9 and 1.1, each prediction warped back (AFFINE_VIEWS). `engine`: auto | keras | litert |
    litert_int8 (see stages.engines). `cascade` (a seed ensemble's, evaluate.cascade): the probability a slice's
    map from the first member must reach somewhere for the other members to run on it and its neighbours
    (cascade_parts, with_neighbours); None: all of them run on every slice.
    A model trained with `train.input_norm: volume` gets each patient's slices standardised together
    (`patients`: one id per slice; None: all the slices are one patient's). A model trained with
    `train.slice_position` gets each slice's place in its patient's volume, which assumes every patient's
    slices are all there, in slice order (a lone slice is placed in the middle: preprocess.slice_positions);
    so does a model trained with `train.neighbours`, which gets the FLAIR of the slices around each one (a lone
    slice, or the end of a volume, stands in for the neighbours it lacks: preprocess.neighbour_rows).
    """
    views = test_time_views(tta_flip, tta_affine)
    predicted = view_probs(model, images, views, batch_size, progress, engine, patients, cascade)
    return average_views(predicted, views, [(tta_flip, tta_affine)])[tta_flip, tta_affine]


def segment(model: keras.Model, images: np.ndarray, params: dict, patients=None,
            batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Predict and post-process as the `evaluate` params say (threshold, min_component, largest_3d, tta_flip,
    tta_affine, engine, cascade).

    Returns (masks, probs). Segmenter: masks bool (N,H,W), probs float32 (N,H,W).
    Classifier: masks bool (N,) 'tumour present' (probability above the threshold), probs float32 (N,).
    `patients` (one id per slice, each patient's slices in slice order) lets largest_3d work per patient
    volume; without it every slice is its own volume for largest_3d, while a model trained with
    `train.input_norm: volume` standardises all the slices together (predict_probs).
    """
    probs = predict_probs(model, images, batch_size or params.get("batch_size", 32),
                          tta_flip=params.get("tta_flip", False), engine=params.get("engine", "auto"),
                          patients=patients, tta_affine=params.get("tta_affine", False),
                          cascade=params.get("cascade"))
    if probs.ndim == 1:
        return probs > params.get("threshold", 0.5), probs
    return postprocess.postprocess(probs, params, patients), probs
