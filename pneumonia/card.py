"""The model card: `model.json` beside the `.keras` file, the one place that says how the model
was trained, on what, how to preprocess its input, how its logits are calibrated and where its
thresholds are. `train` builds it as a `ModelCard`; `fit-ood` and `calibrate` add to a copy; all
three write it with `write_card`."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

CARD_NAME = "model.json"

PLATT_METHOD = "Platt scaling, sigmoid(slope * logit + intercept), fitted on the validation logits"
THRESHOLD_RULE = (
    "default maximises Youden's J (sensitivity + specificity - 1); screening is the highest "
    "threshold whose sensitivity reaches the target, and never above the default"
)


def sigmoid(logits):
    return 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))


def platt(logits, slope: float, intercept: float) -> np.ndarray:
    """Raw logits -> calibrated probabilities, as the card's `calibration` says."""
    return sigmoid(slope * np.asarray(logits, dtype=np.float64) + intercept)


@dataclass
class Calibration:
    slope: float
    intercept: float
    ece_before: float
    ece_after: float
    method: str = PLATT_METHOD


@dataclass
class Thresholds:
    default: float
    screening: float
    target_sensitivity: float
    chosen_on: str = "validation part of train/ (patient-grouped); calibrated probabilities"
    rule: str = THRESHOLD_RULE


@dataclass
class ModelCard:
    name: str
    architecture: str
    file: str
    input_size: int
    class_names: list[str]
    preprocessing: dict
    init: dict
    calibration: Calibration
    thresholds: Thresholds
    validation: dict  # evaluation.evaluate_predictions on the validation part
    data: dict  # counts and fingerprints of the training and validation parts
    training: dict  # the config, epochs, command, wall time, optimizer, loss
    gradcam: dict  # {"layer", "map_size"}
    versions: dict
    extra: dict = field(default_factory=dict)  # sections added later: "ood", "recalibration"

    def to_dict(self) -> dict:
        card = asdict(self)
        extra = card.pop("extra")
        calibration = card["calibration"]
        card["calibration"] = {"method": calibration.pop("method"), **calibration}  # the method first, to read
        return {**card, **extra}


def write_card(folder: str | Path, card: ModelCard | dict) -> Path:
    """Writes FOLDER/model.json whole or not at all (a reader never sees half a card)."""
    path = Path(folder) / CARD_NAME
    content = card.to_dict() if isinstance(card, ModelCard) else card
    partial = path.with_name(f".{CARD_NAME}.{os.getpid()}.partial")
    partial.write_text(json.dumps(content, indent=2) + "\n")
    os.replace(partial, path)
    return path
