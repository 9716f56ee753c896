"""A trained model with its card: what evaluate, predict and the web app load.

The card (`model.json` beside the `.keras` file) says how to preprocess, the Platt
calibration and the thresholds; `XrayClassifier` applies all three, so every caller gets
the same probability for the same image. The model itself runs on the runtime chosen at load
(`pneumonia.serving.runtime`: ONNX Runtime on the export, or Keras).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pneumonia.errors import ModelLoadError
from pneumonia.labels import NORMAL, PNEUMONIA
from pneumonia.serving.card import CARD_NAME, ModelCard, file_sha256, platt
from pneumonia.serving.gate import load_gate_for
from pneumonia.serving.preprocessing import model_input
from pneumonia.serving.runtime import load_runtime

_PACKAGE = Path(__file__).resolve().parent.parent
# A wheel carries the repository's model/ as pneumonia/shipped_model (pyproject.toml); a checkout has model/.
SHIPPED_MODEL_DIR = next(
    (folder for folder in (_PACKAGE / "shipped_model", _PACKAGE.parent / "model") if folder.is_dir()),
    _PACKAGE.parent / "model",
)
MODEL_PATH_ENV = "PNEUMONIA_MODEL_PATH"


def default_model_path() -> Path:
    """PNEUMONIA_MODEL_PATH when set (the web app reads it too), else the shipped model."""
    return Path(os.environ.get(MODEL_PATH_ENV) or SHIPPED_MODEL_DIR)


def find_card(model_path: str | Path) -> tuple[Path, ModelCard]:
    """A model directory or `.keras` file -> (path of the .keras file, card)."""
    path = Path(model_path)
    if not path.exists():
        # Not path.with_name(...): for a missing folder that would look for a card beside it.
        raise ModelLoadError(f"No model folder or .keras file {path}: train a model with `python -m pneumonia train`.")
    card_path = path / CARD_NAME if path.is_dir() else path.with_name(CARD_NAME)
    if not card_path.is_file():
        raise ModelLoadError(f"No model card {card_path}: train a model with `python -m pneumonia train`.")
    card = ModelCard.load(card_path)
    keras_path = path if path.suffix == ".keras" else card_path.with_name(card.file)
    if not keras_path.is_file():
        raise ModelLoadError(f"The model file {keras_path} named by {card_path} is missing.")
    return keras_path, card


class XrayClassifier:
    """Loads once; `features_and_logits` and `explain` take model inputs, `features_and_logits_of_pixels` model squares.
    `runtime` ("onnx" or "keras") overrides PNEUMONIA_RUNTIME. Safe to call from several threads."""

    def __init__(self, model_path: str | Path = SHIPPED_MODEL_DIR, runtime: str | None = None, threads=None):
        self.keras_path, self.card = find_card(model_path)
        self.keras_sha256 = file_sha256(self.keras_path)
        self.runtime = load_runtime(self.keras_path, self.card, self.keras_sha256, runtime, threads)
        self.gate, self.gate_status = load_gate_for(self.keras_path, self.keras_sha256)
        self.preprocessing = self.card.preprocessing
        self.platt = (self.card.calibration.slope, self.card.calibration.intercept)
        self.thresholds = self.card.thresholds.as_dict()
        self.name = self.card.name

    def serving(self) -> dict:
        """Which runtime serves and the fingerprints it checked: what /healthz and /model show."""
        export = self.card.export if self.runtime.name == "onnx" else None
        return {
            "runtime": self.runtime.name,
            "keras_sha256": self.keras_sha256,
            "export_sha256": {k: v.sha256 for k, v in export.files.items()} if export else None,
            "note": self.runtime.note,
        }

    @property
    def image_size(self) -> int:
        return self.preprocessing.image_size

    def calibrated(self, logits) -> np.ndarray:
        """Raw logits -> calibrated probability of PNEUMONIA."""
        return platt(logits, *self.platt)

    def features_and_logits(self, inputs: np.ndarray, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
        """float32 (N, S, S, 3) -> pooled features (N, d) and raw logits (N,): one pass per batch."""
        parts = [self.runtime.forward(inputs[i : i + batch_size]) for i in range(0, len(inputs), batch_size)]
        if not parts:
            return self.runtime.forward(inputs[:0])
        return np.concatenate([f for f, _ in parts]), np.concatenate([z for _, z in parts])

    def explain(self, inputs: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        """float32 (1, S, S, 3) -> (raw logit, signed Grad-CAM (h, w), pooled features (d,)): one pass."""
        return self.runtime.explain(inputs)

    def features_and_logits_of_pixels(self, pixels: np.ndarray, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (N, S, S) from `xray_pixels` -> (N, d), (N,); normalised a batch at a time."""
        parts = [
            self.features_and_logits(model_input(pixels[i : i + batch_size], self.preprocessing))
            for i in range(0, len(pixels), batch_size)
        ]
        if not parts:
            return self.features_and_logits(np.zeros((0, self.image_size, self.image_size, 3), np.float32))
        return np.concatenate([f for f, _ in parts]), np.concatenate([z for _, z in parts])

    def probabilities_from_pixels(self, pixels: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """uint8 (N, S, S) from `xray_pixels` -> calibrated probabilities (N,)."""
        return self.calibrated(self.features_and_logits_of_pixels(pixels, batch_size)[1])

    def labels(self, probability: float) -> dict[str, str]:
        """The class at each threshold."""
        return {name: PNEUMONIA if probability >= t else NORMAL for name, t in self.thresholds.items()}
