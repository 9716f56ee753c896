"""studies/threshold_rules.py: every rule scored on what did not choose it. Synthetic probabilities only.
(Named apart from tests/test_threshold_rules.py, the product module's: pytest imports by basename.)"""

from __future__ import annotations

import numpy as np
import pytest

from pneumonia.training.config import HELD_OUT_SHIFTS, RULES, SHIFT_SETS
from pneumonia.training.shifts import BASELINE
from studies import threshold_rules as study


def test_rates_counts_each_class_and_youden():
    labels, probs = [0, 0, 0, 0, 1, 1], [0.1, 0.2, 0.3, 0.9, 0.4, 0.8]
    assert study.rates(labels, probs, 0.5) == pytest.approx({"specificity": 0.75, "recall": 0.5, "j": 0.25})
    assert study.rates([1, 1], [0.7, 0.4], 0.5) == {"specificity": None, "recall": 0.5, "j": None}


@pytest.fixture(scope="module")
def shifted():
    """Labels and {shift: probabilities}: every shift lowers the NORMAL images' margin by a different amount."""
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 60)
    names = {BASELINE, *HELD_OUT_SHIFTS, *(s for group in SHIFT_SETS.values() for s in group)}
    probs = {}
    for i, name in enumerate(sorted(names)):
        scores = np.where(labels == 1, 1.5, -1.5 + 0.1 * i) + rng.normal(0, 1, labels.size)
        probs[name] = 1 / (1 + np.exp(-scores))
    return labels, probs


def test_score_rules_scores_each_rule_outside_its_own_set(shifted):
    labels, probs = shifted
    originals = (labels[:40:3], probs[BASELINE][:40:3])
    rows = study.score_rules(labels, probs, originals, target=0.95)
    assert [row["rule"] for row in rows] == [rule.name for rule in RULES]
    for row, rule in zip(rows, RULES):
        t = row["thresholds"]
        assert 0 < t["screening"] <= t["default"] < 1
        assert row["validation"]["default"] == study.rates(labels, probs[BASELINE], t["default"])
        worst = min(study.rates(labels, probs[s], t["screening"])["recall"] for s in HELD_OUT_SHIFTS)
        assert row["held_out_shifts"]["screening_worst_recall"] == worst
        assert row["originals"]["screening"]["recall"] is None  # the first 40 images are all NORMAL
        if rule.shift_set and "+" in rule.shift_set:
            assert row["other_sets"] is None  # chosen on every set: nothing left to score it on
    table = study.to_markdown(rows, "model")
    assert all(f"| {rule.name} |" in table for rule in RULES)


def test_a_held_out_series_is_scored_at_each_rules_thresholds(shifted):
    labels, probs = shifted
    unseen = np.linspace(0.05, 0.95, 19)
    rows = study.score_rules(labels, probs, None, target=0.95, unseen_normals=unseen)
    for row in rows:
        for name, threshold in row["thresholds"].items():
            assert row["held_out_series"][name] == pytest.approx(float((unseen < threshold).mean()))
    assert "held-out series: spec @ default / screening" in study.to_markdown(rows, "model")
    assert "held-out series" not in study.to_markdown(study.score_rules(labels, probs, None, 0.95), "model")
