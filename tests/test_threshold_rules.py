"""pneumonia/training/threshold_rules.py: rules that choose the thresholds across acquisition shifts, and
the card they leave (the rule, the validation figures at the new thresholds, what a new site can expect)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from builders import write_synthetic_dataset
from sklearn import metrics as skm

from pneumonia.serving.card import ModelCard
from pneumonia.training.config import RULES, RULES_BY_NAME, SHIFT_SETS, ThresholdRule
from pneumonia.training.dataset import DataError
from pneumonia.training.operating_points import choose_thresholds
from pneumonia.training.shifts import BASELINE, SHIFTS_BY_NAME
from pneumonia.training.threshold_rules import apply_threshold_rule, thresholds_by_rule, youden_at


def _scores(seed: int, normal_mean: float, pneumonia_mean: float, n: int = 200):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    logits = np.where(labels == 1, pneumonia_mean, normal_mean) + rng.normal(0, 1, n)
    return labels, 1 / (1 + np.exp(-logits))


def test_every_rule_names_shifts_that_exist():
    assert RULES[0] == RULES_BY_NAME["validation"] and RULES[0].shifts == ()
    for rule in RULES:
        assert all(name in SHIFTS_BY_NAME for name in rule.shifts), rule
    assert set(SHIFT_SETS["framing+exposure+sharpness"]) == {
        s for k, v in SHIFT_SETS.items() if "+" not in k for s in v
    }


def test_youden_at_matches_the_roc_curve():
    labels, probs = _scores(0, -1.0, 1.0)
    fpr, tpr, thresholds = skm.roc_curve(labels, probs, drop_intermediate=False)
    np.testing.assert_allclose(youden_at(labels, probs, thresholds[1:]), (tpr - fpr)[1:], atol=1e-12)


def test_the_validation_rule_is_the_single_roc_choice():
    labels, probs = _scores(1, -1.0, 1.0)
    chosen = thresholds_by_rule(labels, {BASELINE: probs}, RULES_BY_NAME["validation"], 0.95)
    assert chosen == choose_thresholds(labels, probs, 0.95)


def test_a_shift_that_raises_normal_probabilities_raises_the_worst_case_default():
    """The framing shifts of a real model make NORMAL chests look more like pneumonia; a rule chosen
    across them moves the default up, and its screening threshold still reaches the target on every
    member, so it is at most the lowest member's."""
    labels, clean = _scores(2, -1.5, 1.5)
    _, tighter = _scores(2, -0.5, 1.5)  # same images, NORMALs pushed towards PNEUMONIA
    probs = {BASELINE: clean, "crop_90": tighter, "crop_80": tighter}
    rule = ThresholdRule("worst:framing", "framing", "worst")
    chosen = thresholds_by_rule(labels, probs, rule, 0.95)
    alone = choose_thresholds(labels, clean, 0.95)
    assert chosen["default"] > alone["default"]
    assert chosen["screening"] <= chosen["default"]
    for member in probs.values():
        assert (member[labels == 1] >= chosen["screening"]).mean() >= 0.95
    mean_rule = ThresholdRule("mean:framing", "framing", "mean")
    assert thresholds_by_rule(labels, probs, mean_rule, 0.95)["default"] >= alone["default"]


@pytest.fixture(scope="module")
def ruled_model(tiny_model_dir, synthetic_data_dir, tmp_path_factory):
    model_dir = shutil.copytree(tiny_model_dir, tmp_path_factory.mktemp("ruled") / "model")
    card = apply_threshold_rule(model_dir, synthetic_data_dir, RULES_BY_NAME["worst:framing"], log=lambda *_: None)
    return model_dir, card


def test_applying_a_rule_records_it_and_the_figures_at_its_thresholds(ruled_model):
    model_dir, card = ruled_model
    assert ModelCard.load(model_dir / "model.json") == card
    assert card.thresholds.rule_name == "worst:framing" and "crop_90, crop_80" in card.thresholds.chosen_on
    assert card.validation.thresholds["default"].threshold == card.thresholds.default
    assert json.loads((model_dir / "report" / "metrics.json").read_text()) == card.to_dict()["validation"]
    for name in ("crop_90", "crop_80"):
        for threshold in ("default", "screening"):
            rates = card.expectations["framing"][name][threshold]
            assert 0 <= rates["specificity"] <= 1 and 0 <= rates["recall"] <= 1


def test_a_rule_is_refused_on_another_validation_part(ruled_model, tmp_path):
    """Thresholds chosen on images that are not the card's validation part would not be the card's."""
    other = write_synthetic_dataset(tmp_path / "other", per_class=12, seed=99, size=48)
    with pytest.raises(DataError, match="differs from the card"):
        apply_threshold_rule(ruled_model[0], other, RULES_BY_NAME["validation"], log=lambda *_: None)
