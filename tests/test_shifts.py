"""pneumonia/training/shifts.py: the acquisition-like shifts change the pixels, deterministically, and feed
the model through the one preprocessing path."""

from __future__ import annotations

import numpy as np
import pytest
from builders import CENTRED_NORMALIZATION, probability_of, synthetic_xray

from pneumonia.serving.card import Preprocessing
from pneumonia.serving.classifier import XrayClassifier
from pneumonia.serving.preprocessing import normalize, preprocess, xray_pixels
from pneumonia.training.shifts import BASELINE, SHIFTS, apply_shift, model_pixels

SHIFT_NAMES = [s.name for s in SHIFTS]


@pytest.fixture(scope="module")
def xray():
    """A 96 px synthetic X-ray as load_xray returns it (mode "L")."""
    return synthetic_xray(1, np.random.default_rng(3), size=96)


def test_the_shift_list_covers_the_brief():
    assert {
        "gamma_0.8",
        "gamma_1.25",
        "contrast_0.8",
        "contrast_1.2",
        "blur_r1",
        "blur_r2",
        "unsharp",
        "noise_s5",
        "jpeg_q30",
        "rotate_+5",
        "rotate_-5",
        "crop_90",
        "crop_80",
        "crop_70",
        "resample_nearest",
        "resample_bicubic",
    } <= set(SHIFT_NAMES)
    assert len(set(SHIFT_NAMES)) == len(SHIFT_NAMES)


@pytest.mark.parametrize("name", SHIFT_NAMES)
def test_each_shift_changes_the_pixels_and_keeps_shape_dtype_range(xray, name):
    before = np.asarray(xray).copy()
    shifted = apply_shift(name, xray, seed=7)
    assert np.array_equal(np.asarray(xray), before)  # the decoded image is not modified in place
    assert shifted.mode == "L"
    pixels = np.asarray(shifted)
    assert pixels.dtype == np.uint8 and pixels.min() >= 0 and pixels.max() <= 255
    if name.startswith("crop_"):  # the tighter field of view; the package's resize then stretches it
        fraction = int(name.removeprefix("crop_")) / 100
        assert shifted.size == (round(fraction * 96), round(fraction * 96))
        assert not np.array_equal(model_pixels(shifted, 96), before)
    else:
        assert shifted.size == xray.size
        changed = np.abs(pixels.astype(int) - before.astype(int))
        assert changed.max() > 0 and (changed > 0).mean() > 0.05, f"{name} barely changes the image"
    # Deterministic: the same seed gives the same image (noise included), so models compare fairly.
    assert np.array_equal(np.asarray(apply_shift(name, xray, seed=7)), pixels)


def test_no_shift_is_the_identity(xray):
    assert np.array_equal(np.asarray(apply_shift(BASELINE, xray)), np.asarray(xray))


@pytest.mark.parametrize("name", [BASELINE] + SHIFT_NAMES)
def test_shift_then_package_preprocessing_equals_preprocessing_a_saved_file(xray, name, tmp_path):
    """No second path: the model input of a shifted image is exactly what `preprocess` makes of
    the same image saved losslessly and read back as an upload."""
    spec = Preprocessing(32, CENTRED_NORMALIZATION)
    shifted = apply_shift(name, xray, seed=11)
    path = tmp_path / f"{name}.png"
    shifted.save(path)
    in_memory = model_pixels(shifted, spec.image_size)
    assert np.array_equal(in_memory, xray_pixels(path, spec.image_size))
    assert np.array_equal(normalize(in_memory, spec.normalization), preprocess(path, spec))


def test_shifted_probability_equals_predicting_the_saved_file(gap_model_dir, xray, tmp_path):
    """The batched scoring the report uses gives what `predict` gives for the saved file: the raw
    logits and the calibrated probability. The GAP CNN, which learned its task, so the logits
    differ from image to image."""
    classifier = XrayClassifier(gap_model_dir)
    images = [apply_shift(name, xray, seed=5) for name in ("blur_r2", "noise_s5", "crop_90")]
    batch = np.stack([model_pixels(image, classifier.image_size) for image in images])
    logits = classifier.features_and_logits(normalize(batch, classifier.preprocessing.normalization))[1]
    batched = classifier.probabilities_from_pixels(batch)
    assert np.ptp(logits) > 0
    for index, (image, probability) in enumerate(zip(images, batched)):
        path = tmp_path / f"shifted{index}.png"
        image.save(path)
        from_file = classifier.features_and_logits(preprocess(path, classifier.preprocessing)[None])[1]
        assert from_file[0] == pytest.approx(logits[index], abs=1e-5)
        assert probability_of(classifier, path) == pytest.approx(probability, abs=1e-6)
