"""A trained model with its card: what evaluate, predict and the web app load.

The card (`model.json` beside the `.keras` file) says how to preprocess, the Platt
calibration and the thresholds; `XrayClassifier` applies all three, so every caller gets
the same probability for the same image.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np

from pneumonia.card import CARD_NAME
from pneumonia.dataset import NORMAL, PNEUMONIA
from pneumonia.evaluation import platt
from pneumonia.ood import Verdict, load_gate_for
from pneumonia.preprocessing import Source, decode_xray, model_input, preprocess, resize_xray

SHIPPED_MODEL_DIR = Path(__file__).resolve().parent.parent / "model"


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
        raise ModelLoadError(f'The model card {card_path} does not name its model file ("file").')
    if not keras_path.is_file():
        raise ModelLoadError(f"The model file {keras_path} named by {card_path} is missing.")
    return keras_path, card


class XrayClassifier:
    """Loads once; `probabilities` takes preprocessed batches, `predict_source` raw images."""

    def __init__(self, model_path: str | Path = SHIPPED_MODEL_DIR):
        import keras

        from pneumonia.models import features_and_logit_model

        self.keras_path, self.card = find_card(model_path)
        try:
            self.model = keras.saving.load_model(self.keras_path, compile=False)
        except Exception as err:  # Keras raises several types for a bad file
            raise ModelLoadError(f"The model file {self.keras_path} could not be loaded: {err}") from None
        self.feature_model = features_and_logit_model(self.model)  # [features (the gate's input), logit]
        self.gate, self.gate_status = load_gate_for(self.keras_path)
        self.preprocessing = self.card["preprocessing"]
        calibration = self.card.get("calibration", {})
        self.platt = (float(calibration.get("slope", 1.0)), float(calibration.get("intercept", 0.0)))
        self.thresholds = {k: float(v) for k, v in self.card["thresholds"].items() if k in ("default", "screening")}
        self.name = self.card.get("name", self.keras_path.stem)
        self._forward, self._trace_lock = None, threading.Lock()

    @property
    def image_size(self) -> int:
        return int(self.preprocessing["image_size"])

    def calibrated(self, logits) -> np.ndarray:
        """Raw logits -> calibrated probability of PNEUMONIA."""
        return platt(logits, *self.platt)

    def features_and_logits(self, inputs: np.ndarray, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
        """float32 (N, S, S, 3) -> pooled features (N, d) and raw logits (N,): one pass per batch."""
        forward = self.compiled_forward()
        features, logits = [], []
        for i in range(0, len(inputs), batch_size):
            f, z = forward(inputs[i : i + batch_size])
            features.append(f)
            logits.append(z)
        if not logits:
            return np.zeros((0, int(self.feature_model.outputs[0].shape[-1]))), np.zeros(0)
        return np.concatenate(features), np.concatenate(logits)

    def compiled_forward(self):
        """float32 (N, S, S, 3) -> (features (N, d), logits (N,)) as NumPy, through one TensorFlow
        concrete function for any N, traced on first use (a few seconds; call it at start-up to
        pay them then). Keras' eager call of DenseNet121 spends ~0.5 s a call dispatching its
        400-odd layers from Python; the concrete function took ~55 ms for one image and ~36 ms an
        image in a batch of 16 on 2 CPU cores. Safe to call from several threads at once."""
        with self._trace_lock:
            if self._forward is None:
                self._forward = _trace_forward(self.feature_model, self.image_size)
        return self._forward

    def logits(self, inputs: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """float32 (N, S, S, 3) -> raw logits (N,)."""
        return self.features_and_logits(inputs, batch_size)[1]

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

    def screen_source(self, source: Source) -> tuple[float | None, Verdict | None]:
        """One image (bytes or path) -> (calibrated probability, gate verdict).

        With a gate, a refused image gives (None, the rejection); without one the verdict is None.
        """
        xray, stats = decode_xray(source)
        if self.gate is not None:
            refused = self.gate.check_pixels(stats)
            if refused is not None:
                return None, refused
        inputs = model_input(resize_xray(xray, self.image_size), self.preprocessing)[None]
        features, logits = self.features_and_logits(inputs)
        verdict = self.gate.check_features(features[0]) if self.gate is not None else None
        if verdict is not None and not verdict.accepted:
            return None, verdict
        return float(self.calibrated(logits)[0]), verdict

    def predict_source(self, source: Source) -> float:
        """One image (bytes or path) -> calibrated probability, whatever the gate would say."""
        inputs = preprocess(source, self.preprocessing)[None]
        return float(self.calibrated(self.logits(inputs))[0])

    def labels(self, probability: float) -> dict[str, str]:
        """The class at each threshold."""
        return {name: PNEUMONIA if probability >= t else NORMAL for name, t in self.thresholds.items()}


def _trace_forward(feature_model, image_size: int):
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec((None, image_size, image_size, 3), tf.float32)])
    def forward(inputs):
        features, logits = feature_model(inputs, training=False)
        return features, tf.reshape(logits, [-1])

    concrete = forward.get_concrete_function()

    def run(inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        features, logits = concrete(tf.constant(inputs, tf.float32))
        return features.numpy(), logits.numpy()

    run(np.zeros((1, image_size, image_size, 3), np.float32))  # allocates now, not on the first real call
    return run
