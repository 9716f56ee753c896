"""`python -m pneumonia calibrate`: refit calibration and thresholds on a site sample.

The model here is a fixed linear detector of the synthetic pneumonia blob (mean brightness of
the lower-right lung field), not a trained one: `tiny_model_dir` does not separate the classes
after its 4 epochs (AUC about 0.5), so no shift can hurt it, and training a better one would
cost most of this file's time budget. A "site" whose X-rays are 12 grey levels brighter pushes
the NORMAL images' probabilities up, as a different scanner does to the shipped model: the ranking
is kept (same AUC) and the specificity at the original threshold collapses.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import shutil

import numpy as np
import pytest
from builders import (
    CENTRED_NORMALIZATION,
    encode_image,
    probability_of,
    run_cli,
    save_model_dir,
    synthetic_xray,
    upload,
)
from PIL import Image

from pneumonia import cli
from pneumonia.evaluation import recalibration
from pneumonia.scoring.metrics import evaluate_predictions, expected_calibration_error
from pneumonia.serving.card import Calibration, ModelCard, Thresholds, platt, write_card
from pneumonia.serving.classifier import XrayClassifier
from pneumonia.serving.preprocessing import normalize, xray_pixels
from pneumonia.training import dataset
from pneumonia.training.operating_points import choose_thresholds, fit_platt
from pneumonia.training.threshold_rules import rates_at

SIZE = 32
OPACITY = 50  # a faint blob: the classes overlap a little, so thresholds matter
JITTER = 6  # per-image brightness spread (grey levels)
SITE_OFFSET = 15  # the site's images are this much brighter


def blob_detector(image_size: int = SIZE):
    """logit = gain * mean normalised grey level of rows/cols 55-85 % (where the blob is) + bias;
    a 1-channel "features" map for Grad-CAM, then the "logit" Dense layer the classifier reads."""
    import keras
    from keras import layers

    inputs = keras.Input((image_size, image_size, 3), name="xray")
    features = layers.Conv2D(1, 1, use_bias=False, name="features")(inputs)
    logit = layers.Dense(1, name="logit")(layers.Flatten()(features))
    model = keras.Model(inputs, layers.Activation("sigmoid", name="probability")(logit), name="blob_detector")
    model.get_layer("features").set_weights([np.full((1, 1, 3, 1), 1 / 3, np.float32)])
    y, x = (np.mgrid[0:image_size, 0:image_size] + 0.5) / image_size
    region = ((y > 0.55) & (y < 0.85) & (x > 0.55) & (x < 0.85)).astype(np.float32)
    model.get_layer("logit").set_weights([(5.0 * region / region.sum()).reshape(-1, 1), np.zeros(1, np.float32)])
    return model


def shifted_xray(label: int, rng, offset: float) -> Image.Image:
    pixels = np.asarray(synthetic_xray(label, rng, 64, opacity=OPACITY), float) + offset + rng.normal(0, JITTER)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).convert("RGB")


def write_site(folder, per_class: int, seed: int, offset: float = SITE_OFFSET):
    """folder/{NORMAL,PNEUMONIA}/ with Kaggle-style names, two images per patient."""
    rng = np.random.default_rng(seed)
    for label, class_name in enumerate(dataset.CLASS_NAMES):
        (folder / class_name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            name = f"person{i // 2 + 1}_bacteria_{i}.jpeg" if label else f"IM-{i // 2 + 1:04d}-{i % 2 + 1:04d}.jpeg"
            shifted_xray(label, rng, offset).save(folder / class_name / name, quality=92)
    return folder


def site_files(folder) -> dataset.SplitFiles:
    return dataset.scan_split(folder.parent, folder.name)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The blob detector with a card calibrated as `train` does, on 120 unshifted images; a
    report/ folder, a sidecar file, and a checkpoints/ folder (which must not be copied)."""
    out = save_model_dir(blob_detector(), tmp_path_factory.mktemp("blob") / "model", SIZE, "features")
    rng = np.random.default_rng(0)
    labels = np.arange(120) % 2
    pixels = [xray_pixels(encode_image(shifted_xray(int(y), rng, 0), "JPEG", quality=92), SIZE) for y in labels]
    classifier = XrayClassifier(out)
    logits = classifier.features_and_logits(normalize(np.stack(pixels), CENTRED_NORMALIZATION))[1]
    slope, intercept = fit_platt(labels, logits)
    probs = platt(logits, slope, intercept)
    thresholds = choose_thresholds(labels, probs, 0.98)
    card = ModelCard.load(out / "model.json")
    card = dataclasses.replace(
        card,
        calibration=Calibration(slope, intercept, 0.1, expected_calibration_error(labels, probs), "Platt scaling"),
        thresholds=Thresholds(**thresholds, target_sensitivity=0.98, chosen_on="unshifted validation images"),
        validation=evaluate_predictions(labels, probs, thresholds, "blob_detector", "validation"),
        data=dataclasses.replace(card.data, validation={"NORMAL": 60, "PNEUMONIA": 60}),
        # figures taken at these thresholds, as apply_threshold_rule records them (here on the clean images)
        expectations={"framing": {"crop_90": rates_at(labels, probs, thresholds)}},
        held_out_series={
            "series": "NORMAL2-IM",
            "n_normal": 60,
            "thresholds": thresholds,
            "specificity": {name: r["specificity"] for name, r in rates_at(labels, probs, thresholds).items()},
        },
    )
    write_card(out, card)
    (out / "report").mkdir()
    (out / "report" / "metrics.json").write_text(json.dumps(card.to_dict()["validation"]))
    (out / "notes.txt").write_text("a sidecar file\n")
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "last.keras").write_bytes(b"not a model")
    return out


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """60 shifted images per class, split by patient into a calibration half and a held-out half."""
    root = tmp_path_factory.mktemp("site")
    every = site_files(write_site(root / "all", per_class=60, seed=1))
    held_out, calibration = dataset.patient_grouped_split(every, 0.5, seed=0)
    for name, part in (("site-a", calibration), ("held-out", held_out)):
        for path, label in zip(part.paths, part.labels):
            target = root / name / dataset.CLASS_NAMES[label]
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target / path.name)
    assert not {dataset.patient_id(p) + str(y) for p, y in zip(calibration.paths, calibration.labels)} & {
        dataset.patient_id(p) + str(y) for p, y in zip(held_out.paths, held_out.labels)
    }
    return root


@pytest.fixture(scope="module")
def recalibrated(model_dir, site, tmp_path_factory):
    """`python -m pneumonia calibrate site-a --model MODEL --out OUT`, as a user runs it."""
    work = tmp_path_factory.mktemp("recalibrated")
    out = work / "site-a-model"
    result = run_cli("calibrate", site / "site-a", "--model", model_dir, "--out", out, cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def held_out_metrics(model_path, folder) -> dict:
    classifier = XrayClassifier(model_path)
    pixels, labels, _ = dataset.load_pixels(site_files(folder), classifier.image_size, log=lambda *_: None)
    probs = classifier.probabilities_from_pixels(pixels)
    metrics = evaluate_predictions(labels, probs, classifier.thresholds, classifier.name, "held-out")
    metrics["ece"] = expected_calibration_error(labels, probs)
    return metrics


def test_recalibration_recovers_specificity_on_the_rest_of_the_site(model_dir, site, recalibrated):
    out, _ = recalibrated
    before = held_out_metrics(model_dir, site / "held-out")
    after = held_out_metrics(out, site / "held-out")
    # The shift hurts the original model: without a refit this test cannot pass.
    assert before["thresholds"]["default"]["specificity"] < 0.4
    assert after["thresholds"]["default"]["specificity"] >= 0.7
    assert after["thresholds"]["default"]["specificity"] > before["thresholds"]["default"]["specificity"] + 0.4
    assert after["thresholds"]["default"]["recall"] >= 0.7
    assert after["thresholds"]["screening"]["recall"] >= after["thresholds"]["default"]["recall"]
    # The Platt refit itself, not only the thresholds: probabilities are calibrated again,
    assert after["ece"] < before["ece"] / 2
    # and the ranking is untouched (same weights, monotone recalibration).
    assert after["auc"] == pytest.approx(before["auc"])


def test_card_keeps_the_previous_values_and_records_the_site_sample(model_dir, site, recalibrated):
    out, _ = recalibrated
    old = json.loads((model_dir / "model.json").read_text())
    card = json.loads((out / "model.json").read_text())
    recal = card["recalibration"]
    assert recal["previous"] == {
        name: old[name] for name in ("calibration", "thresholds", "expectations", "held_out_series")
    }
    # measured at the old thresholds: kept with them, not shown beside the new ones
    assert "expectations" not in card and "held_out_series" not in card
    assert card["calibration"]["slope"] != old["calibration"]["slope"]
    assert card["thresholds"]["default"] > old["thresholds"]["default"]  # brighter NORMALs -> higher threshold
    assert card["thresholds"]["screening"] <= card["thresholds"]["default"]
    assert card["thresholds"]["target_sensitivity"] == 0.98
    files = site_files(site / "site-a")
    sample = recal["site_sample"]
    assert sample["path_name"] == "site-a"
    assert sample["counts"] == files.counts() and min(sample["counts"].values()) >= recalibration.MIN_PER_CLASS
    assert sample["fingerprint"] == dataset.fingerprint(files)
    assert sample["date"] == datetime.date.today().isoformat()
    assert recal["metrics"]["n"] == sample["counts"]
    assert recal["metrics"]["thresholds"]["default"]["threshold"] == card["thresholds"]["default"]
    assert set(recal["metrics"]["ci95_by_threshold"]) == {"default", "screening"}
    assert recal["command"].startswith("python -m pneumonia calibrate site-a --model ")
    assert str(site) not in json.dumps(card)  # no absolute paths of the site sample
    # Everything else is the old card's (the drift monitor's reference is the site sample's: the next test).
    changed = ("calibration", "thresholds", "recalibration", "monitor", *recalibration.MEASURED_AT_THE_THRESHOLDS)
    assert {k: v for k, v in card.items() if k not in changed} == {k: v for k, v in old.items() if k not in changed}
    assert json.loads((out / "report" / "site" / "metrics.json").read_text()) == recal["metrics"]


def test_the_drift_monitors_reference_becomes_the_site_samples(model_dir, recalibrated):
    """The monitor then compares the site's screenings with the sample its thresholds were fitted on."""
    card = ModelCard.load(recalibrated[0] / "model.json")
    assert card.monitor.computed_on.startswith("site sample site-a")
    assert set(card.monitor.bands) == {"uncertain_share", "above_default", "above_screening"}  # no gate here
    assert card.monitor.bands["above_default"].low == card.thresholds.default
    assert card.monitor.bands["above_screening"].of == sum(card.recalibration.site_sample.counts.values())
    assert card.recalibration.previous.monitor == ModelCard.load(model_dir / "model.json").monitor


def test_the_model_file_is_copied_byte_for_byte_with_report_and_sidecars(model_dir, recalibrated):
    out, _ = recalibrated
    assert (out / "model.keras").read_bytes() == (model_dir / "model.keras").read_bytes()
    assert (out / "report" / "metrics.json").read_bytes() == (model_dir / "report" / "metrics.json").read_bytes()
    assert (out / "notes.txt").read_text() == "a sidecar file\n"
    assert not (out / "checkpoints").exists()
    assert not list(out.parent.glob(".*partial*"))


def test_prints_the_operating_figures_and_warns_below_100_per_class(recalibrated):
    out, result = recalibrated
    card = json.loads((out / "model.json").read_text())
    assert "warning: small site sample" in result.stderr
    assert "fewer than 100 per class" in card["recalibration"]["warning"]
    assert "AUC" in result.stdout and "sensitivity" in result.stdout and "specificity" in result.stdout
    default = card["recalibration"]["metrics"]["thresholds"]["default"]
    assert f"default {default['threshold']:.3f}" in result.stdout
    low, high = card["recalibration"]["metrics"]["ci95_by_threshold"]["default"]["specificity"]
    assert f"{default['specificity']:.3f} [{low:.3f}, {high:.3f}]" in result.stdout
    assert f"wrote {out}" in result.stdout


def test_sample_size_floor_and_warning():
    with pytest.raises(recalibration.RecalibrationError, match="at least 20 of each class"):
        recalibration.sample_size_warning({"NORMAL": 19, "PNEUMONIA": 500})
    assert "fewer than 100" in recalibration.sample_size_warning({"NORMAL": 20, "PNEUMONIA": 20})
    assert "NORMAL" not in recalibration.sample_size_warning({"NORMAL": 100, "PNEUMONIA": 99})
    assert recalibration.sample_size_warning({"NORMAL": 100, "PNEUMONIA": 100}) is None


def test_refuses_below_the_floor_and_writes_nothing(model_dir, tmp_path, capsys):
    small = write_site(tmp_path / "small", per_class=19, seed=2)
    out = tmp_path / "out"
    assert cli.main(["calibrate", str(small), "--model", str(model_dir), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "too few images to recalibrate on: NORMAL 19, PNEUMONIA 19" in err and "at least 20" in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["small"]


def test_refuses_an_occupied_output_folder_and_the_model_folder(model_dir, site, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("")
    for out in (tmp_path / "taken", model_dir):
        assert cli.main(["calibrate", str(site / "site-a"), "--model", str(model_dir), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "model's own folder" in err
    assert cli.main(["calibrate", str(tmp_path), "--model", str(model_dir), "--out", str(tmp_path / "o")]) == 2
    assert "no NORMAL/ or PNEUMONIA/ images" in capsys.readouterr().err


def test_split_reads_a_kaggle_layout_root(model_dir, site, tmp_path):
    result = recalibration.recalibrate(
        model_dir, site, tmp_path / "out", split="site-a", log=lambda *_: None, warn=lambda *_: None
    )
    sample = result.card.recalibration.site_sample
    assert sample.path_name == "site-a" and sample.fingerprint == dataset.fingerprint(site_files(site / "site-a"))
    assert "--split site-a" in result.card.recalibration.command


def test_the_app_serves_the_recalibrated_model(model_dir, recalibrated):
    from pneumonia.web import create_app

    out, _ = recalibrated
    card = json.loads((out / "model.json").read_text())
    client = create_app({"MODEL_PATH": str(out), "TESTING": True}).test_client()
    data = encode_image(shifted_xray(0, np.random.default_rng(7), SITE_OFFSET), "JPEG", quality=92)
    response = client.post("/api/predict?gradcam=0", data=upload(data, "x.jpeg"))
    assert response.status_code == 200, response.get_data(as_text=True)
    body = response.get_json()
    assert body["thresholds"] == {
        "default": card["thresholds"]["default"],
        "screening": card["thresholds"]["screening"],
    }
    assert body["probability"] == pytest.approx(probability_of(XrayClassifier(out), data), abs=1e-6)

    # the result page reads each threshold's figures where it was chosen: the site sample, not validation
    result = client.post("/predict", data=upload(data, "x.jpeg")).get_data(as_text=True)
    site_default = card["recalibration"]["metrics"]["thresholds"]["default"]
    assert "(calibrated on the site sample)" in result and "validation set" not in result
    assert f"On the site sample it found {100 * site_default['recall']:.1f} %" in result

    page = client.get("/model").get_data(as_text=True)
    sample = card["recalibration"]["site_sample"]
    assert 'id="recalibration"' in page and "recalibrated for a site" in page
    assert sample["date"] in page
    assert f"NORMAL {sample['counts']['NORMAL']}, PNEUMONIA {sample['counts']['PNEUMONIA']}" in page
    previous = card["recalibration"]["previous"]["thresholds"]
    for name in ("default", "screening"):
        assert f"{previous[name]:.3f}" in page and f"{card['thresholds'][name]:.3f}" in page
    assert "small site sample" in page  # the warning

    assert 'id="expect-crop_90"' not in page and 'id="expect-held-out-series"' not in page

    original = create_app({"MODEL_PATH": str(model_dir), "TESTING": True}).test_client().get("/model")
    assert original.status_code == 200 and 'id="recalibration"' not in original.get_data(as_text=True)
    original = original.get_data(as_text=True)
    assert 'id="expect-crop_90"' in original
    held = json.loads((model_dir / "model.json").read_text())["held_out_series"]
    row = original.split('id="expect-held-out-series"')[1].split("</tr>")[0]
    assert "NORMAL2-IM" in row and f"{100 * held['specificity']['screening']:.0f} % / –" in row
