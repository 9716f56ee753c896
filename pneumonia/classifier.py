"""A trained model with its card: what evaluate, predict and the web app load.

The card (`model.json` beside the `.keras` file) says how to preprocess, the Platt
calibration and the thresholds; `XrayClassifier` applies all three, so every caller gets
the same probability for the same image.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pneumonia.evaluation import platt
from pneumonia.preprocessing import Source, normalize, preprocess

SHIPPED_MODEL_DIR = Path(__file__).resolve().parent.parent / "model"
CARD_NAME = "model.json"


class ModelLoadError(RuntimeError):
    """The model or its card is missing or unreadable; the message says which and where."""


def find_card(model_path: str | Path) -> tuple[Path, dict]:
    """A model directory or `.keras` file -> (path of the .keras file, card)."""
    path = Path(model_path)
    if not path.exists():
        # Not path.with_name(...): for a missing folder that would look for a card beside it.
        raise ModelLoadError(f"No model folder or .keras file {path}: train a model with `python -m pneumonia train`.")
    card_path = path / CARD_NAME if path.is_dir() else path.with_name(CARD_NAME)
    if not card_path.is_file():
        raise ModelLoadError(f"No model card {card_path}: train a model with `python -m pneumonia train`.")
    try:
        card = json.loads(card_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"The model card {card_path} is unreadable: {err}") from None
    if not isinstance(card, dict):
        raise ModelLoadError(f"The model card {card_path} is not a JSON object.")
    if path.suffix == ".keras":
        keras_path = path
    elif isinstance(card.get("file"), str) and card["file"]:
        keras_path = card_path.with_name(card["file"])
    else:
        raise ModelLoadError(f"The model card {card_path} does not name its model file (\"file\").")
    if not keras_path.is_file():
        raise ModelLoadError(f"The model file {keras_path} named by {card_path} is missing.")
    return keras_path, card


class XrayClassifier:
    """Loads once; `probabilities` takes preprocessed batches, `predict_source` raw images."""

    def __init__(self, model_path: str | Path = SHIPPED_MODEL_DIR):
        import keras

        self.keras_path, self.card = find_card(model_path)
        try:
            self.model = keras.saving.load_model(self.keras_path, compile=False)
        except Exception as err:  # Keras raises several types for a bad file
            raise ModelLoadError(f"The model file {self.keras_path} could not be loaded: {err}") from None
        # `input`, not `inputs`: called with a plain array, a one-element input list warns on every call
        self.logit_model = keras.Model(self.model.input, self.model.get_layer("logit").output)
        self.preprocessing = self.card["preprocessing"]
        calibration = self.card.get("calibration", {})
        self.platt = (float(calibration.get("slope", 1.0)), float(calibration.get("intercept", 0.0)))
        self.thresholds = {k: float(v) for k, v in self.card["thresholds"].items() if k in ("default", "screening")}
        self.name = self.card.get("name", self.keras_path.stem)

    @property
    def image_size(self) -> int:
        return int(self.preprocessing["image_size"])

    def calibrated(self, logits) -> np.ndarray:
        """Raw logits -> calibrated probability of PNEUMONIA."""
        return platt(logits, *self.platt)

    def logits(self, inputs: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """float32 (N, S, S, 3) -> raw logits (N,)."""
        out = [
            np.asarray(self.logit_model(inputs[i : i + batch_size], training=False)).reshape(-1)
            for i in range(0, len(inputs), batch_size)
        ]
        return np.concatenate(out) if out else np.zeros(0)

    def probabilities_from_pixels(self, pixels: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """uint8 (N, S, S) from `xray_pixels` -> calibrated probabilities (N,)."""
        out = [
            self.logits(normalize(pixels[i : i + batch_size], self.preprocessing["normalization"]), batch_size)
            for i in range(0, len(pixels), batch_size)
        ]
        return self.calibrated(np.concatenate(out) if out else np.zeros(0))

    def predict_source(self, source: Source) -> float:
        """One image (bytes or path) -> calibrated probability."""
        inputs = preprocess(source, self.preprocessing)[None]
        return float(self.calibrated(self.logits(inputs))[0])

    def labels(self, probability: float) -> dict[str, str]:
        """The class at each threshold."""
        return {name: ("PNEUMONIA" if probability >= t else "NORMAL") for name, t in self.thresholds.items()}
