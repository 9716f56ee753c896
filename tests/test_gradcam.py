"""Grad-CAM: map shape and range, the class it explains, flat maps, localisation, overlay."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from builders import build_gap_cnn, encode_image, probability_of, synthetic_xray
from PIL import Image

from pneumonia.serving import gradcam
from pneumonia.serving.classifier import XrayClassifier
from pneumonia.serving.keras_graphs import explain_function
from pneumonia.serving.preprocessing import normalize
from pneumonia.web.screener import Screener


@pytest.fixture(scope="module")
def tiny_screener(ungated_model_dir):
    return Screener(ungated_model_dir)


@pytest.fixture(scope="module")
def gap_screener(gap_model_dir):
    return Screener(gap_model_dir)


def _inputs(screener, image: Image.Image) -> np.ndarray:
    size = screener.classifier.image_size
    pixels = np.asarray(image.convert("L").resize((size, size), Image.Resampling.BILINEAR))
    return normalize(pixels, screener.classifier.preprocessing.normalization)[None]  # (1, S, S, 3)


def _explain(model, layer: str, inputs: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """The explain graph traced from an in-memory Keras model: (logit, cam (h, w), features (d,))."""
    out = explain_function(model, layer, inputs.shape[1])(inputs)
    return float(out["logit"][0]), out["cam"].numpy()[0], out["features"].numpy()[0]


def _pneumonia_image(seed: int) -> Image.Image:
    return synthetic_xray(1, np.random.default_rng(seed), 64)


def test_map_has_the_card_layer_size_and_stays_in_range(tiny_screener, ungated_model_dir):
    card = XrayClassifier(ungated_model_dir).card
    assert tiny_screener.gradcam.layer == card.gradcam.layer
    assert list(tiny_screener.gradcam.map_size) == card.gradcam.map_size
    assert min(tiny_screener.gradcam.map_size) >= gradcam.MIN_CELLS
    for seed in range(3):
        logit, cam, _ = tiny_screener.gradcam.explain(_inputs(tiny_screener, _pneumonia_image(seed)))
        assert cam.shape == tiny_screener.gradcam.map_size
        for for_pneumonia in (True, False):
            heat = gradcam.heatmap(cam, for_pneumonia)
            assert heat.shape == cam.shape and heat.dtype == np.float32
            assert np.isfinite(heat).all() and heat.min() >= 0 and heat.max() <= 1


def test_probability_matches_the_package_classifier(tiny_screener, ungated_model_dir):
    data = encode_image(_pneumonia_image(1).resize((200, 160)), "PNG")
    expected = probability_of(XrayClassifier(ungated_model_dir), data)
    assert tiny_screener.screen(tiny_screener.prepare(data, None)).probability == pytest.approx(expected, abs=1e-6)


def test_heatmap_flips_to_the_evidence_for_normal():
    cam = np.array([[2.0, -1.0], [0.0, -4.0]], np.float32)
    np.testing.assert_allclose(gradcam.heatmap(cam, True), [[1, 0], [0, 0]], atol=1e-6)
    np.testing.assert_allclose(gradcam.heatmap(cam, False), [[0, 0.25], [0, 1]], atol=1e-6)


@pytest.mark.parametrize("cam", [np.zeros((8, 8), np.float32), -np.ones((8, 8), np.float32)])
def test_a_flat_map_stays_finite_and_zero(cam):
    heat = gradcam.heatmap(cam, for_pneumonia=True)
    assert np.isfinite(heat).all() and not heat.any()


def test_a_zero_gradient_model_gives_a_finite_map_and_a_visible_overlay():
    model = build_gap_cnn(32, name="flat")
    logit_layer = model.get_layer("logit")
    logit_layer.set_weights([np.zeros_like(w) for w in logit_layer.get_weights()])  # d logit / d features = 0
    logit, cam, _ = _explain(model, "features", np.random.default_rng(0).normal(size=(1, 32, 32, 3)).astype(np.float32))
    heat = gradcam.heatmap(cam, for_pneumonia=logit >= 0)
    assert logit == 0 and np.isfinite(heat).all() and not heat.any()
    grey = np.full((40, 60), 128, np.uint8)
    blended = gradcam.overlay(grey, heat)
    assert blended.shape == (40, 60, 3)
    assert (blended == blended[0, 0]).all() and blended.any()  # a uniform tint, not blank


def test_gradients_come_from_the_logit_so_a_saturated_probability_still_explains(gap_model_dir):
    import keras

    model = keras.saving.load_model(gap_model_dir / "model.keras", compile=False)
    inputs = _inputs(Screener(gap_model_dir), _pneumonia_image(3))
    _, cam, _ = _explain(model, "features", inputs)
    kernel, bias = model.get_layer("logit").get_weights()
    model.get_layer("logit").set_weights([kernel * 1000, bias * 1000])  # sigmoid is exactly 1.0 in float32
    assert float(model(inputs)[0, 0]) == 1.0
    logit, saturated_cam, _ = _explain(model, "features", inputs)
    assert logit > 100
    np.testing.assert_allclose(gradcam.heatmap(saturated_cam, True), gradcam.heatmap(cam, True), atol=1e-4)


def test_too_coarse_a_layer_is_refused():
    with pytest.raises(ValueError, match="at least 7x7"):
        gradcam.check_map_size("features", (4, 4))


def test_hot_area_lands_on_the_pneumonia_blob(gap_screener):
    """synthetic_xray puts the blob's centre at rows and columns 60-80 % of the image."""
    size = gap_screener.gradcam.map_size[0]
    band = slice(int(0.5 * size), int(0.9 * size) + 1)  # the 60-80 % band plus one cell either side
    for seed in range(10, 16):
        logit, cam, _ = gap_screener.gradcam.explain(_inputs(gap_screener, _pneumonia_image(seed)))
        assert logit > 0  # the model calls it pneumonia
        heat = gradcam.heatmap(cam, for_pneumonia=True)
        row, col = np.unravel_index(heat.argmax(), heat.shape)
        assert band.start <= row < band.stop and band.start <= col < band.stop, (seed, row, col)
        inside = heat[band, band].mean()
        outside = (heat.sum() - heat[band, band].sum()) / (heat.size - heat[band, band].size)
        assert inside > 3 * outside


def test_normal_prediction_explains_normal(gap_screener):
    data = encode_image(synthetic_xray(0, np.random.default_rng(7), 64), "PNG")
    result = gap_screener.screen(gap_screener.prepare(data, 1024), ".png")
    assert result.labels["default"] == "NORMAL" and result.gradcam_target == "NORMAL"


def test_overlay_keeps_the_xray_aspect_and_puts_the_heat_over_the_blob(gap_screener):
    """A 240x160 (3:2) X-ray: the model sees it squashed square, the overlay is 3:2 again
    and its hottest (reddest) pixels sit over the blob."""
    image = _pneumonia_image(20).resize((240, 160), Image.Resampling.BILINEAR)
    result = gap_screener.screen(gap_screener.prepare(encode_image(image, "PNG"), 120), ".png", with_original=True)
    assert result.gradcam_target == "PNEUMONIA" and result.localised
    blended = cv2.imdecode(np.frombuffer(result.overlay, np.uint8), cv2.IMREAD_COLOR)  # BGR
    original = cv2.imdecode(np.frombuffer(result.original, np.uint8), cv2.IMREAD_GRAYSCALE)
    assert blended.shape == (80, 120, 3) and original.shape == (80, 120)
    redness = blended[..., 2].astype(int) - blended[..., 0].astype(int)
    rows, cols = np.nonzero(redness >= np.percentile(redness, 99))
    assert 0.5 <= rows.mean() / 80 <= 0.9 and 0.5 <= cols.mean() / 120 <= 0.9


def test_display_image_bounds_the_long_side_and_keeps_the_aspect():
    image = Image.new("L", (2000, 1800), 100)
    grey = gradcam.display_image(image, 1024)
    assert grey.shape == (922, 1024) and grey.dtype == np.uint8
    assert gradcam.display_image(Image.new("L", (300, 200)), 1024).shape == (200, 300)
