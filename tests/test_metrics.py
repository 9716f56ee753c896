"""Metrics against scikit-learn computed here, thresholds, calibration, intervals, plots."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn import metrics as skm

from pneumonia.scoring.metrics import (
    bootstrap_ci,
    evaluate_predictions,
    expected_calibration_error,
    format_table,
    metrics_at_threshold,
    write_metrics,
)
from pneumonia.scoring.plots import save_plots
from pneumonia.serving.card import platt, sigmoid
from pneumonia.training.operating_points import choose_thresholds, fit_platt, thresholds_from_roc


@pytest.fixture(scope="module")
def predictions():
    """A fixed, imperfect prediction vector with ties: 90 NORMAL, 140 PNEUMONIA."""
    rng = np.random.default_rng(123)
    labels = np.r_[np.zeros(90, int), np.ones(140, int)]
    probs = np.clip(np.where(labels == 1, rng.beta(5, 2, len(labels)), rng.beta(2, 4, len(labels))), 0, 1)
    probs[:10] = probs[-10:] = 0.5  # ties at the default threshold
    return labels, np.round(probs, 3)


def test_evaluate_predictions_equals_scikit_learn(predictions):
    labels, probs = predictions
    result = evaluate_predictions(labels, probs, {"default": 0.5, "screening": 0.3}, "m", "test")
    assert result["model"] == "m" and result["split"] == "test"
    assert result["n"] == {"NORMAL": 90, "PNEUMONIA": 140}
    assert result["auc"] == pytest.approx(skm.roc_auc_score(labels, probs), abs=1e-12)
    assert result["average_precision"] == pytest.approx(skm.average_precision_score(labels, probs), abs=1e-12)
    assert result["loss"] == pytest.approx(skm.log_loss(labels, np.clip(probs, 1e-7, 1 - 1e-7)), abs=1e-9)
    for name, threshold in (("default", 0.5), ("screening", 0.3)):
        predicted = (probs >= threshold).astype(int)  # a probability equal to the threshold is PNEUMONIA
        m = result["thresholds"][name]
        assert m["threshold"] == threshold
        assert m["accuracy"] == pytest.approx(skm.accuracy_score(labels, predicted))
        assert m["precision"] == pytest.approx(skm.precision_score(labels, predicted))
        assert m["recall"] == pytest.approx(skm.recall_score(labels, predicted))
        assert m["specificity"] == pytest.approx(skm.recall_score(labels, predicted, pos_label=0))
        assert m["f1"] == pytest.approx(skm.f1_score(labels, predicted))
        cm = m["confusion_matrix"]
        assert sum(cm.values()) == len(labels)
        assert cm["tp"] + cm["fn"] == 140 and cm["tn"] + cm["fp"] == 90
        assert cm["tp"] == int(((probs >= threshold) & (labels == 1)).sum())
        assert cm["fp"] == int(((probs >= threshold) & (labels == 0)).sum())
    assert result["thresholds"]["screening"]["recall"] >= result["thresholds"]["default"]["recall"]
    json.dumps(result)  # the metrics.json schema is plain JSON


def screening_threshold(labels, probs, target):
    return thresholds_from_roc(labels, probs, target)[1]


def balanced_threshold(labels, probs):
    return thresholds_from_roc(labels, probs, 1.0)[0]


def test_metrics_at_threshold_on_a_hand_checked_case():
    labels = np.array([0, 0, 0, 1, 1, 1, 1])
    probs = np.array([0.1, 0.6, 0.4, 0.9, 0.6, 0.2, 0.7])
    m = metrics_at_threshold(labels, probs, 0.6)
    assert m["confusion_matrix"] == {"tn": 2, "fp": 1, "fn": 1, "tp": 3}
    assert m["accuracy"] == pytest.approx(5 / 7)
    assert m["precision"] == pytest.approx(3 / 4) and m["recall"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(2 / 3) and m["f1"] == pytest.approx(3 / 4)


@pytest.mark.parametrize("target", [0.98, 0.95, 0.9, 0.55, 0.07, 1.0])
def test_screening_threshold_is_the_highest_reaching_the_target(predictions, target):
    labels, probs = predictions
    threshold = screening_threshold(labels, probs, target)
    assert choose_thresholds(labels, probs, target)["screening"] == min(threshold, balanced_threshold(labels, probs))
    assert skm.recall_score(labels, probs >= threshold) >= target - 1e-12
    # every higher threshold misses the target
    higher = np.unique(probs[probs > threshold])
    assert len(higher) > 0 or target == 1.0
    for t in list(higher[:3]) + [threshold + 1e-9]:
        assert skm.recall_score(labels, probs >= t) < target


def test_screening_threshold_float_noise_does_not_cost_a_positive():
    """0.07 * 100 is 7.000000000000001 in floating point: 7 positives, not 8, reach 7 %."""
    labels = np.ones(100, int)
    probs = np.arange(100) / 100
    assert screening_threshold(labels, probs, 0.07) == pytest.approx(0.93)
    assert screening_threshold(labels, probs, 0.28) == pytest.approx(0.72)


def test_screening_threshold_needs_positives_and_a_sensible_target():
    with pytest.raises(ValueError):
        screening_threshold(np.zeros(5, int), np.linspace(0, 1, 5), 0.9)
    for target in (0, -0.5, 1.2):
        with pytest.raises(ValueError):
            screening_threshold(np.ones(5, int), np.linspace(0, 1, 5), target)


def test_expected_calibration_error_is_zero_when_calibrated_and_large_when_overconfident():
    # exactly calibrated: in each bin, the share of positives equals the probability
    probs = np.repeat([0.1, 0.3, 0.5, 0.7, 0.9], 100)
    labels = np.concatenate([(np.arange(100) < 100 * p).astype(int) for p in (0.1, 0.3, 0.5, 0.7, 0.9)])
    assert expected_calibration_error(labels, probs) == pytest.approx(0.0, abs=1e-12)
    # sampled from the probabilities: close to zero
    rng = np.random.default_rng(0)
    p = rng.uniform(0, 1, 200_000)
    y = (rng.uniform(0, 1, p.size) < p).astype(int)
    assert expected_calibration_error(y, p) < 0.01
    # overconfident: says 0.99 / 0.01 but is right only 70 % of the time
    confident = np.where(rng.uniform(0, 1, 10_000) < 0.5, 0.99, 0.01)
    truth = np.where(rng.uniform(0, 1, confident.size) < 0.7, confident > 0.5, confident < 0.5).astype(int)
    assert expected_calibration_error(truth, confident) == pytest.approx(0.29, abs=0.02)


@pytest.mark.parametrize("true_slope, true_intercept", [(1 / 3, 0.0), (2.0, -1.5)])
def test_fit_platt_recovers_a_known_slope_and_intercept(true_slope, true_intercept):
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 4, 40_000)
    labels = (rng.uniform(0, 1, logits.size) < sigmoid(true_slope * logits + true_intercept)).astype(int)
    slope, intercept = fit_platt(labels, logits)
    assert slope == pytest.approx(true_slope, rel=0.06)
    assert intercept == pytest.approx(true_intercept, abs=0.08)

    # and it is the log-loss minimum: nearby parameters do worse
    def nll(a, b):
        return skm.log_loss(labels, np.clip(platt(logits, a, b), 1e-12, 1 - 1e-12))

    best = nll(slope, intercept)
    assert best <= min(
        nll(slope * 1.1, intercept),
        nll(slope / 1.1, intercept),
        nll(slope, intercept + 0.1),
        nll(slope, intercept - 0.1),
    )


def test_bootstrap_ci_contains_the_point_estimate_and_matches_a_plain_loop(predictions):
    labels, probs = predictions
    ci = bootstrap_ci(labels, probs, 0.5, rounds=300, seed=5)
    point = metrics_at_threshold(labels, probs, 0.5)
    estimates = {
        "auc": skm.roc_auc_score(labels, probs),
        "accuracy": point["accuracy"],
        "recall": point["recall"],
        "specificity": point["specificity"],
    }
    for key, value in estimates.items():
        low, high = ci[key]
        assert low <= value <= high and high - low < 0.3, key
    # the same resamples scored one at a time with scikit-learn
    rng = np.random.default_rng(5)
    samples = {k: [] for k in estimates}
    for idx in rng.integers(0, len(labels), (300, len(labels))):
        y, p = labels[idx], probs[idx]
        samples["auc"].append(skm.roc_auc_score(y, p))
        samples["accuracy"].append(skm.accuracy_score(y, p >= 0.5))
        samples["recall"].append(skm.recall_score(y, p >= 0.5))
        samples["specificity"].append(skm.recall_score(y, p >= 0.5, pos_label=0))
    for key, values in samples.items():
        assert ci[key] == pytest.approx([np.percentile(values, 2.5), np.percentile(values, 97.5)], abs=1e-12)


def test_bootstrap_ci_leaves_out_one_class_resamples():
    labels = np.array([0, 1, 1, 1, 1, 1, 1, 1])
    ci = bootstrap_ci(labels, np.linspace(0, 1, 8), 0.5, rounds=200)
    assert ci["auc"] == [1.0, 1.0] and ci["specificity"] == [1.0, 1.0]


def test_plots_and_metrics_are_written(predictions, tmp_path):
    labels, probs = predictions
    metrics = evaluate_predictions(labels, probs, {"default": 0.5, "screening": 0.3}, "m", "test")
    path = write_metrics(metrics, tmp_path / "report")
    assert json.loads(path.read_text()) == metrics
    written = save_plots(labels, probs, metrics, tmp_path / "report")
    names = sorted(p.name for p in written)
    assert names == ["confusion_matrix_default.png", "confusion_matrix_screening.png", "pr_curve.png", "roc_curve.png"]
    for png in written:
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000
    table = format_table(metrics)
    assert f"AUC {metrics['auc']:.4f}" in table and "screening 0.3000" in table


def test_balanced_threshold_maximises_youden_j_over_every_candidate():
    rng = np.random.default_rng(7)
    labels = (rng.uniform(0, 1, 600) < 0.7).astype(int)
    probs = np.clip(rng.normal(0.35 + 0.4 * labels, 0.18), 0, 1)
    chosen = balanced_threshold(labels, probs)

    def youden(t):
        m = metrics_at_threshold(labels, probs, t)
        return m["recall"] + m["specificity"] - 1

    candidates = np.unique(probs)[:, None]  # every threshold that changes a decision, (T, 1)
    predicted = probs[None, :] >= candidates  # (T, N)
    every_j = predicted[:, labels == 1].mean(axis=1) + (~predicted[:, labels == 0]).mean(axis=1) - 1
    assert youden(chosen) == pytest.approx(every_j.max())
    # prevalence does not move it: duplicating every negative leaves J's maximiser in place
    more_negatives = np.concatenate([labels, labels[labels == 0]])
    more_probs = np.concatenate([probs, probs[labels == 0]])
    assert balanced_threshold(more_negatives, more_probs) == pytest.approx(chosen)
