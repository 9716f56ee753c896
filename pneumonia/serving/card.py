"""The model card: `model.json` beside the `.keras` file, the one place that says how the model
was made, on what, how to preprocess its input, how its logits are calibrated and where its
thresholds are.

A card is a typed `ModelCard`: `train` builds one, `fit-ood`, `export` and `calibrate` change a
copy (`dataclasses.replace`), `write_card` writes it, and `ModelCard.load` reads one back, checking
every field once, so that the rest of the code reads attributes and a bad card is refused at
start-up with the file and the field named: the training options (`TrainConfig`, which
`pneumonia.training.config` re-exports: the serving layer may not import training), the validation
metrics and a recalibration are records too. Sections that are free-form reports (the gate's fit,
the proxies' expectations, why the model ships) stay JSON objects inside the typed card.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from pneumonia.errors import ModelLoadError
from pneumonia.serving.drift_reference import MonitorReference
from pneumonia.serving.records import CardFieldError, as_json, optional, parsed_record

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


# --- What `train` was asked for ------------------------------------------------------------------


@dataclass
class TrainConfig:
    """What a training run can be asked for: the command line builds its parser from these names and
    defaults (pneumonia/cli/train.py), `training.fitting.train` takes one, and the card records it."""

    data_dir: str
    arch: str = "densenet121"
    out: str = "runs/densenet121"
    init: str = "imagenet"
    image_size: int = 128
    # The schedule (training/schedule.py): warm-up over warmup_fraction of the steps to learning_rate, cosine
    # to 0 over `epochs`. Batch 64 and 1e-3 as in the design check of issue 34 (docs/model.md, "How it was trained").
    epochs: int = 15
    batch_size: int = 64
    learning_rate: float = 1e-3
    warmup_fraction: float = 0.1
    val_fraction: float = 0.1
    seed: int = 42
    target_sensitivity: float = 0.98
    resume: bool = False
    cache_dir: str | None = "cache"
    augment: str = "standard"  # one of training.config.AUGMENTATIONS
    contrast: str = "none"  # one of CONTRASTS
    # Of the rules in RULES, the one that served the shifts and the originals no rule was chosen on best
    # (model/report/levers.md, "Threshold rules"): thresholds that hold when a chest is framed tighter.
    threshold_rule: str = "worst:framing"
    hold_out_series: str | None = None  # one of dataset.NORMAL_SERIES: kept out of training and validation

    RETIRED_FIELDS: ClassVar[dict[str, str]]  # RETIRED_OPTIONS below: accepted on load, dropped


# Options older versions of `train` took and recorded in their cards (git log -p pneumonia/training/config.py):
# a card that names one still loads, the option dropped (it no longer changes anything a reader of the card
# acts on); any other unknown option is refused, as a misspelt one would be.
RETIRED_OPTIONS = {
    "patience": "early stopping, replaced by the warm-up and cosine schedule over all epochs",
    "ema": "weight averaging, a retired lever (model/report/levers.md)",
    "label_smoothing": "a retired lever (model/report/levers.md)",
    "initial_epoch": "resume state, now kept in the checkpoint",
    "best_val_auc": "resume state, now kept in the checkpoint",
    "earlier_wall_time_s": "resume state, now kept in the checkpoint",
}
TrainConfig.RETIRED_FIELDS = RETIRED_OPTIONS


# --- The validation metrics (evaluation/metrics.py: evaluate_predictions) -----------------------------


@dataclass(frozen=True)
class ThresholdFigures:
    """evaluation.metrics.metrics_at_threshold: the figures at one threshold."""

    threshold: float
    accuracy: float
    precision: float
    recall: float
    specificity: float
    f1: float
    confusion_matrix: dict[str, int]  # tn, fp, fn, tp


@dataclass(frozen=True)
class Metrics:
    """The metrics.json schema: AUC, AP, loss, the figures at each threshold, 95 % intervals."""

    model: str
    split: str
    n: dict[str, int]  # images per class
    auc: float
    average_precision: float
    loss: float
    thresholds: dict[str, ThresholdFigures]  # "default", "screening"
    ci95: dict[str, list[float]]  # at the default threshold: auc, accuracy, recall, specificity
    # evaluation.recalibration.site_metrics: the intervals at each threshold as well
    ci95_by_threshold: dict[str, dict[str, list[float]]] | None = optional()

    @classmethod
    def of(cls, metrics: dict) -> Metrics:
        """evaluate_predictions' dict as a record (what the card holds)."""
        return parsed_record(cls, metrics)


# --- A recalibration (evaluation/recalibration.py) ------------------------------------------------


@dataclass(frozen=True)
class SiteSample:
    path_name: str  # the folder's last part (cards travel)
    counts: dict[str, int]
    fingerprint: str
    date: str  # ISO


@dataclass(frozen=True)
class Replaced:
    """What a recalibration replaced: the operating point before it, and the figures measured there."""

    calibration: Calibration
    thresholds: Thresholds
    expectations: dict | None = optional()
    held_out_series: dict | None = optional()
    recalibration: Recalibration | None = optional()  # a recalibrated model recalibrated again
    monitor: MonitorReference | None = optional()  # the drift monitor's reference before it


@dataclass(frozen=True)
class Recalibration:
    previous: Replaced
    site_sample: SiteSample
    metrics: Metrics  # on the site sample, at the new thresholds (optimistic: fitted on it)
    previous_metrics: Metrics  # on the site sample, at the previous thresholds
    warning: str | None
    command: str
    note: str


@dataclass(frozen=True)
class Training:
    config: TrainConfig  # the options the run was given
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
    validation: Metrics  # evaluation.metrics.evaluate_predictions on the validation part
    data: DataRecord
    training: Training
    lineage: list[Run]  # every run from the first weights to these, oldest first
    gradcam: Gradcam
    versions: dict[str, str]
    held_out_series: dict | None = optional()  # train --hold-out-series: the unseen series' specificity
    selection: dict | None = optional()  # why this model ships (model/ only)
    ood: dict | None = optional()  # the gate's fit (training/gate_fitting.py)
    export: Export | None = optional()
    recalibration: Recalibration | None = optional()  # calibrate: the site sample's figures, what it replaced
    expectations: dict | None = optional()  # what the proxies expect at a new site (training/threshold_rules.py)
    monitor: MonitorReference | None = optional()  # the drift monitor's reference (serving/drift.py)

    @classmethod
    def load(cls, path: str | Path) -> ModelCard:
        """The card at `path`, checked field by field; ModelLoadError naming the file and the field."""
        path = Path(path)
        try:
            content = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ModelLoadError(f"The model card {path} is unreadable: {err}") from None
        try:
            return parsed_record(cls, content)
        except CardFieldError as err:
            raise ModelLoadError(f"The model card {path} is not valid: {err}") from None

    @property
    def probability_floor(self) -> float:
        """The smallest probability (and 1 minus the largest) the calibration data can back: one image of
        the smaller class of the sample it was fitted on, rounded up to a whole percent."""
        counts = self.recalibration.site_sample.counts if self.recalibration else self.data.validation
        return math.ceil(100 / max(1, min(counts.values(), default=1))) / 100

    @property
    def metrics_at_thresholds(self) -> tuple[str, Metrics]:
        """(where the thresholds were chosen, evaluate_predictions' figures there at them): the site sample's
        after a recalibration (optimistic: the same images), else the validation part's."""
        if self.recalibration:
            return "site sample", self.recalibration.metrics
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
        return as_json(self)


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
