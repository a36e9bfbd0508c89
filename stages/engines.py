"""Inference engines: a trained Keras model as a callable on model-size float32 batches (stages.inference turns
slices into such batches and back).

On a CPU the network runs as a LiteRT (TFLite) graph with the XNNPACK kernels, which run this small U-Net ~2.5x
faster than Keras' own predict on 2 cores in float32 (benchmarks/training.py prints both), and faster again as
`litert_int8`: weights and activations in int8, the activations' ranges fixed on the built-in synthetic volumes
(calibration_inputs), so any machine makes the same graph from the .keras file alone, with no training data;
benchmarks/quantisation.py measures what it does to speed and Dice, against float32 and against ranges fixed on
training slices. `auto` takes it for the architectures validation has measured it on (INT8_MEASURED) on a CPU with
int8 dot-product instructions (int8_dot_product), and the float32 graph for the others and on other CPUs. With a
GPU, or a model whose layers compute in a mixed precision, Keras runs it. The conversion is made once per model
object and engine, at its first prediction, from its weights at that moment, and kept in a cache folder keyed by
the architecture, the weights, the quantisation and the converter's version ($BRAINSEG_CACHE, else
~/.cache/brainseg), so the predict CLI's next run starts in a fraction of a second instead of the seconds a
conversion takes.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import os
import threading
import warnings
import weakref
from pathlib import Path

import keras
import numpy as np

from stages import preprocess
from stages.common import BrainsegError, atomic_path

LITERT_ENGINES = ("litert", "litert_int8")
ENGINES = ("auto", "keras", *LITERT_ENGINES)
# the architectures whose int8 graph validation scored as their float32 one (README, quality levers); auto gives
# the others the float32 graph
INT8_MEASURED = ("unet",)
# int8 dot-product instructions (x86 VNNI and AMX, Arm dotprod), with which XNNPACK's int8 kernels run the int8 graph
# about twice as fast as the float32 one; on AVX2 alone it ran no faster (README, quality levers), so auto keeps the
# float32 graph there, which loses nothing to quantisation
INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp")
_LITERT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {engine: runner, or None: cannot}


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The instruction-set flags of a /proc/cpuinfo text (`flags` on x86, `Features` on Arm); of this machine's
    when None, empty where it cannot be read (macOS, Windows)."""
    if cpuinfo is None:
        return _this_cpu_flags()
    return frozenset(flag for line in cpuinfo.splitlines() if line.split(":", 1)[0].strip() in ("flags", "Features")
                     for flag in line.split(":", 1)[-1].split())


@functools.cache
def _this_cpu_flags() -> frozenset[str]:
    try:
        return cpu_flags(Path("/proc/cpuinfo").read_text())
    except OSError:
        return frozenset()


def int8_dot_product(cpuinfo: str | None = None) -> bool:
    """Whether this CPU has one of INT8_DOT_FLAGS; where its flags cannot be read it is assumed, as every Apple
    silicon chip has dotprod. $BRAINSEG_INT8_DOT=1 or 0 overrides what this CPU says (the tests set 0, so that they
    and their subprocesses run alike on every CPU)."""
    forced = os.environ.get("BRAINSEG_INT8_DOT")
    if cpuinfo is None and forced in ("0", "1"):
        return forced == "1"
    flags = cpu_flags(cpuinfo)
    return not flags or bool(flags.intersection(INT8_DOT_FLAGS))


def pick_engine(model: keras.Model, engine: str = "auto") -> str:
    """'litert_int8', 'litert' or 'keras': auto takes LiteRT on a CPU-only machine for a float32 model, in int8
    for the architectures of INT8_MEASURED on a CPU with int8 dot products (and Keras on a backend other than
    TensorFlow, whose converter LiteRT needs)."""
    if engine not in ENGINES:
        raise BrainsegError(f"inference engine '{engine}' is not one of {', '.join(ENGINES)}")
    if engine != "auto":
        return engine
    if keras.backend.backend() != "tensorflow":
        return "keras"
    import tensorflow as tf

    float32 = all(layer.dtype_policy.compute_dtype == "float32" for layer in preprocess.all_layers(model))
    if not float32 or tf.config.list_logical_devices("GPU"):
        return "keras"
    return "litert_int8" if model.name in INT8_MEASURED and int8_dot_product() else "litert"


def engine_in_use(model: keras.Model, engine: str = "auto") -> str:
    """The engine predictions of `model` ran on (after one): where auto fell back, the float32 graph or Keras."""
    runners = _LITERT.get(model, {})
    return next((name for name in _litert_tries(model, engine) if runners.get(name) is not None), "keras")


def _litert_tries(model: keras.Model, engine: str) -> list[str]:
    """The LiteRT engines to try in turn: auto falls back from int8 to the float32 graph (then to Keras)."""
    picked = pick_engine(model, engine)
    if picked == "keras":
        return []
    return ["litert_int8", "litert"] if engine == "auto" and picked == "litert_int8" else [picked]


def cache_dir() -> Path:
    """Where converted LiteRT graphs are kept: $BRAINSEG_CACHE/litert, else $XDG_CACHE_HOME or ~/.cache."""
    root = os.environ.get("BRAINSEG_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / \
        "brainseg"
    return Path(root) / "litert"


def _graph_key(model: keras.Model, int8: bool = False) -> str:
    """A digest of what the converted graph depends on: versions, quantisation, architecture and every weight's
    bytes."""
    from importlib.metadata import version

    import tensorflow as tf

    quantised = f" int8 calibrated on {CALIBRATION}" if int8 else ""
    digest = hashlib.sha256(f"tf {tf.__version__} litert {version('ai-edge-litert')}{quantised}".encode())
    digest.update(model.to_json().encode())
    for weight in model.weights:
        digest.update(np.ascontiguousarray(keras.ops.convert_to_numpy(weight)).data)
    return digest.hexdigest()[:40]


# the synthetic volumes an int8 graph's activation ranges are fixed on: patients, slices each, every n-th slice kept
CALIBRATION = {"patients": 12, "slices": 24, "every": 3, "seed": 0}


def calibration_inputs(model: keras.Model, calibration: dict = CALIBRATION) -> np.ndarray:
    """Synthetic volumes (stages.synthetic) as the network takes its input (preprocess.network_input, then the
    model's size): what `litert_int8` fixes the activations' ranges on. No real data is needed, so the CLI and the
    app convert the graph evaluation scored; the input is standardised per volume like real slices, and validation
    scored the graph as the float32 one (benchmarks.quantisation also fixes the ranges on training slices to
    compare)."""
    from stages import synthetic

    rng = np.random.default_rng(calibration["seed"])
    out = []
    for _ in range(calibration["patients"]):
        volume, _ = synthetic.make_volume(rng, calibration["slices"])
        x = preprocess.network_input(model, volume, np.zeros(len(volume)))[::calibration["every"]]
        out.append(preprocess.to_model_input(x, preprocess.input_size(model) or x.shape[1]))
    return np.concatenate(out)


def convert(model: keras.Model, int8: bool = False, calibration: np.ndarray | None = None) -> bytes:
    """`model` as a LiteRT graph: float32, or int8 with the activations' ranges fixed on `calibration` (model-size
    float32 inputs; default calibration_inputs)."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if int8:  # float input and output around int8 kernels, so the graph is called as the float32 one is
        calibration = calibration_inputs(model) if calibration is None else calibration
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([calibration[i:i + 1]] for i in range(len(calibration)))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    with contextlib.redirect_stdout(io.StringIO()):  # Keras' export prints every captured variable
        return converter.convert()


class LiteRTRunner:
    """One model as a LiteRT interpreter (XNNPACK, all cores); call it on a float32 batch. int8: the litert_int8
    engine's graph."""

    def __init__(self, model: keras.Model, cache: Path | None = None, int8: bool = False):
        cache = cache_dir() if cache is None else cache
        path = cache / f"{_graph_key(model, int8)}.tflite"
        try:
            self._attach(self._interpreter(path.read_bytes()))
            self._check()
            self.cached = True
        except (OSError, ValueError, RuntimeError):  # not cached yet, or not a graph: convert, keep it for next time
            flat = convert(model, int8)
            self._attach(self._interpreter(flat))
            self._check()
            self.cached = False
            try:
                with atomic_path(path) as tmp:  # makes the folder too
                    tmp.write_bytes(flat)
            except (OSError, BrainsegError):  # a read-only or full cache only costs the next run a conversion
                pass

    @classmethod
    def from_graph(cls, flat: bytes) -> LiteRTRunner:
        """A runner for a graph converted elsewhere (the graphs benchmarks.quantisation compares)."""
        runner = cls.__new__(cls)
        runner.cached = False
        runner._attach(cls._interpreter(flat))
        runner._check()
        return runner

    def _attach(self, interpreter) -> None:
        self.interpreter = interpreter
        signature = self.interpreter.get_signature_runner()
        self.input = next(iter(signature.get_input_details().values()))["index"]
        # outputs are named output_0, output_1, ... in the model's order; the prediction is the last one
        outputs = signature.get_output_details()
        self.output = outputs[max(outputs, key=lambda name: int(name.rsplit("_", 1)[-1]))]["index"]
        self.shape = None
        self.lock = threading.Lock()  # one interpreter, and the web app serves sessions from several threads

    def _check(self) -> None:
        """One blank slice: a graph XNNPACK cannot prepare (doubleunet's in int8) fails here, where auto falls back
        to Keras, not in the middle of an evaluation."""
        detail = next(d for d in self.interpreter.get_input_details() if d["index"] == self.input)
        self._invoke(np.zeros([1, *(n if n > 0 else 32 for n in detail["shape_signature"][1:])], np.float32))

    @staticmethod
    def _interpreter(flat: bytes):
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter(model_content=flat, num_threads=os.cpu_count() or 1)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        with self.lock:
            return self._invoke(x)

    def _invoke(self, x: np.ndarray) -> np.ndarray:
        if x.shape != self.shape:
            self.interpreter.resize_tensor_input(self.input, list(x.shape))
            self.interpreter.allocate_tensors()
            self.shape = x.shape
        self.interpreter.set_tensor(self.input, np.ascontiguousarray(x, dtype=np.float32))
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self.output).copy()


def keras_runner(model: keras.Model):
    """On JAX, batches are padded with blank slices to a power-of-two size: XLA compiles once per batch shape,
    and patients' slice counts would otherwise make a new shape almost every time (the H100 evaluation spent
    most of its 100 s compiling). Slices are predicted independently, so the padding changes no prediction.
    TensorFlow without XLA runs any shape, where padding would only add work."""
    pad = keras.backend.backend() == "jax"

    def run(x):
        n = len(x)
        padded = 1 << max(n - 1, 0).bit_length() if pad else n
        if padded != n:
            x = np.concatenate([x, np.zeros((padded - n, *x.shape[1:]), x.dtype)])
        y = model.predict_on_batch(x)
        return np.asarray(y[-1] if isinstance(y, (list, tuple)) else y, dtype=np.float32)[:n]
    return run


def runner(model: keras.Model, engine: str):
    """A callable batch -> prediction; auto falls back (with a warning) from the int8 graph to the float32 one and
    from LiteRT to Keras where LiteRT cannot run a graph."""
    tries = _litert_tries(model, engine)
    runners = _LITERT.setdefault(model, {}) if tries else {}
    for name in tries:
        if name not in runners or (runners[name] is None and engine != "auto"):
            try:
                runners[name] = LiteRTRunner(model, int8=name == "litert_int8")
            except Exception as err:  # an op LiteRT lacks, a graph XNNPACK refuses, or ai-edge-litert missing
                if engine != "auto":
                    other = " (or litert, its float32 graph)" if name == "litert_int8" else ""
                    raise BrainsegError(f"model '{model.name}' cannot run on LiteRT as {name} ({type(err).__name__}: "
                                        f"{err}); set evaluate.engine: keras{other} in params.yaml") from err
                fallback = "its float32 graph" if name == "litert_int8" else "Keras"
                reason = str(err).strip().split("\n")[0][:200]
                warnings.warn(f"LiteRT cannot run model '{model.name}' as {name} ({type(err).__name__}: {reason}); "
                              f"using {fallback}")
                runners[name] = None  # auto: do not retry the conversion on every batch
        if runners[name] is not None:
            return runners[name]
    return keras_runner(model)
