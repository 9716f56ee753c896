"""Robustness proxies: the shifts, the one preprocessing path, the validation reconstruction and
the `robustness` command. Synthetic data only (nothing from ../shared/)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from builders import synthetic_xray, write_synthetic_dataset

from pneumonia import cli
from pneumonia.serving.classifier import XrayClassifier, find_card
from pneumonia.serving.preprocessing import preprocess, xray_pixels
from pneumonia.training import dataset
from studies import robustness

SHIFT_NAMES = [s.name for s in robustness.SHIFTS]


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
    shifted = robustness.apply_shift(name, xray, seed=7)
    assert np.array_equal(np.asarray(xray), before)  # the decoded image is not modified in place
    assert shifted.mode == "L"
    pixels = np.asarray(shifted)
    assert pixels.dtype == np.uint8 and pixels.min() >= 0 and pixels.max() <= 255
    if name.startswith("crop_"):  # the tighter field of view; the package's resize then stretches it
        fraction = int(name.removeprefix("crop_")) / 100
        assert shifted.size == (round(fraction * 96), round(fraction * 96))
        assert not np.array_equal(robustness.model_pixels(shifted, 96), before)
    else:
        assert shifted.size == xray.size
        changed = np.abs(pixels.astype(int) - before.astype(int))
        assert changed.max() > 0 and (changed > 0).mean() > 0.05, f"{name} barely changes the image"
    # Deterministic: the same seed gives the same image (noise included), so models compare fairly.
    assert np.array_equal(np.asarray(robustness.apply_shift(name, xray, seed=7)), pixels)


def test_no_shift_is_the_identity(xray):
    assert np.array_equal(np.asarray(robustness.apply_shift(robustness.BASELINE, xray)), np.asarray(xray))


@pytest.mark.parametrize("name", [robustness.BASELINE] + SHIFT_NAMES)
def test_shift_then_package_preprocessing_equals_preprocessing_a_saved_file(xray, name, tmp_path):
    """No second path: the model input of a shifted image is exactly what `preprocess` makes of
    the same image saved losslessly and read back as an upload."""
    spec = {"image_size": 32, "normalization": {"scale": 1 / 255, "mean": [0.45] * 3, "std": [0.2] * 3}}
    shifted = robustness.apply_shift(name, xray, seed=11)
    path = tmp_path / f"{name}.png"
    shifted.save(path)
    in_memory = robustness.model_pixels(shifted, spec["image_size"])
    assert np.array_equal(in_memory, xray_pixels(path, spec["image_size"]))
    from pneumonia.serving.preprocessing import normalize

    assert np.array_equal(normalize(in_memory, spec["normalization"]), preprocess(path, spec))


def test_shifted_probability_equals_predicting_the_saved_file(gap_model_dir, xray, tmp_path):
    """The batched scoring the report uses gives what `predict` gives for the saved file: the raw
    logits and the calibrated probability. The GAP CNN, which learned its task, so the logits
    differ from image to image."""
    from pneumonia.serving.preprocessing import normalize

    classifier = XrayClassifier(gap_model_dir)
    images = [robustness.apply_shift(name, xray, seed=5) for name in ("blur_r2", "noise_s5", "crop_90")]
    batch = np.stack([robustness.model_pixels(image, classifier.image_size) for image in images])
    logits = classifier.logits(normalize(batch, classifier.preprocessing["normalization"]))
    batched = classifier.probabilities_from_pixels(batch)
    assert np.ptp(logits) > 0
    for index, (image, probability) in enumerate(zip(images, batched)):
        path = tmp_path / f"shifted{index}.png"
        image.save(path)
        from_file = classifier.logits(preprocess(path, classifier.preprocessing)[None])
        assert from_file[0] == pytest.approx(logits[index], abs=1e-5)
        assert classifier.predict_source(path) == pytest.approx(probability, abs=1e-6)


def test_validation_reconstruction_matches_the_card_fingerprint(tiny_model_dir, synthetic_data_dir):
    _, card = find_card(tiny_model_dir)
    val, info = robustness.validation_files(synthetic_data_dir, card)
    assert info["fingerprint_matches"] and "warning" not in info
    assert dataset.fingerprint(val) == card["data"]["validation_fingerprint"]
    assert info["n"] == card["data"]["validation"]

    other_seed = json.loads(json.dumps(card))
    other_seed["training"]["config"]["seed"] += 1
    _, info = robustness.validation_files(synthetic_data_dir, other_seed)
    assert not info["fingerprint_matches"] and "differs" in info["warning"]

    del other_seed["training"]
    with pytest.raises(robustness.RobustnessError, match="val_fraction and seed"):
        robustness.validation_files(synthetic_data_dir, other_seed)


@pytest.fixture(scope="module")
def originals_dir(tmp_path_factory):
    """FOLDER/{NORMAL,PNEUMONIA}: larger synthetic 'originals', 3 per class."""
    root = tmp_path_factory.mktemp("originals")
    write_synthetic_dataset(root, per_class=3, splits=("val",), seed=4, size=160)
    return root / "val"


def test_cli_writes_one_row_per_shift(tiny_model_dir, synthetic_data_dir, originals_dir, tmp_path, capsys):
    out = tmp_path / "report"
    code = cli.main(
        [
            "robustness",
            str(synthetic_data_dir),
            "--model",
            str(tiny_model_dir),
            "--model",
            str(tiny_model_dir),
            "--originals",
            str(originals_dir),
            "--out",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    report = json.loads((out / "robustness.json").read_text())
    markdown = (out / "robustness.md").read_text()
    assert markdown in printed
    assert len(report["models"]) == 2
    first, second = report["models"]
    assert first["name"] != second["name"] and f"| {first['name']} | {second['name']} |" in markdown
    assert [row["shift"] for row in first["shifts"]] == [robustness.BASELINE] + SHIFT_NAMES
    for row in first["shifts"]:
        assert math.isfinite(row["auc"]) and 0 <= row["auc"] <= 1
        assert 0 <= row["normal_mean_p"] <= 1 and 0 <= row["pneumonia_mean_p"] <= 1
        for threshold in ("default", "screening"):
            assert 0 <= row[threshold]["specificity"] <= 1 and 0 <= row[threshold]["recall"] <= 1
        assert f"| {row['shift'] if row['shift'] != 'none' else 'none'}" in markdown
    assert first["shifts"] == second["shifts"]  # the same model scores the same shifted images identically
    summary = first["summary"]
    specs = [r["default"]["specificity"] for r in first["shifts"][1:]]
    assert summary["worst_specificity_default"] == min(specs)
    assert summary["mean_specificity_default"] == pytest.approx(np.mean(specs))
    assert "worst case over shifts" in markdown and "mean over shifts" in markdown
    assert first["validation"]["fingerprint_matches"]
    originals = first["originals"]
    assert originals["n"] == {"NORMAL": 3, "PNEUMONIA": 3} and len(originals["images"]) == 6
    assert math.isfinite(originals["auc"])
    assert [s["series"] for s in first["series"]] == ["IM"] and first["series"][0]["n_train"] > 0
    assert "--hold-out-series" in markdown  # the notes say how to test transfer to an unseen series


def test_cli_skips_missing_originals_with_a_message(tiny_model_dir, synthetic_data_dir, tmp_path, capsys):
    out = tmp_path / "report"
    code = cli.main(
        [
            "robustness",
            str(synthetic_data_dir),
            "--model",
            str(tiny_model_dir),
            "--originals",
            str(tmp_path / "absent"),
            "--out",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    assert "has no NORMAL/ or PNEUMONIA/ images; skipped" in printed
    assert json.loads((out / "robustness.json").read_text())["models"][0]["originals"] is None


def test_cli_reports_a_missing_train_split(tiny_model_dir, tmp_path, capsys):
    code = robustness.main([str(tmp_path), "--model", str(tiny_model_dir), "--out", str(tmp_path / "r")])
    assert code == 2
    assert "no train/NORMAL" in capsys.readouterr().err
