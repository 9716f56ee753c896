"""The operating point a trained model ships with: Platt calibration and the two thresholds, chosen on
the validation part of train/ only (never on a test split)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn import metrics as skm

from pneumonia.scoring.metrics import evaluate_predictions, expected_calibration_error
from pneumonia.serving.card import Calibration, Thresholds, platt, sigmoid


def thresholds_from_roc(labels, probs, target_sensitivity: float) -> tuple[float, float]:
    """(balanced, screening) from one ROC curve of calibrated probabilities.

    balanced maximises Youden's J (sensitivity + specificity - 1): unlike accuracy, J does not
    depend on the share of pneumonia in the data, which differs from site to site; ties go to
    the highest such threshold. screening is the highest threshold whose sensitivity (recall)
    reaches the target.
    """
    labels = np.asarray(labels, dtype=int)
    if not (labels == 1).any():
        raise ValueError("no positive examples to set a screening threshold on")
    if not 0 < target_sensitivity <= 1:
        raise ValueError("target_sensitivity must be in (0, 1]")
    # Every distinct score is a candidate (drop_intermediate=False); the first is +inf (nothing positive).
    fpr, tpr, thresholds = skm.roc_curve(labels, probs, drop_intermediate=False)
    balanced = thresholds[int(np.argmax(tpr - fpr))]
    # The tolerance stops float noise from asking for one positive more (0.07 * 100 = 7.000000000000001).
    screening = thresholds[int(np.argmax(tpr >= target_sensitivity - 1e-9))]
    return float(min(balanced, 1.0)), float(min(screening, 1.0))


def choose_thresholds(labels, probs, target_sensitivity: float) -> dict[str, float]:
    """The two operating thresholds: "default" (balanced) and "screening", never above the
    default, so that its label is always the more sensitive one."""
    default, screening = thresholds_from_roc(labels, probs, target_sensitivity)
    return {"default": default, "screening": min(default, screening)}


def fit_platt(labels, logits) -> tuple[float, float]:
    """Platt scaling: (slope, intercept) of the logistic regression of the labels on the logits.

    A temperature alone (slope, no intercept) cannot move where the 0.5 boundary falls; a
    model whose BatchNorm statistics shift its logits needs the intercept too.
    """
    from sklearn.linear_model import LogisticRegression

    fit = LogisticRegression(C=1e6, max_iter=1000).fit(np.asarray(logits, dtype=float).reshape(-1, 1), labels)
    return float(fit.coef_[0, 0]), float(fit.intercept_[0])


@dataclass
class OperatingPoint:
    """What the validation logits of the best epoch give: calibration, thresholds and metrics."""

    calibration: Calibration
    thresholds: Thresholds
    metrics: dict
    probabilities: np.ndarray


def operating_point(val_y: np.ndarray, val_logits: np.ndarray, arch: str, target_sensitivity: float) -> OperatingPoint:
    """Platt calibration and both thresholds, from the validation part only."""
    slope, intercept = fit_platt(val_y, val_logits)
    probs = platt(val_logits, slope, intercept)
    calibration = Calibration(
        slope,
        intercept,
        expected_calibration_error(val_y, sigmoid(val_logits)),
        expected_calibration_error(val_y, probs),
    )
    chosen = choose_thresholds(val_y, probs, target_sensitivity)
    metrics = evaluate_predictions(val_y, probs, chosen, arch, "validation (patient-grouped from train/)")
    return OperatingPoint(calibration, Thresholds(**chosen, target_sensitivity=target_sensitivity), metrics, probs)
