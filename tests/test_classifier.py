"""Loading a model with its card, and one probability per image whichever way it comes in."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from builders import probability_of

from pneumonia.serving.card import sigmoid
from pneumonia.serving.classifier import ModelLoadError, XrayClassifier, find_card
from pneumonia.serving.preprocessing import preprocess, xray_pixels
from pneumonia.training import dataset


@pytest.fixture(scope="module")
def classifier(tiny_model_dir):
    return XrayClassifier(tiny_model_dir)


@pytest.fixture(scope="module")
def test_images(synthetic_data_dir):
    return dataset.scan_split(synthetic_data_dir, "test").paths


def _copy(tiny_model_dir, tmp_path):
    return shutil.copytree(tiny_model_dir, tmp_path / "model", ignore=shutil.ignore_patterns("checkpoints", "report"))


def test_missing_model_folder_names_it(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(ModelLoadError, match="no_such_model") as caught:
        XrayClassifier(missing)
    assert str(missing) in str(caught.value)
    (tmp_path / "model.json").write_text("{}")  # a card beside the missing folder must not be picked up
    with pytest.raises(ModelLoadError, match="No model folder"):
        find_card(missing)


def test_folder_without_a_card(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError) as caught:
        XrayClassifier(tmp_path / "empty")
    assert str(tmp_path / "empty" / "model.json") in str(caught.value)


def test_card_naming_a_missing_model_file(tiny_model_dir, tmp_path):
    model_dir = _copy(tiny_model_dir, tmp_path)
    keras_file = model_dir / json.loads((model_dir / "model.json").read_text())["file"]
    keras_file.unlink()
    with pytest.raises(ModelLoadError, match="missing") as caught:
        XrayClassifier(model_dir)
    assert str(keras_file) in str(caught.value)


def test_corrupt_model_file(tiny_model_dir, tmp_path):
    model_dir = _copy(tiny_model_dir, tmp_path)
    keras_file = model_dir / json.loads((model_dir / "model.json").read_text())["file"]
    keras_file.write_bytes(b"PK\x03\x04 not really a zip archive")
    with pytest.raises(ModelLoadError, match="could not be loaded") as caught:
        XrayClassifier(model_dir)
    assert str(keras_file) in str(caught.value)


@pytest.mark.parametrize(
    "card_text, words",
    [
        ("{ not json", "unreadable"),
        ("[1, 2]", "the card should be an object"),
        (json.dumps({"preprocessing": {}, "thresholds": {}}), "field name is missing"),
    ],
)
def test_bad_card(tiny_model_dir, tmp_path, card_text, words):
    model_dir = _copy(tiny_model_dir, tmp_path)
    (model_dir / "model.json").write_text(card_text)
    with pytest.raises(ModelLoadError, match=words) as caught:
        XrayClassifier(model_dir)
    assert str(model_dir / "model.json") in str(caught.value)


def test_keras_file_path_loads_with_the_card_beside_it(tiny_model_dir, classifier, test_images):
    keras_path, card = find_card(tiny_model_dir)
    direct = XrayClassifier(keras_path)
    assert direct.keras_path == keras_path and direct.card == card
    assert probability_of(direct, test_images[0]) == pytest.approx(probability_of(classifier, test_images[0]), abs=1e-7)


def test_card_settings_are_used(classifier, tiny_model_dir):
    card = json.loads((tiny_model_dir / "model.json").read_text())
    assert classifier.image_size == card["input_size"] == card["preprocessing"]["image_size"] == 32
    assert classifier.platt == pytest.approx((card["calibration"]["slope"], card["calibration"]["intercept"]))
    assert classifier.thresholds == {
        "default": pytest.approx(card["thresholds"]["default"]),
        "screening": pytest.approx(card["thresholds"]["screening"]),
    }
    assert classifier.name == card["name"]


def test_probabilities_from_pixels_equal_one_image_at_a_time(classifier, test_images):
    pixels = np.stack([xray_pixels(path, classifier.image_size) for path in test_images])
    batched = classifier.probabilities_from_pixels(pixels, batch_size=7)  # several batches, one partial
    one_by_one = np.array([probability_of(classifier, path) for path in test_images])
    from_bytes = np.array([probability_of(classifier, path.read_bytes()) for path in test_images[:4]])
    assert batched.shape == (len(test_images),)
    assert ((batched > 0) & (batched < 1)).all()
    np.testing.assert_allclose(batched, one_by_one, rtol=0, atol=1e-6)
    np.testing.assert_allclose(from_bytes, one_by_one[:4], rtol=0, atol=1e-7)
    assert classifier.probabilities_from_pixels(pixels[:0]).shape == (0,)


def test_probability_is_the_platt_calibrated_logit_from_the_card(tiny_model_dir, tmp_path, test_images):
    model_dir = _copy(tiny_model_dir, tmp_path)
    card = json.loads((model_dir / "model.json").read_text())
    card["calibration"].update(slope=0.4, intercept=0.0)
    (model_dir / "model.json").write_text(json.dumps(card))
    soft = XrayClassifier(model_dir)
    card["calibration"].update(slope=4.0, intercept=-1.0)
    (model_dir / "model.json").write_text(json.dumps(card))
    shifted = XrayClassifier(model_dir)
    assert (soft.platt, shifted.platt) == ((0.4, 0.0), (4.0, -1.0))

    inputs = np.stack([preprocess(path, soft.preprocessing) for path in test_images])
    logits = soft.features_and_logits(inputs)[1]
    assert np.ptp(logits) > 0
    np.testing.assert_allclose([probability_of(soft, p) for p in test_images], sigmoid(0.4 * logits), atol=1e-6)
    np.testing.assert_allclose(
        [probability_of(shifted, p) for p in test_images], sigmoid(4.0 * logits - 1.0), atol=1e-6
    )
    # the ranking of the images does not depend on the calibration (non-decreasing along the
    # logits' order; argsort of the tiny model's near-equal probabilities breaks ties arbitrarily)
    order = np.argsort(logits, kind="stable")
    for probs in (sigmoid(0.4 * logits), sigmoid(4.0 * logits - 1.0)):
        assert (np.diff(probs[order]) >= 0).all()


def test_labels_follow_each_threshold(classifier):
    default, screening = classifier.thresholds["default"], classifier.thresholds["screening"]
    assert classifier.labels(default) == {
        "default": "PNEUMONIA",
        "screening": "PNEUMONIA" if default >= screening else "NORMAL",
    }
    assert classifier.labels(np.nextafter(default, 0))["default"] == "NORMAL"
    assert classifier.labels(screening)["screening"] == "PNEUMONIA"
    assert classifier.labels(np.nextafter(screening, 0))["screening"] == "NORMAL"
