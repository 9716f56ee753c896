"""pneumonia/serving/card.py: a card is checked once, on load, and a bad one is refused with the file
and the field named; what `write_card` writes, `ModelCard.load` reads back equal."""

from __future__ import annotations

import dataclasses
import json

import pytest
from builders import SHIPPED_MODEL, minimal_card
from pydantic import ValidationError

from pneumonia.errors import ModelLoadError
from pneumonia.serving.card import CARD_NAME, ModelCard, Normalization, write_card


def test_the_shipped_card_loads_and_reads_as_attributes():
    card = ModelCard.load(SHIPPED_MODEL / CARD_NAME)
    assert card.preprocessing.image_size == 128 and card.preprocessing.contrast in ("none", "equalize")
    assert 0 < card.thresholds.screening <= card.thresholds.default < 1
    assert card.export.files["explain"].file == "explain.onnx"


def test_the_shipped_model_is_one_converged_run_from_random_initialisation():
    """Issue 34: one run from random weights on the warm-up + cosine schedule, its final weights kept."""
    card = ModelCard.load(SHIPPED_MODEL / CARD_NAME)
    assert [run.started_from for run in card.lineage] == ["random initialisation"]
    assert card.training.config.init == "none" and card.training.best_epoch is None
    assert card.training.weights == "the final epoch's" and card.training.epochs_run == card.training.config.epochs
    assert card.training.schedule.startswith("linear warm-up") and "cosine decay to 0" in card.training.schedule
    assert card.lineage[0].epochs_run == card.training.epochs_run and card.lineage[0].best_epoch is None


def test_the_shipped_card_holds_the_independent_test_split_figures():
    """Issue 41: measured independently on the Kaggle test split, the model and thresholds frozen before."""
    card = ModelCard.load(SHIPPED_MODEL / CARD_NAME)
    evaluation = card.independent_evaluation
    assert evaluation.images == 624 and evaluation.auc == 0.969 and evaluation.date == "2026-12-07"
    assert evaluation.command == "python -m pneumonia evaluate DIR --split test" and "224 x 224" in evaluation.split
    default, screening = evaluation.thresholds["default"], evaluation.thresholds["screening"]
    assert (default.accuracy, default.precision, default.recall, default.specificity) == (0.912, 0.9, 0.967, 0.821)
    assert (screening.recall, screening.specificity, screening.accuracy) == (0.995, 0.615, None)
    assert f"{default.threshold:.3f}, {screening.threshold:.3f}" == "0.970, 0.675"
    assert evaluation.measured_at(card.thresholds.default, card.thresholds.screening)


def test_the_shipped_card_is_written_back_as_it_is(tmp_path):
    card = ModelCard.load(SHIPPED_MODEL / CARD_NAME)
    assert write_card(tmp_path, card).read_text() == (SHIPPED_MODEL / CARD_NAME).read_text()


def test_a_card_from_an_older_train_loads_without_its_retired_options(tmp_path):
    content = _shipped_card_with(lambda c: c["training"]["config"].update(patience=5, ema=False))
    (tmp_path / CARD_NAME).write_text(json.dumps(content))
    card = ModelCard.load(tmp_path / CARD_NAME)
    assert not hasattr(card.training.config, "patience") and "patience" not in card.to_dict()["training"]["config"]


def test_a_changed_copy_is_validated_too():
    card = ModelCard.load(SHIPPED_MODEL / CARD_NAME)
    with pytest.raises(ValidationError, match="measured at other thresholds"):
        dataclasses.replace(card, thresholds=dataclasses.replace(card.thresholds, default=0.9))
    with pytest.raises(ValidationError, match="contrast"):
        dataclasses.replace(card.preprocessing, contrast="clahe")


def test_a_written_card_loads_back_equal(tmp_path):
    card = minimal_card("m", "m.keras", 32, ("features", [8, 8]), Normalization(1 / 255, [0.0] * 3, [1.0] * 3))
    card = dataclasses.replace(card, ood={"file": "ood.npz"}, held_out_series={"series": "IM"})
    write_card(tmp_path, card)
    assert ModelCard.load(tmp_path / CARD_NAME) == card


def _shipped_card_with(change) -> dict:
    content = json.loads((SHIPPED_MODEL / CARD_NAME).read_text())
    change(content)
    return content


@pytest.mark.parametrize(
    "change, named",
    [
        (lambda c: c["thresholds"].update(default="high"), "thresholds.default should be float"),
        (lambda c: c["thresholds"].pop("screening"), "field thresholds.screening is missing"),
        (lambda c: c.update(colour_space="sRGB"), "unknown field colour_space"),
        (lambda c: c["preprocessing"].update(contrast="clahe"), "preprocessing: contrast 'clahe' is not one of"),
        (lambda c: c["lineage"][0].update(started_from="pretrained"), r"lineage\[0\]: started_from 'pretrained'"),
        (lambda c: c["export"]["files"]["explain"].pop("sha256"), "field export.files.explain.sha256 is missing"),
        (lambda c: c.update(input_size=True), "input_size should be int"),
        (lambda c: c.update(file="../other/m.keras"), "file: '../other/m.keras' should be a file name beside"),
        (lambda c: c["independent_evaluation"].pop("date"), "field independent_evaluation.date is missing"),
        (
            lambda c: c["independent_evaluation"].update(date="7 December 2026"),
            "independent_evaluation: Invalid isoformat",
        ),
        (lambda c: c["independent_evaluation"].update(auc=96.9), "independent_evaluation.auc: Input should be less"),
        (lambda c: c["independent_evaluation"].update(images=0), "independent_evaluation: images should be at least 1"),
        (lambda c: c["independent_evaluation"]["thresholds"].pop("screening"), "should be default and screening"),
        (
            lambda c: c["independent_evaluation"]["thresholds"]["default"].update(threshold=0.5),
            "the card: independent_evaluation was measured at other thresholds than the card's",
        ),
        (
            lambda c: c["independent_evaluation"]["thresholds"]["default"].update(sensitivity=0.9),
            "unknown field independent_evaluation.thresholds.default.sensitivity",
        ),
    ],
)
def test_a_bad_card_is_refused_naming_the_file_and_the_field(tmp_path, change, named):
    path = tmp_path / CARD_NAME
    path.write_text(json.dumps(_shipped_card_with(change)))
    with pytest.raises(ModelLoadError, match=named) as caught:
        ModelCard.load(path)
    assert str(path) in str(caught.value)


@pytest.mark.parametrize(
    "probability, shown",
    [(0.0004, "< 1 %"), (0.01, "1.0 %"), (0.4567, "45.7 %"), (0.99, "99.0 %"), (0.9999, "> 99 %")],
)
def test_a_probability_beyond_what_the_validation_data_backs_is_shown_capped(probability, shown):
    card = ModelCard.load(SHIPPED_MODEL / CARD_NAME)  # 135 NORMAL validation images: one is 0.7 %, so 1 %
    assert card.probability_floor == 0.01
    assert card.shown_probability(probability) == shown


def test_a_smaller_calibration_sample_caps_further():
    card = minimal_card("m", "m.keras", 32, ("f", [8, 8]), Normalization(1 / 255, [0.0] * 3, [1.0] * 3))
    card = dataclasses.replace(card, data=dataclasses.replace(card.data, validation={"NORMAL": 30, "PNEUMONIA": 90}))
    assert card.probability_floor == 0.04 and card.shown_probability(0.97) == "> 96 %"
