"""The model card: `model.json` beside the `.keras` file, the one place that says how the model
was made, on what, how to preprocess its input, how its logits are calibrated and where its
thresholds are.

A card is a typed `ModelCard`, pydantic dataclasses all the way down (serving/records.py): `train`
builds one, `fit-ood`, `export` and `calibrate` change a copy (`dataclasses.replace`, validated again),
`write_card` writes it, and `ModelCard.load` reads one back, validating every field once, so that the
rest of the code reads attributes and a bad card is refused at start-up with the file and the field
named: the training options (`TrainConfig`, which `pneumonia.training.config` re-exports: the serving
layer may not import training), the validation metrics, the independent evaluation and a recalibration
are records too. Sections that are free-form reports (the gate's fit, the proxies' expectations, why
the model ships) stay JSON objects inside the typed card: their writers and readers are report code
whose keys change with the report (docs/hooks.py reads them as dicts).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Literal, get_args

import numpy as np
from pydantic import field_validator, model_validator
from pydantic.dataclasses import dataclass

from pneumonia.errors import ModelLoadError
from pneumonia.serving.card_figures import IndependentEvaluation, Metrics
from pneumonia.serving.drift_reference import MonitorReference
from pneumonia.serving.records import (
    RECORD_CONFIG,
    CardFieldError,
    NotJsonError,
    as_json,
    optional,
    parsed_record,
    record,
)

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
Contrast = Literal["none", "equalize"]
CONTRASTS = get_args(Contrast)


@record
class Normalization:
    scale: float
    mean: list[float]
    std: list[float]


@record
class Preprocessing:
    image_size: int
    normalization: Normalization
    contrast: Contrast = "none"
    colour: str = "greyscale, replicated to 3 channels"
    resize: str = "stretched to a square (as the training copy of the data set), Pillow bilinear with antialiasing"
    bit_depth: str = "16-bit images scaled by their full range into 0..255"


@record
class Calibration:
    slope: float
    intercept: float
    ece_before: float
    ece_after: float
    method: str = PLATT_METHOD


@record
class LabelThresholds:
    """The two thresholds on the calibrated probability that a label is read at: `default`, and `screening`
    (the highest that keeps the target sensitivity); what the API answers beside each label."""

    default: float
    screening: float

    def as_dict(self) -> dict[str, float]:
        """{"default": ..., "screening": ...}: the two thresholds a label is read at."""
        return {"default": self.default, "screening": self.screening}


@record
class Thresholds(LabelThresholds):
    """The card's thresholds: the two a label is read at, the target they were chosen for, where and how."""

    target_sensitivity: float
    chosen_on: str = "validation part of train/ (patient-grouped); calibrated probabilities"
    rule: str = THRESHOLD_RULE
    rule_name: str = "validation"  # training/threshold_rules.py: RULES


@record
class Gradcam:
    layer: str
    map_size: list[int]


@record
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
Start = Literal["random initialisation", "ImageNet weights", "a weights file", "a trained model"]


@record
class Run:
    """One training run in the model's lineage: where its weights started and how it was trained."""

    started_from: Start
    command: str
    train_fingerprint: str
    epochs_run: int
    best_epoch: int | None
    wall_time_s: float
    init_sha256: str | None = None  # the weights file or model it started from


# --- What `train` was asked for ------------------------------------------------------------------


@dataclass(config=RECORD_CONFIG)
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

    @model_validator(mode="before")
    @classmethod
    def _without_retired_options(cls, given):
        """A card's options without RETIRED_OPTIONS (below), which older cards record."""
        if isinstance(given, dict):
            return {name: value for name, value in given.items() if name not in RETIRED_OPTIONS}
        return given


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


# --- A recalibration (evaluation/recalibration.py) ------------------------------------------------


@record
class SiteSample:
    path_name: str  # the folder's last part (cards travel)
    counts: dict[str, int]
    fingerprint: str
    date: str  # ISO


@record
class Replaced:
    """What a recalibration replaced: the operating point before it, and the figures measured there."""

    calibration: Calibration
    thresholds: Thresholds
    expectations: dict | None = optional()
    held_out_series: dict | None = optional()
    independent_evaluation: IndependentEvaluation | None = optional()
    recalibration: Recalibration | None = optional()  # a recalibrated model recalibrated again
    monitor: MonitorReference | None = optional()  # the drift monitor's reference before it


@record
class Recalibration:
    previous: Replaced
    site_sample: SiteSample
    metrics: Metrics  # on the site sample, at the new thresholds (optimistic: fitted on it)
    previous_metrics: Metrics  # on the site sample, at the previous thresholds
    warning: str | None
    command: str
    note: str


@record
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


@record
class ExportFile:
    file: str
    sha256: str


@record
class Export:
    """The ONNX graphs beside the model (training/export.py) and what they were checked against."""

    format: str
    opset: int
    keras_sha256: str
    files: dict[str, ExportFile]
    gradcam_layer: str
    agreement_with_keras: dict
    versions: dict[str, str]


@record
class ModelCard:
    name: str
    architecture: str
    file: str
    input_size: int
    class_names: list[str]
    preprocessing: Preprocessing
    calibration: Calibration
    thresholds: Thresholds
    validation: Metrics  # scoring.metrics.evaluate_predictions on the validation part
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
    # Figures measured on images no choice was made on, at these thresholds (a recalibration moves them
    # under recalibration.previous with the thresholds they were measured at)
    independent_evaluation: IndependentEvaluation | None = optional()

    @field_validator("file")
    @classmethod
    def _beside_the_card(cls, file: str) -> str:
        """The model file is named as it lies beside the card: a path elsewhere is refused."""
        if Path(file).name != file or file in ("", ".", "..") or "\\" in file:
            raise ValueError(f"{file!r} should be a file name beside the card, not a path")
        return file

    @model_validator(mode="after")
    def _evaluated_at_these_thresholds(self):
        evaluation, thresholds = self.independent_evaluation, self.thresholds
        if evaluation and not evaluation.measured_at(thresholds.default, thresholds.screening):
            raise ValueError(
                "independent_evaluation was measured at other thresholds than the card's "
                f"(default {thresholds.default:.3f}, screening {thresholds.screening:.3f})"
            )
        return self

    @classmethod
    def load(cls, path: str | Path) -> ModelCard:
        """The card at `path`, validated once; ModelLoadError naming the file and the field."""
        path = Path(path)
        try:
            return parsed_record(cls, path.read_bytes())
        except (OSError, NotJsonError) as err:
            raise ModelLoadError(f"The model card {path} is unreadable: {err}") from None
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
