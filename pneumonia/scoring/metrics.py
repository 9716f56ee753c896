"""Metrics (from scikit-learn), bootstrap intervals, thresholds and calibration; the plots are in `plots`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from scipy.stats import rankdata
from sklearn import metrics as skm

from pneumonia.labels import CLASS_NAMES


def metrics_at_threshold(labels: np.ndarray, probs: np.ndarray, threshold: float) -> dict:
    predicted = (probs >= threshold).astype(int)
    tn, fp, fn, tp = skm.confusion_matrix(labels, predicted, labels=[0, 1]).ravel()
    return {
        "threshold": float(threshold),
        "accuracy": float(skm.accuracy_score(labels, predicted)),
        "precision": float(skm.precision_score(labels, predicted, zero_division=0)),
        "recall": float(skm.recall_score(labels, predicted, zero_division=0)),
        "specificity": float(skm.recall_score(labels, predicted, pos_label=0, zero_division=0)),
        "f1": float(skm.f1_score(labels, predicted, zero_division=0)),
        "confusion_matrix": {"tn": int(tn), "fp": int(fp), "fn": int(fn), "tp": int(tp)},
    }


def _roc_auc_rows(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """ROC AUC of each row (Mann-Whitney with mid-ranks for ties: sklearn's number exactly)."""
    ranks = rankdata(scores, axis=1)
    positives = labels.sum(axis=1)
    negatives = labels.shape[1] - positives
    return ((ranks * labels).sum(axis=1) - positives * (positives + 1) / 2) / (positives * negatives)


def bootstrap_ci(labels: np.ndarray, probs: np.ndarray, threshold: float, rounds: int = 1000, seed: int = 0) -> dict:
    """95 % percentile intervals of AUC, and accuracy / recall / specificity at `threshold`.

    All resamples at once with NumPy (sklearn's per-call checks made 1,000 rounds slow);
    resamples holding one class only have no AUC and are left out.
    """
    labels = np.asarray(labels, dtype=int)
    probs = np.asarray(probs, dtype=np.float64)
    rng = np.random.default_rng(seed)
    n = len(labels)
    idx = rng.integers(0, n, (rounds, n))
    y, p = labels[idx], probs[idx]
    both = (y.min(axis=1) == 0) & (y.max(axis=1) == 1)
    if not both.any():
        raise ValueError("every bootstrap resample holds one class only: no AUC interval")
    y, p = y[both], p[both]
    predicted = p >= threshold
    samples = {
        "auc": _roc_auc_rows(y, p),
        "accuracy": (predicted == (y == 1)).mean(axis=1),
        "recall": (predicted & (y == 1)).sum(axis=1) / (y == 1).sum(axis=1),
        "specificity": (~predicted & (y == 0)).sum(axis=1) / (y == 0).sum(axis=1),
    }
    return {k: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] for k, v in samples.items()}


def evaluate_predictions(labels, probs, thresholds: dict, model_name: str, split: str) -> dict:
    """The metrics.json schema: AUC, AP, loss, per-threshold metrics, 95 % intervals.

    `thresholds` maps a name ("default", "screening") to its value; the intervals are taken
    at the default threshold.
    """
    labels = np.asarray(labels, dtype=int)
    probs = np.asarray(probs, dtype=np.float64)
    return {
        "model": model_name,
        "split": split,
        "n": {name: int((labels == i).sum()) for i, name in enumerate(CLASS_NAMES)},
        "auc": float(skm.roc_auc_score(labels, probs)),
        "average_precision": float(skm.average_precision_score(labels, probs)),
        "loss": float(skm.log_loss(labels, np.clip(probs, 1e-7, 1 - 1e-7), labels=[0, 1])),
        "thresholds": {name: metrics_at_threshold(labels, probs, t) for name, t in thresholds.items()},
        "ci95": bootstrap_ci(labels, probs, thresholds["default"]),
    }


def expected_calibration_error(labels, probs, bins: int = 15) -> float:
    """Equal-width bins; |accuracy - confidence| of each bin weighted by its share."""
    labels = np.asarray(labels, dtype=float)
    probs = np.asarray(probs, dtype=float)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(probs, edges[1:-1]), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            ece += mask.mean() * abs(labels[mask].mean() - probs[mask].mean())
    return float(ece)


def write_metrics(metrics: dict, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "metrics.json"
    path.write_text(json.dumps(metrics, indent=2) + "\n")
    return path


def format_table(metrics: dict) -> str:
    lines = [
        f"{metrics['model']} on {metrics['split']} (n = {sum(metrics['n'].values())}: "
        + ", ".join(f"{k} {v}" for k, v in metrics["n"].items())
        + ")",
        f"AUC {metrics['auc']:.4f} [{metrics['ci95']['auc'][0]:.4f}, {metrics['ci95']['auc'][1]:.4f}]   "
        f"AP {metrics['average_precision']:.4f}   loss {metrics['loss']:.4f}",
        f"{'threshold':<22}{'accuracy':>9}{'precision':>10}{'recall':>8}{'specif.':>9}{'f1':>7}   tn/fp/fn/tp",
    ]
    for name, m in metrics["thresholds"].items():
        cm = m["confusion_matrix"]
        lines.append(
            f"{name + ' ' + format(m['threshold'], '.4f'):<22}{m['accuracy']:>9.4f}{m['precision']:>10.4f}"
            f"{m['recall']:>8.4f}{m['specificity']:>9.4f}{m['f1']:>7.4f}   {cm['tn']}/{cm['fp']}/{cm['fn']}/{cm['tp']}"
        )
    return "\n".join(lines)
