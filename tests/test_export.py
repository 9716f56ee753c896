"""pneumonia/export.py: the ONNX export agrees with Keras, is fingerprinted in the card, is made by
`train`, copied by `calibrate`, and is refused whole when it disagrees."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from builders import REAL_XRAYS, SHIPPED_MODEL, encode_image, synthetic_xray, write_synthetic_dataset

from pneumonia.serving.card import file_sha256
from pneumonia.serving.classifier import XrayClassifier
from pneumonia.serving.preprocessing import model_input, xray_pixels
from pneumonia.serving.runtime import EXPLAIN_FILE, FORWARD_FILE, WEIGHTS_FILE
from pneumonia.training import export as export_module

EXPORT_FILES = (EXPLAIN_FILE, FORWARD_FILE, WEIGHTS_FILE)
SHIPPED_CARD_MAP = json.loads((SHIPPED_MODEL / "model.json").read_text())["gradcam"]["map_size"]


@pytest.fixture(scope="module")
def shipped_pair():
    """The shipped model on both runtimes."""
    return XrayClassifier(SHIPPED_MODEL, runtime="onnx"), XrayClassifier(SHIPPED_MODEL, runtime="keras")


def shipped_inputs(classifier) -> np.ndarray:
    """Real X-rays (tests/data) and drawn ones through the one preprocessing path, and the export's own inputs."""
    sources = [
        *REAL_XRAYS,
        *(encode_image(synthetic_xray(i % 2, np.random.default_rng(i), 300), "PNG") for i in range(4)),
    ]
    pixels = np.stack([xray_pixels(source, classifier.image_size) for source in sources])
    return np.concatenate([model_input(pixels, classifier.preprocessing), export_module.synthetic_inputs(128, 2, 5)])


def test_the_shipped_export_agrees_with_keras_on_real_and_synthetic_xrays(shipped_pair):
    onnx, keras = shipped_pair
    assert (onnx.runtime.name, keras.runtime.name) == ("onnx", "keras")
    inputs = shipped_inputs(onnx)
    onnx_features, onnx_logits = onnx.features_and_logits(inputs, batch_size=5)
    keras_features, keras_logits = keras.features_and_logits(inputs, batch_size=5)
    np.testing.assert_allclose(onnx.calibrated(onnx_logits), keras.calibrated(keras_logits), atol=1e-5)
    np.testing.assert_allclose(onnx_features, keras_features, atol=1e-4)
    assert np.ptp(keras.calibrated(keras_logits)) > 0.3  # the inputs differ in what the model says of them
    for i, x in enumerate(inputs):
        logit, cam, features = onnx.explain(x[None])
        expected_logit, expected_cam, expected_features = keras.explain(x[None])
        assert abs(onnx.calibrated(logit) - keras.calibrated(expected_logit)) <= 1e-5
        assert cam.shape == expected_cam.shape == tuple(SHIPPED_CARD_MAP)
        assert np.abs(cam - expected_cam).max() <= 1e-4 * np.abs(expected_cam).max()
        np.testing.assert_allclose(features, expected_features, atol=1e-4)
        assert logit == pytest.approx(float(onnx_logits[i]), abs=1e-4)  # the explain graph's logit is the forward's


def test_the_card_fingerprints_the_export_and_the_keras_file_it_was_made_from(tiny_model_dir):
    """`train` exported the tiny model: the card says which file is which, by sha256."""
    card = json.loads((tiny_model_dir / "model.json").read_text())
    section = card["export"]
    assert section["keras_sha256"] == file_sha256(tiny_model_dir / card["file"])
    assert {entry["file"] for entry in section["files"].values()} == set(EXPORT_FILES)
    for entry in section["files"].values():
        assert entry["sha256"] == file_sha256(tiny_model_dir / entry["file"])
    assert max(section["agreement_with_keras"][k] for k in ("logit", "cam_relative", "features")) <= 1e-4
    # The weights are stored once, in the data file; the graph files hold the graphs.
    assert (tiny_model_dir / WEIGHTS_FILE).stat().st_size > 10 * (tiny_model_dir / EXPLAIN_FILE).stat().st_size


def test_an_export_that_disagrees_with_keras_is_refused_and_nothing_is_written(tiny_model_dir, tmp_path, monkeypatch):
    folder = shutil.copytree(tiny_model_dir, tmp_path / "model", ignore=shutil.ignore_patterns(*EXPORT_FILES))
    card_before = (folder / "model.json").read_text()
    monkeypatch.setattr(export_module, "TOLERANCE", {"logit": -1.0, "cam_relative": -1.0, "features": -1.0})
    with pytest.raises(export_module.ExportError, match="disagrees with Keras"):
        export_module.export(folder, log=lambda *_: None)
    assert not any((folder / name).exists() for name in EXPORT_FILES)
    assert (folder / "model.json").read_text() == card_before
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_calibrate_copies_the_export_and_the_copy_serves_on_onnx(gap_model_dir, tmp_path):
    """The GAP CNN (saved without `train`, so exported here) ranks drawn X-rays: a site sample it can be fitted on."""
    from pneumonia.evaluation.recalibration import recalibrate

    model = shutil.copytree(gap_model_dir, tmp_path / "model")
    export_module.export(model, log=lambda *_: None)
    write_synthetic_dataset(tmp_path / "site-root", per_class=20, splits=("site",), seed=5)
    out = tmp_path / "site-model"
    recalibrate(model, tmp_path / "site-root", out, split="site", log=lambda *_: None, warn=lambda *_: None)
    for name in EXPORT_FILES:
        assert file_sha256(out / name) == file_sha256(model / name)
    recalibrated, original = XrayClassifier(out), XrayClassifier(model)
    assert recalibrated.runtime.name == original.runtime.name == "onnx"
    assert recalibrated.platt != original.platt  # refitted, on the same weights:
    inputs = model_input(xray_pixels(REAL_XRAYS[0], original.image_size), original.preprocessing)[None]
    assert recalibrated.features_and_logits(inputs)[1][0] == pytest.approx(
        original.features_and_logits(inputs)[1][0], abs=1e-6
    )
