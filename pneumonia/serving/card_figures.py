"""The figures a model card carries (pneumonia/serving/card.py): the validation metrics its thresholds were
chosen on, and the figures measured independently on images no choice was made on."""

from __future__ import annotations

import datetime as _dt
from typing import Annotated

from pydantic import Field, model_validator

from pneumonia.serving.records import optional, parsed_record, record

Rate = Annotated[float, Field(ge=0, le=1)]


# --- The validation metrics (scoring/metrics.py: evaluate_predictions) -----------------------------


@record
class ThresholdFigures:
    """scoring.metrics.metrics_at_threshold: the figures at one threshold."""

    threshold: float
    accuracy: float
    precision: float
    recall: float
    specificity: float
    f1: float
    confusion_matrix: dict[str, int]  # tn, fp, fn, tp


@record
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


# --- An independent evaluation ----------------------------------------------------------------------


@record
class IndependentFigures:
    """The figures at one of the card's thresholds, as the independent evaluation reported them."""

    threshold: Rate
    recall: Rate  # sensitivity: pneumonia found
    specificity: Rate  # normal X-rays cleared
    accuracy: Rate | None = optional()  # when the evaluation reported them
    precision: Rate | None = optional()


@record
class IndependentEvaluation:
    """Figures measured after the model and its thresholds were frozen, on images no choice was made on (the
    Kaggle test split, which `train` never reads), by someone other than the run that made the model."""

    date: str  # ISO date of the measurement
    command: str  # what measured them
    split: str  # which images, and how they were prepared
    images: int
    auc: Rate
    thresholds: dict[str, IndependentFigures]  # "default", "screening": the card's thresholds, rounded
    source: str  # how the figures reached the project

    @model_validator(mode="after")
    def _complete(self):
        _dt.date.fromisoformat(self.date)  # ValueError: "Invalid isoformat string: ..."
        if self.images < 1:
            raise ValueError("images should be at least 1")
        if sorted(self.thresholds) != ["default", "screening"]:
            raise ValueError(f"thresholds should be default and screening, not {', '.join(sorted(self.thresholds))}")
        return self

    def measured_at(self, default: float, screening: float) -> bool:
        """Whether these figures were taken at these thresholds (the card's, which it reports to 3 decimals)."""
        wanted = {"default": default, "screening": screening}
        return all(abs(figures.threshold - wanted[name]) <= 5e-4 for name, figures in self.thresholds.items())
