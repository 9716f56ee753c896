"""What runs the model: ONNX Runtime on the exported graphs, or Keras/TensorFlow on the `.keras` file.

Both give the same two calls (the graphs of `pneumonia.serving.keras_graphs`):

    forward(float32 (N, S, S, 3)) -> pooled features (N, d), raw logits (N,)
    explain(float32 (1, S, S, 3)) -> raw logit, signed Grad-CAM (h, w), pooled features (d,)

The runtime is chosen once, at load: PNEUMONIA_RUNTIME=onnx, =keras, or unset (onnx when the
export beside the model is present and was made from this very `.keras` file, else keras). The
serving install (`requirements.txt`) has ONNX Runtime and no TensorFlow.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np

from pneumonia.errors import ModelLoadError
from pneumonia.serving.card import Export, ModelCard, file_sha256

EXPLAIN_FILE, FORWARD_FILE, WEIGHTS_FILE = "explain.onnx", "forward.onnx", "weights.onnx.data"
ONNX_OPSET = 17
RUNTIMES = ("onnx", "keras")
RUNTIME_ENV = "PNEUMONIA_RUNTIME"
THREADS_ENV = "PNEUMONIA_RUNTIME_THREADS"
# Threads ONNX Runtime gives one model call (PNEUMONIA_RUNTIME_THREADS): both cores of a small
# instance. With the web app's 2 model slots, 2 threads shorten an upload against 1 for slightly fewer
# uploads a second from 8 clients: docs/benchmarks.md, "Threads and model slots", has the figures.
DEFAULT_THREADS = 2
# Whether ONNX Runtime's pool threads spin waiting for work between a call's operators
# (PNEUMONIA_RUNTIME_SPINNING=1 or 0). Off by default: with both cores to itself the app's model pass
# is faster spinning (a DenseNet121 pass is hundreds of short operators, each waking the threads), but
# with the cores shared (other processes, as on a multi-tenant dyno) a spinning thread burns the time
# its sibling waits for, and the pass is slower than not spinning: docs/benchmarks.md, "ONNX Runtime's
# spinning", has the figures. Set it on an instance whose cores are the app's own. Spinning, the
# threads stop when a call returns (session.force_spinning_stop), never between calls.
SPINNING_ENV = "PNEUMONIA_RUNTIME_SPINNING"
SPINNING_DEFAULT = False


def export_problem(keras_path: Path, card: ModelCard, keras_sha256: str) -> str | None:
    """Why the ONNX export beside the model cannot be served, or None when it is present and current."""
    folder = keras_path.parent
    if card.export is None:
        return f"the model in {folder} has no ONNX export"
    if card.export.keras_sha256 != keras_sha256:
        return f"the ONNX export in {folder} was made from another {keras_path.name} (its fingerprint differs)"
    for entry in card.export.files.values():
        path = folder / entry.file
        if not path.is_file():
            return f"the export file {path} is missing"
        if file_sha256(path) != entry.sha256:
            return f"the export file {path} is not the one the card records (corrupt or changed)"
    return None


class OnnxModel:
    """The exported graphs on ONNX Runtime's CPU provider; safe to call from several threads."""

    name = "onnx"
    note = None  # why this runtime serves instead of the other, when it was not asked for

    def __init__(
        self, folder: Path, section: Export, threads: int = DEFAULT_THREADS, spinning: bool = SPINNING_DEFAULT
    ):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        options.add_session_config_entry("session.force_spinning_stop", "1")
        self.spinning = spinning
        self.folder, self.section, self.options = folder, section, options
        # The forward graph (batches without Grad-CAM) is loaded on its first use: a worker that only screens
        # single uploads never holds it (its weights, laid out again by ONNX Runtime: docs/benchmarks.md).
        self.sessions = {"explain": self._session("explain")}
        self._forward_loading = threading.Lock()
        cam, features = (self._output(name) for name in ("cam", "features"))
        self.map_size = tuple(int(n) for n in cam.shape[1:3])
        self.feature_dim = int(features.shape[-1])
        self.image_size = int(self.sessions["explain"].get_inputs()[0].shape[1])
        self.threads = threads
        self.layer = section.gradcam_layer
        self.explain(np.zeros((1, self.image_size, self.image_size, 3), np.float32))  # allocates now

    def _session(self, name: str):
        import onnxruntime

        path = self.folder / self.section.files[name].file
        try:
            return onnxruntime.InferenceSession(str(path), self.options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own types for a bad graph
            raise ModelLoadError(f"ONNX Runtime could not load {path}: {err}") from None

    def _forward_session(self):
        if "forward" not in self.sessions:
            with self._forward_loading:
                if "forward" not in self.sessions:
                    self.sessions["forward"] = self._session("forward")
        return self.sessions["forward"]

    def _output(self, name: str):
        return next(o for o in self.sessions["explain"].get_outputs() if o.name == name)

    def forward(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if len(inputs) == 0:
            return np.zeros((0, self.feature_dim), np.float32), np.zeros(0, np.float32)
        features, logits = self._forward_session().run(["features", "logits"], {"xray": inputs})
        return features, logits

    def explain(self, inputs: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        logit, cam, features = self.sessions["explain"].run(["logit", "cam", "features"], {"xray": inputs})
        return float(logit[0]), cam[0], features[0]


class KerasModel:
    """The `.keras` file through Keras/TensorFlow, as concrete functions traced once (no tracing on
    a request); safe to call from several threads."""

    name = "keras"
    note = None

    def __init__(self, keras_path: Path, card: ModelCard):
        import keras

        from pneumonia.serving.keras_graphs import explain_function, forward_function

        try:
            self.model = keras.saving.load_model(keras_path, compile=False)
        except Exception as err:  # Keras raises several types for a bad file
            raise ModelLoadError(f"The model file {keras_path} could not be loaded: {err}") from None
        self.image_size = card.preprocessing.image_size
        self.layer = card.gradcam.layer
        self._explain = explain_function(self.model, self.layer, self.image_size)
        self._forward = forward_function(self.model, self.image_size)
        self.map_size = tuple(int(n) for n in self.model.get_layer(self.layer).output.shape[1:3])
        self.feature_dim = int(self.model.get_layer("logit").input.shape[-1])
        self.threads = None
        self.explain(np.zeros((1, self.image_size, self.image_size, 3), np.float32))  # allocates now

    def forward(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if len(inputs) == 0:
            return np.zeros((0, self.feature_dim), np.float32), np.zeros(0, np.float32)
        out = self._forward(np.asarray(inputs, np.float32))
        return out["features"].numpy(), out["logits"].numpy()

    def explain(self, inputs: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        out = self._explain(np.asarray(inputs, np.float32))
        return float(out["logit"][0]), out["cam"].numpy()[0], out["features"].numpy()[0]


def spinning_setting() -> bool:
    """PNEUMONIA_RUNTIME_SPINNING: 1/true/yes or 0/false/no; unset, SPINNING_DEFAULT."""
    value = os.environ.get(SPINNING_ENV, "").strip().lower()
    if value in ("", "default"):
        return SPINNING_DEFAULT
    if value not in ("1", "true", "yes", "0", "false", "no"):
        raise ModelLoadError(f"{SPINNING_ENV}={value}: say 1 or 0 (or leave it unset)")
    return value in ("1", "true", "yes")


def load_runtime(keras_path: Path, card: ModelCard, keras_sha256: str, choice: str | None = None, threads=None):
    """The runtime `choice` (or PNEUMONIA_RUNTIME) names, loaded; ModelLoadError saying what to do when it cannot be."""
    choice = (choice or os.environ.get(RUNTIME_ENV) or "auto").lower()
    if choice not in (*RUNTIMES, "auto"):
        raise ModelLoadError(f"{RUNTIME_ENV}={choice}: choose one of {', '.join(RUNTIMES)} (or leave it unset)")
    problem = export_problem(keras_path, card, keras_sha256)
    export_command = f"`python -m pneumonia export {keras_path.parent}`"
    if choice == "onnx" or (choice == "auto" and problem is None):
        if problem is not None:
            raise ModelLoadError(f"The onnx runtime was asked for, but {problem}: run {export_command}.")
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise ModelLoadError("The onnx runtime needs onnxruntime: pip install -r requirements.txt") from None
        threads = threads or int(os.environ.get(THREADS_ENV) or DEFAULT_THREADS)
        return OnnxModel(keras_path.parent, card.export, threads, spinning_setting())
    try:
        import keras  # noqa: F401
    except ImportError:
        because = f"{problem}, and " if problem else ""
        raise ModelLoadError(
            f"Cannot serve: {because}the keras runtime needs TensorFlow, which this install does not have "
            f"(the serving install is slim). Run {export_command} where the training requirements are installed "
            "(pip install -r requirements-train.txt), or install them here."
        ) from None
    runtime = KerasModel(keras_path, card)
    runtime.note = problem  # why not onnx, for /healthz and /model
    return runtime
