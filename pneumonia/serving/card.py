"""The model card: `model.json` beside the `.keras` file, the one place that says how the model
was made, on what, how to preprocess its input, how its logits are calibrated and where its
thresholds are.

A card is a typed `ModelCard`: `train` builds one, `fit-ood`, `export` and `calibrate` change a
copy (`dataclasses.replace`), `write_card` writes it, and `ModelCard.load` reads one back, checking
every field once, so that the rest of the code reads attributes and a bad card is refused at
start-up with the file and the field named. Sections that are reports (the validation metrics, the
gate's fit, a recalibration's figures) stay JSON objects inside the typed card.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pneumonia.errors import ModelLoadError

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


# What a card's "contrast" may say. "equalize": global histogram equalisation of the model's square
# (model/report/levers.md: it maps each image's grey levels onto a flat histogram, so exposure and how
# much margin a frame holds stop carrying the label).
CONTRASTS = ("none", "equalize")


@dataclass(frozen=True)
class Normalization:
    scale: float
    mean: list[float]
    std: list[float]


@dataclass(frozen=True)
class Preprocessing:
    image_size: int
    normalization: Normalization
    contrast: str = "none"  # one of CONTRASTS
    colour: str = "greyscale, replicated to 3 channels"
    resize: str = "stretched to a square (as the training copy of the data set), Pillow bilinear with antialiasing"
    bit_depth: str = "16-bit images scaled by their full range into 0..255"

    def __post_init__(self):
        if self.contrast not in CONTRASTS:
            raise CardFieldError(f"contrast {self.contrast!r} is not one of {', '.join(CONTRASTS)}")


@dataclass(frozen=True)
class Calibration:
    slope: float
    intercept: float
    ece_before: float
    ece_after: float
    method: str = PLATT_METHOD


@dataclass(frozen=True)
class Thresholds:
    default: float
    screening: float
    target_sensitivity: float
    chosen_on: str = "validation part of train/ (patient-grouped); calibrated probabilities"
    rule: str = THRESHOLD_RULE
    rule_name: str = "validation"  # training/threshold_rules.py: RULES

    def as_dict(self) -> dict[str, float]:
        """{"default": ..., "screening": ...}: the two thresholds a label is read at."""
        return {"default": self.default, "screening": self.screening}


@dataclass(frozen=True)
class Gradcam:
    layer: str
    map_size: list[int]


@dataclass(frozen=True)
class DataRecord:
    """The training and validation parts of train/: counts per class and fingerprints."""

    source: str
    train: dict[str, int]
    validation: dict[str, int]
    val_fraction: float
    train_fingerprint: str
    validation_fingerprint: str


# Where a run's weights started: the card says which, so a fine-tune of a from-scratch model never
# reads as pretrained weights.
STARTS = ("random initialisation", "ImageNet weights", "a weights file", "a trained model")


@dataclass(frozen=True)
class Run:
    """One training run in the model's lineage: where its weights started and how it was trained."""

    started_from: str  # one of STARTS
    command: str
    train_fingerprint: str
    epochs_run: int
    best_epoch: int | None
    wall_time_s: float
    init_sha256: str | None = None  # the weights file or model it started from

    def __post_init__(self):
        if self.started_from not in STARTS:
            raise CardFieldError(f"started_from {self.started_from!r} is not one of {', '.join(STARTS)}")


@dataclass(frozen=True)
class Training:
    config: dict  # training.config.TrainConfig as it was given (a record, not read back as options)
    epochs_run: int
    best_epoch: int | None
    command: str
    wall_time_s: float
    optimizer: str
    loss: str
    weights: str  # which epoch's weights are the model
    schedule: str | None = None  # the learning-rate schedule, when the run had one (training/schedule.py)


@dataclass(frozen=True)
class ExportFile:
    file: str
    sha256: str


@dataclass(frozen=True)
class Export:
    """The ONNX graphs beside the model (training/export.py) and what they were checked against."""

    format: str
    opset: int
    keras_sha256: str
    files: dict[str, ExportFile]
    gradcam_layer: str
    agreement_with_keras: dict
    versions: dict[str, str]


@dataclass(frozen=True)
class ModelCard:
    name: str
    architecture: str
    file: str
    input_size: int
    class_names: list[str]
    preprocessing: Preprocessing
    calibration: Calibration
    thresholds: Thresholds
    validation: dict  # evaluation.metrics.evaluate_predictions on the validation part
    data: DataRecord
    training: Training
    lineage: list[Run]  # every run from the first weights to these, oldest first
    gradcam: Gradcam
    versions: dict[str, str]
    held_out_series: dict | None = None  # train --hold-out-series: the unseen series' specificity
    selection: dict | None = None  # why this model ships (model/ only)
    ood: dict | None = None  # the gate's fit (training/gate_fitting.py)
    export: Export | None = None
    recalibration: dict | None = None  # calibrate: the site sample's figures and what it replaced
    expectations: dict | None = None  # what the proxies expect at a new site (training/threshold_rules.py)

    @classmethod
    def load(cls, path: str | Path) -> ModelCard:
        """The card at `path`, checked field by field; ModelLoadError naming the file and the field."""
        path = Path(path)
        try:
            content = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ModelLoadError(f"The model card {path} is unreadable: {err}") from None
        try:
            return _typed(cls, content, "")
        except CardFieldError as err:
            raise ModelLoadError(f"The model card {path} is not valid: {err}") from None

    @property
    def probability_floor(self) -> float:
        """The smallest probability (and 1 minus the largest) the calibration data can back: one image of
        the smaller class of the sample it was fitted on, rounded up to a whole percent."""
        counts = (self.recalibration or {}).get("site_sample", {}).get("counts") or self.data.validation
        return math.ceil(100 / max(1, min(counts.values(), default=1))) / 100

    @property
    def metrics_at_thresholds(self) -> tuple[str, dict]:
        """(where the thresholds were chosen, evaluate_predictions' figures there at them): the site sample's
        after a recalibration (optimistic: the same images), else the validation part's."""
        if self.recalibration:
            return "site sample", self.recalibration["metrics"]
        return "validation set", self.validation

    def shown_probability(self, probability: float) -> str:
        """The calibrated probability as a person should read it: "> 99 %" beyond what the data backs."""
        floor = self.probability_floor
        if probability < floor:
            return f"< {100 * floor:g} %"
        if probability > 1 - floor:
            return f"> {100 * (1 - floor):g} %"
        return f"{100 * probability:.1f} %"

    def to_dict(self) -> dict:
        card = dataclasses.asdict(self)
        return {key: value for key, value in card.items() if value is not None}


class CardFieldError(ValueError):
    """A field of a card that is missing, unknown or of the wrong type; the message names it."""


def _typed(kind, value, where: str):
    """`value` (parsed JSON) as `kind` (a card dataclass or a typing annotation), or CardFieldError."""
    name = where or "the card"
    origin = typing.get_origin(kind)
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, dict):
            raise CardFieldError(f"{name} should be an object")
        fields = {f.name: f for f in dataclasses.fields(kind)}
        unknown = sorted(set(value) - set(fields))
        if unknown:
            raise CardFieldError(f"unknown field {_join(where, unknown[0])}")
        hints = typing.get_type_hints(kind)
        given = {}
        for key, spec in fields.items():
            if key in value:
                given[key] = _typed(hints[key], value[key], _join(where, key))
            elif spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
                raise CardFieldError(f"field {_join(where, key)} is missing")
        try:
            return kind(**given)
        except CardFieldError as err:  # a dataclass's own check (__post_init__)
            raise CardFieldError(f"{name}: {err}") from None
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        return _typed(next(option for option in options if option is not type(None)), value, where)
    if origin is list:
        if not isinstance(value, list):
            raise CardFieldError(f"{name} should be a list")
        (item,) = typing.get_args(kind)
        return [_typed(item, entry, f"{where}[{i}]") for i, entry in enumerate(value)]
    if origin is dict or kind is dict:
        if not isinstance(value, dict):
            raise CardFieldError(f"{name} should be an object")
        args = typing.get_args(kind)
        return {k: _typed(args[1], v, _join(where, k)) for k, v in value.items()} if args else value
    return _scalar(kind, value, name)


def _scalar(kind, value, name: str):
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind in (str, bool) and isinstance(value, kind):
        return value
    raise CardFieldError(f"{name} should be {kind.__name__}, not {json.dumps(value)[:40]}")


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_card(folder: str | Path, card: ModelCard) -> Path:
    """Writes FOLDER/model.json whole or not at all (a reader never sees half a card)."""
    path = Path(folder) / CARD_NAME
    partial = path.with_name(f".{CARD_NAME}.{os.getpid()}.partial")
    partial.write_text(json.dumps(card.to_dict(), indent=2) + "\n")
    os.replace(partial, path)
    return path
