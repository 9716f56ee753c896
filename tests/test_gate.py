"""The out-of-distribution gate: pixel checks, feature density, thresholds, storage, and the
contract in the API, the pages and the CLI."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
from builders import (
    REAL_XRAYS,
    SHARED_SAMPLES,
    SHIPPED_MODEL,
    encode_image,
    noise_png,
    run_cli,
    sample_photo,
    screen_one,
    upload,
    xray_jpeg,
)
from PIL import Image

from pneumonia.reading.decoding import decode_xray
from pneumonia.reading.pixel_stats import PixelStats, grey_spread, mean_chroma
from pneumonia.serving.classifier import XrayClassifier
from pneumonia.serving.gate import (
    ACCEPT_QUANTILE,
    GATE_FILE,
    FeatureDensity,
    OodGate,
    feature_thresholds,
    fit_feature_density,
    load_gate_for,
    pixel_bounds,
    pixel_verdict,
)


def uniform(level: int, size=(300, 300)) -> bytes:
    return encode_image(Image.new("L", size, level), "PNG")


# --- Pixel checks ------------------------------------------------------------------------

TRAIN_STATS = [
    PixelStats(224, 224, chroma=c, spread=s) for c, s in zip(np.linspace(0, 2, 100), np.linspace(150, 230, 100))
]


def test_bounds_come_from_training_percentiles_with_the_stated_slack():
    bounds = pixel_bounds(TRAIN_STATS)
    d = bounds.derivation
    assert bounds.min_pixels == int(d["min_pixels_fraction"] * 224 * 224)
    assert bounds.max_chroma == pytest.approx(np.percentile(np.linspace(0, 2, 100), 99.9) + d["tint_allowance"])
    assert bounds.min_spread == pytest.approx(d["min_spread_fraction"] * np.percentile(np.linspace(150, 230, 100), 0.1))
    # square training copies say nothing about aspect: the floor applies
    assert bounds.max_aspect == d["aspect_limit_at_least"]
    wide = pixel_bounds([PixelStats(900, 150, 0, 200)] * 10)
    assert wide.max_aspect == pytest.approx(6.0)  # wider training images widen the bound


@pytest.mark.parametrize(
    "stats, reason",
    [
        (PixelStats(60, 60, 0, 200), "size"),
        (PixelStats(8, 60_000, 0, 200), "shape"),
        (PixelStats(640, 427, 71.5, 190), "colour"),
        (PixelStats(500, 500, 0, 0), "blank"),
    ],
)
def test_each_pixel_check_refuses_what_it_is_for(stats, reason):
    verdict = pixel_verdict(stats, pixel_bounds(TRAIN_STATS))
    assert verdict.verdict == "rejected" and verdict.reason == reason
    assert verdict.threshold is not None


def test_a_real_looking_xray_and_a_mild_tint_pass_the_pixel_checks():
    bounds = pixel_bounds(TRAIN_STATS)
    assert pixel_verdict(PixelStats(1632, 1225, 0.0, 214), bounds) is None
    assert pixel_verdict(PixelStats(445, 140, 0.0, 183), bounds) is None  # the widest Kaggle original
    assert pixel_verdict(PixelStats(1200, 1000, 9.0, 180), bounds) is None  # a phone photo of a film: tinted


def test_measurements_on_decoded_images():
    grey = Image.fromarray(np.tile(np.arange(256, dtype=np.uint8), (10, 1)))
    assert mean_chroma(grey) == 0 and 250 <= grey_spread(grey) <= 254
    assert grey_spread(Image.new("L", (50, 50), 77)) == 0
    tinted = Image.merge("RGB", [grey.point(lambda v: min(255, v + 10)), grey, grey])
    assert 5 < mean_chroma(tinted) <= 10
    _, flower = decode_xray(sample_photo("flower.jpg"))
    assert flower.chroma > 40 and (flower.width, flower.height) == (640, 427)
    rgba = Image.new("RGBA", (100, 100), (255, 0, 0, 0))  # fully transparent: black after compositing
    assert decode_xray(encode_image(rgba, "PNG"))[1].spread == 0


# --- Feature density and thresholds --------------------------------------------------------


def test_mahalanobis_distance_to_the_nearer_class_mean():
    density = FeatureDensity(np.array([[0.0, 0.0], [10.0, 0.0]]), np.diag([1.0, 4.0]))
    np.testing.assert_allclose(
        density.distance(np.array([[1.0, 1.0], [9.0, 0.0], [5.0, 0.0]])), [np.sqrt(1 + 4), 1.0, 5.0]
    )


def test_density_fit_separates_far_points_and_thresholds_pass_the_validation_quantile():
    rng = np.random.default_rng(0)
    labels = np.arange(600) % 2
    features = rng.normal(0, 1, (600, 16)) + 3 * labels[:, None]
    density = fit_feature_density(features, labels)
    np.testing.assert_allclose(density.means[1] - density.means[0], 3, atol=0.3)
    val = rng.normal(0, 1, (400, 16)) + 3 * (np.arange(400) % 2)[:, None]
    scores = density.distance(val)
    thresholds = feature_thresholds(scores)
    assert (scores <= thresholds["rejected"]).mean() >= ACCEPT_QUANTILE
    assert thresholds["unusual"] < thresholds["rejected"]
    far = density.distance(rng.normal(0, 1, (50, 16)) + 12)
    assert (far > thresholds["rejected"]).all()


@pytest.mark.parametrize(
    "stats, score, verdict, reason",
    [
        (PixelStats(60, 60, 0, 200), 0.5, "rejected", "size"),  # the pixel checks come first
        (PixelStats(60, 60, 0, 200), 9.0, "rejected", "size"),
        (PixelStats(1632, 1225, 0.0, 214), 9.0, "rejected", "features"),
        (PixelStats(1632, 1225, 0.0, 214), 2.5, "unusual", None),
        (PixelStats(1632, 1225, 0.0, 214), 0.5, "ok", None),
    ],
)
def test_the_gate_verdict_checks_pixels_then_the_feature_distance(stats, score, verdict, reason):
    gate = OodGate(
        pixel_bounds(TRAIN_STATS), FeatureDensity(np.zeros((2, 3)), np.eye(3)), {"unusual": 2.0, "rejected": 3.0}, {}
    )
    answer = gate.verdict(stats, np.float32(score))
    assert (answer.verdict, answer.reason) == (verdict, reason)


def test_gate_round_trips_through_its_file(tmp_path):
    density = FeatureDensity(np.zeros((2, 3)), np.eye(3))
    gate = OodGate(pixel_bounds(TRAIN_STATS), density, {"unusual": 2.0, "rejected": 3.0}, {"model_sha256": "x"})
    gate.save(tmp_path / GATE_FILE)
    loaded = OodGate.load(tmp_path / GATE_FILE)
    assert loaded.thresholds == gate.thresholds and loaded.bounds == gate.bounds and loaded.info == gate.info
    assert loaded.check_features(np.array([0, 0, 2.5])).verdict == "unusual"
    assert loaded.check_features(np.array([0, 0, 1.0])).verdict == "ok"
    refused = loaded.check_features(np.array([0, 0, 4.0]))
    assert (refused.verdict, refused.reason, refused.threshold) == ("rejected", "features", 3.0)


# --- A trained model's gate ----------------------------------------------------------------


def test_train_fits_the_gate_and_records_it(tiny_model_dir):
    card = json.loads((tiny_model_dir / "model.json").read_text())
    assert (tiny_model_dir / GATE_FILE).is_file()
    ood = card["ood"]
    assert ood["validation"]["refused_fraction"] <= 1 - ACCEPT_QUANTILE + 1e-9 or ood["validation"]["images"] < 200
    assert set(ood["detection"]) >= {
        "photos (scikit-learn samples and crops)",
        "blank (black, white, grey, faint noise)",
        "noise (uniform, Gaussian)",
        "rendered text",
    }
    classifier = XrayClassifier(tiny_model_dir)
    assert classifier.gate is not None and classifier.gate_status == "on"


def test_pixel_checks_refuse_before_the_model_whatever_the_model(tiny_model_dir):
    classifier = XrayClassifier(tiny_model_dir)
    for data, reason in (
        (sample_photo("flower.jpg"), "colour"),
        (sample_photo("china.jpg"), "colour"),
        (uniform(0), "blank"),
        (uniform(255), "blank"),
        (encode_image(Image.new("L", (8, 6000), 90), "PNG"), "shape"),
    ):
        probability, verdict = screen_one(classifier, data)
        assert probability is None and verdict.reason == reason


def test_a_gate_fitted_for_another_model_file_is_not_used(tiny_model_dir, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    with (copy / "custom.keras").open("ab") as handle:
        handle.write(b"\0")  # another file: another sha256 (the zip still loads)
    classifier = XrayClassifier(copy)
    assert classifier.gate is None and "another model file" in classifier.gate_status


# --- The shipped model's gate ---------------------------------------------------------------


def test_shipped_model_card_records_its_gate_and_the_validation_false_refusals():
    card = json.loads((SHIPPED_MODEL / "model.json").read_text())
    assert card["ood"]["validation"]["images"] >= 500
    assert card["ood"]["validation"]["refused_fraction"] <= 0.01  # at least 99 % of validation X-rays pass
    for name, figures in card["ood"]["detection"].items():
        assert figures["refused_fraction"] >= 0.9, name


@pytest.fixture(scope="module")
def shipped(shipped_app):
    return shipped_app.extensions["screener"].classifier


def test_shipped_model_accepts_real_xrays_and_refuses_photos_blank_and_noise(shipped):
    assert shipped.gate is not None, shipped.gate_status
    for path in REAL_XRAYS:
        probability, verdict = screen_one(shipped, path)
        assert probability is not None and verdict.accepted
    for data in (sample_photo("flower.jpg"), sample_photo("china.jpg"), uniform(0), uniform(255), noise_png()):
        probability, verdict = screen_one(shipped, data)
        assert probability is None and not verdict.accepted
    grey_flower = encode_image(Image.open(io.BytesIO(sample_photo("flower.jpg"))).convert("L"), "PNG")
    assert screen_one(shipped, grey_flower)[1].reason == "features"


@pytest.mark.skipif(not SHARED_SAMPLES.is_dir(), reason="needs the full-size sample X-rays in ../shared/samples")
def test_shipped_model_accepts_every_sample_xray(shipped):
    files = sorted(p for p in SHARED_SAMPLES.glob("*/*/*") if p.is_file())
    assert files
    for path in files:
        probability, verdict = screen_one(shipped, path)
        assert probability is not None and verdict.accepted, (path.name, verdict)


# --- The web contract (the shipped model, real X-rays from tests/data) ---------------------


@pytest.fixture(scope="module")
def gated_client(shipped_app):
    return shipped_app.test_client()


@pytest.mark.parametrize("name", ["flower.jpg", "china.jpg"])
def test_api_refuses_a_photo_with_422_and_no_probability(gated_client, name):
    response = gated_client.post("/api/predict", data=upload(sample_photo(name), name))
    assert response.status_code == 422
    body = response.get_json()
    assert body["status"] == 422 and "chest radiograph" in body["error"]
    assert set(body["ood"]) == {"verdict", "reason", "score", "threshold"}
    assert (body["ood"]["verdict"], body["ood"]["reason"]) == ("rejected", "colour")
    assert body["ood"]["score"] > body["ood"]["threshold"]
    assert "probability" not in body and not {"gradcam_png", "gradcam_jpeg"} & set(body)


@pytest.mark.parametrize("data, reason", [(uniform(0), "blank"), (uniform(255), "blank"), (noise_png(1), "features")])
def test_api_refuses_blank_and_noise(gated_client, data, reason):
    body = gated_client.post("/api/predict", data=upload(data, "x.png")).get_json()
    assert body["status"] == 422 and body["ood"]["reason"] == reason


@pytest.mark.parametrize("path", REAL_XRAYS, ids=lambda p: p.name)
def test_api_answers_a_real_xray_with_the_verdict_and_thresholds(gated_client, path):
    response = gated_client.post("/api/predict", data=upload(path.read_bytes(), path.name))
    assert response.status_code == 200
    ood = response.get_json()["ood"]
    assert ood["verdict"] in ("ok", "unusual") and set(ood["thresholds"]) == {"unusual", "rejected"}
    assert ("warning" in ood) == (ood["verdict"] == "unusual")
    assert ood["score"] <= ood["thresholds"]["rejected"]


def test_form_refusal_page_says_what_was_expected_and_shows_no_result(gated_client):
    response = gated_client.post("/predict", data=upload(sample_photo("flower.jpg"), "flower.jpg"))
    page = response.get_data(as_text=True)
    assert response.status_code == 422
    assert "frontal chest radiograph" in page and "in colour" in page
    assert "Probability of pneumonia" not in page and 'id="overlay"' not in page


def test_model_page_and_healthz_show_the_gate(gated_client):
    page = gated_client.get("/model").get_data(as_text=True)
    assert 'id="ood-rejected"' in page and 'id="ood-detection"' in page and 'id="ood-false-refusal"' in page
    assert gated_client.get("/healthz").get_json()["ood_gate"] == "on"


def test_a_model_without_a_gate_serves_and_says_the_gate_is_off(client):
    body = client.post("/api/predict", data=upload(sample_photo("flower.jpg"), "f.jpg")).get_json()
    assert 0 <= body["probability"] <= 1
    assert body["ood"]["verdict"] == "unchecked" and body["ood"]["gate"] == "off"
    assert client.get("/healthz").get_json()["ood_gate"].startswith("off: no ood.npz")
    assert 'id="ood-off"' in client.get("/model").get_data(as_text=True)
    page = client.post("/predict", data=upload(xray_jpeg(), "x.jpeg")).get_data(as_text=True)
    assert 'id="ood-off"' in page


# --- The command line -----------------------------------------------------------------------


@pytest.mark.slow  # two fresh interpreters each load the shipped DenseNet121
def test_predict_prints_the_reason_for_a_refused_file(tmp_path, capsys):
    from pneumonia.cli import main  # in-process: two more TensorFlow start-ups would add a minute

    (tmp_path / "flower.jpg").write_bytes(sample_photo("flower.jpg"))
    (tmp_path / "noise.png").write_bytes(noise_png(2))
    xray = REAL_XRAYS[0]
    paths = [str(tmp_path / "flower.jpg"), str(xray), str(tmp_path / "noise.png")]
    main(["predict", *paths, "--json", "--model", str(SHIPPED_MODEL)])
    flower, accepted, noisy = (json.loads(line) for line in capsys.readouterr().out.strip().splitlines())
    assert flower["probability"] is None and flower["ood"] == {
        "verdict": "rejected",
        "reason": "colour",
        "score": pytest.approx(flower["ood"]["score"]),
        "threshold": pytest.approx(flower["ood"]["threshold"]),
    }
    assert noisy["probability"] is None and noisy["ood"]["reason"] == "features"
    assert 0 <= accepted["probability"] <= 1 and accepted["ood"]["verdict"] in ("ok", "unusual")
    main(["predict", paths[0], "--model", str(SHIPPED_MODEL)])
    plain = capsys.readouterr().out
    assert "not screened (colour)" in plain and "chest radiograph" in plain


def test_fit_ood_refits_a_model_that_has_none(tiny_model_dir, synthetic_data_dir, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    (copy / GATE_FILE).unlink()
    card = json.loads((copy / "model.json").read_text())
    del card["ood"]
    (copy / "model.json").write_text(json.dumps(card))
    result = run_cli("fit-ood", copy, synthetic_data_dir, "--cache-dir", tmp_path / "cache", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "thresholds: unusual" in result.stdout and "| rendered text |" in result.stdout
    assert XrayClassifier(copy).gate is not None
    assert "ood" in json.loads((copy / "model.json").read_text())


def test_evaluate_reports_what_the_gate_refuses_and_metrics_on_accepted(tiny_model_dir, synthetic_data_dir, tmp_path):
    result = run_cli(
        "evaluate",
        synthetic_data_dir,
        "--split",
        "test",
        "--model",
        tiny_model_dir,
        "--out",
        tmp_path / "r",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    gate = json.loads((tmp_path / "r" / "metrics.json").read_text())["ood_gate"]
    assert gate["gate"] == "on" and gate["images"] == 24
    assert 0 <= gate["refused_fraction"] <= 1 and "out-of-distribution gate: refused" in result.stdout
    if gate["refused_fraction"] < 1:
        assert gate["metrics_on_accepted"] is None or gate["metrics_on_accepted"]["split"].endswith(
            "(accepted by the gate)"
        )


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda meta: meta["bounds"].pop("min_spread"), "field meta.bounds.min_spread is missing"),
        (lambda meta: meta["thresholds"].update(rejected="high"), "meta.thresholds.rejected should be float"),
        (lambda meta: meta["info"].pop("model_sha256"), "field meta.info.model_sha256 is missing"),
    ],
)
def test_a_gate_file_with_bad_metadata_is_refused_naming_the_file_and_the_field(tmp_path, change, named):
    stored = dict(np.load(SHIPPED_MODEL / GATE_FILE))
    meta = json.loads(str(stored["meta"]))
    change(meta)
    np.savez(tmp_path / GATE_FILE, **{**stored, "meta": np.array(json.dumps(meta))})
    gate, reason = load_gate_for(tmp_path / "model.keras", "any sha256")
    assert gate is None and reason.startswith(f"the gate file {tmp_path / GATE_FILE} is not valid") and named in reason


def test_fit_ood_without_training_images_exits_2_saying_so(tiny_model_dir, tmp_path, capsys):
    from pneumonia import cli

    (tmp_path / "data" / "train" / "NORMAL").mkdir(parents=True)
    assert cli.main(["fit-ood", str(tiny_model_dir), str(tmp_path / "data"), "--cache-dir", str(tmp_path / "c")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'data'} has no train/NORMAL or train/PNEUMONIA")
