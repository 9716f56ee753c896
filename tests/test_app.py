"""The Flask app: every route, headers, model loading, errors, memory-only uploads, threads,
and the gunicorn entry point."""

from __future__ import annotations

import base64
import importlib
import io
import json
import re
import runpy
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from html.parser import HTMLParser
from pathlib import Path

import cv2
import numpy as np
import pytest
import requests
from builders import REPO, encode_image, gunicorn_serving, probability_of, synthetic_xray, upload, xray_jpeg
from PIL import Image

from pneumonia.serving.classifier import XrayClassifier
from pneumonia.web import create_app
from pneumonia.web.screener import current_screener
from pneumonia.web.uploads import InMemoryRequest

DISCLAIMER = "research tool, not a medical device"
CITATION = ("Kermany", "Zhang", "Goldbaum", "2018", "Mendeley Data", "V2", "10.17632/rscbjbr9sj.2", "CC BY 4.0")


def decode(encoded: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(encoded, np.uint8), cv2.IMREAD_UNCHANGED)


def data_uri_image(html: str, element_id: str) -> np.ndarray:
    match = re.search(rf'<img id="{element_id}"[^>]* src="data:image/jpeg;base64,([^"]+)"', html)
    return decode(base64.b64decode(match.group(1)))


class PageAudit(HTMLParser):
    """Collects what CSP and offline use care about: inline code and external resources."""

    def __init__(self):
        super().__init__()
        self.problems: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "style":
            self.problems.append("<style> element")
        for name in attrs:
            if name == "style" or name.startswith("on"):
                self.problems.append(f"inline {name}= on <{tag}>")
        if tag == "script":
            self._in_script = True
            if not attrs.get("src"):
                self.problems.append("inline <script>")
        resource = attrs.get("src") if tag in ("script", "img") else attrs.get("href") if tag == "link" else None
        if resource and not (resource.startswith("/") or resource.startswith("data:image/")):
            self.problems.append(f"external resource {resource}")

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = False

    def handle_data(self, data):
        if self._in_script and data.strip():
            self.problems.append("inline script code")


def audit(html: str) -> list[str]:
    parser = PageAudit()
    parser.feed(html)
    return parser.problems


@pytest.fixture(scope="module")
def result_page(web_app):
    response = web_app.test_client().post("/predict", data=upload(xray_jpeg(400, 300)))
    assert response.status_code == 200
    return response


def test_index_is_a_form_that_works_without_javascript(client):
    response = client.get("/")
    html = response.get_data(as_text=True)
    assert response.status_code == 200
    assert 'action="/predict" method="post" enctype="multipart/form-data"' in html
    assert '<input type="file" id="file" name="file"' in html and 'type="submit"' in html
    assert 'id="dropzone"' in html and "drag and drop" in html
    assert DISCLAIMER in html.lower()


def test_every_page_is_offline_safe_and_carries_the_disclaimer(client, result_page):
    pages = {
        "/": client.get("/"),
        "/model": client.get("/model"),
        "/predict": result_page,
        "404": client.get("/no-such-page"),
        "400": client.post("/predict", data={}),
    }
    for name, response in pages.items():
        html = response.get_data(as_text=True)
        assert DISCLAIMER in html.lower(), name
        assert audit(html) == [], name


@pytest.mark.parametrize(
    "method, path",
    [
        ("get", "/"),
        ("get", "/model"),
        ("get", "/healthz"),
        ("post", "/api/predict"),
        ("get", "/nowhere"),
        ("get", "/static/app.js"),
    ],
)
def test_security_headers_on_every_response(client, method, path):
    response = getattr(client, method)(path)
    csp = response.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "style-src 'self'" in csp and "img-src 'self' data:" in csp
    assert "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert response.headers["X-Content-Type-Options"] == "nosniff"


def test_static_files_are_local(client):
    for name in ("app.js", "style.css", "favicon.svg"):
        assert client.get(f"/static/{name}").status_code == 200
    javascript = (REPO / "pneumonia" / "web" / "static" / "app.js").read_text()
    assert "http" not in javascript and "eval(" not in javascript


def test_result_page_shows_probability_labels_images_model_and_time(result_page, ungated_model_dir):
    html = result_page.get_data(as_text=True)
    card = XrayClassifier(ungated_model_dir).card
    assert result_page.headers["Cache-Control"] == "no-store"
    assert 'id="probability"' in html and "Probability of pneumonia" in html
    for name in ("default", "screening"):
        assert f"{name.capitalize()} threshold {card.thresholds.as_dict()[name]:.3f}" in html
        assert f'id="label-{name}"' in html
    assert "Balanced" in html and "false alarms" in html  # what each threshold means
    default = card.validation.thresholds["default"]
    assert f"On the validation set it found {100 * default.recall:.1f} %" in html
    assert card.name in html and f"validation AUC {card.validation.auc:.3f}" in html
    assert 'id="timing"' in html and "Processed in" in html
    assert f"Layer {card.gradcam.layer}, 8×8 cells" in html
    original, blended = data_uri_image(html, "original"), data_uri_image(html, "overlay")
    assert original.shape == (300, 400) and blended.shape == (300, 400, 3)  # the upload's own aspect
    assert 'id="opacity"' in html  # the slider, revealed by static/app.js


def test_result_page_shows_the_capped_probability_and_what_a_new_site_can_expect(result_page, web_app):
    html = result_page.get_data(as_text=True)
    card = current_card(web_app)
    exact = web_app.test_client().post("/api/predict", data=upload(xray_jpeg(400, 300))).get_json()
    shown = html.split('id="probability">', 1)[1].split("<", 1)[0]
    assert shown == card.shown_probability(exact["probability"]) == exact["probability_text"]
    assert 'id="expectations"' in html and 'id="site-advice"' in html and "about 200" in html
    crop = card.expectations["framing"]["crop_80"]["default"]
    row = html.split('id="expect-crop_80"')[1].split("</tr>")[0]
    assert f"{100 * crop['specificity']:.0f} % / {100 * crop['recall']:.0f} %" in row


def current_card(app):
    with app.app_context():
        return current_screener().card


def test_normal_result_says_the_heatmap_shows_evidence_for_normal(gap_model_dir):
    client = create_app({"MODEL_PATH": str(gap_model_dir)}).test_client()
    normal = encode_image(synthetic_xray(0, np.random.default_rng(3), 64), "PNG")
    html = client.post("/predict", data=upload(normal, "n.png")).get_data(as_text=True)
    assert 'id="label-default">NORMAL' in html and "evidence for NORMAL" in html
    pneumonia = encode_image(synthetic_xray(1, np.random.default_rng(3), 64), "PNG")
    html = client.post("/predict", data=upload(pneumonia, "p.png")).get_data(as_text=True)
    assert 'id="label-default">PNEUMONIA' in html and "raised the pneumonia score" in html


def test_api_predict_returns_the_documented_json(client, ungated_model_dir):
    data = xray_jpeg(600, 480, seed=4)
    response = client.post("/api/predict", data=upload(data))
    body = response.get_json()
    assert response.status_code == 200 and response.headers["Cache-Control"] == "no-store"
    classifier = XrayClassifier(ungated_model_dir)
    assert body["probability"] == pytest.approx(probability_of(classifier, data), abs=1e-6)
    assert body["thresholds"] == classifier.thresholds
    for key, threshold in (("label", "default"), ("screening_label", "screening")):
        expected = "PNEUMONIA" if body["probability"] >= body["thresholds"][threshold] else "NORMAL"
        assert body[key] == expected
    assert body["model"]["name"] == classifier.name and body["model"]["input_size"] == 32
    assert body["gradcam"]["layer"] == classifier.card.gradcam.layer and body["gradcam"]["map_size"] == [8, 8]
    assert body["gradcam"]["target"] == body["label"]
    jpeg = base64.b64decode(body["gradcam_jpeg"])  # JPEG unless ?overlay=png
    assert jpeg.startswith(b"\xff\xd8\xff") and decode(jpeg).shape == (410, 512, 3)  # long side bounded, 5:4 kept
    assert "gradcam_png" not in body
    assert set(body["timing_ms"]) == {
        "decoder_wait",
        "decode",
        "preprocess",
        "model_gradcam",
        "overlay_encode",
        "total",
    }
    assert "not a medical device" in body["notice"]


def test_api_predict_without_gradcam(client):
    body = client.post("/api/predict?gradcam=0", data=upload(xray_jpeg())).get_json()
    assert body["gradcam_jpeg"] is None and "overlay_encode" not in body["timing_ms"]
    assert 0 <= body["probability"] <= 1


def test_healthz_when_ready(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.get_json()["status"] == "ready" and response.get_json()["gradcam_layer"]


def test_model_page_is_the_model_card(client, ungated_model_dir):
    html = client.get("/model").get_data(as_text=True)
    card = XrayClassifier(ungated_model_dir).card
    assert f'<strong id="auc">{card.validation.auc:.3f}</strong>' in html
    for name in ("Accuracy", "Sensitivity", "Specificity", "TN / FP / FN / TP", "Platt", "intercept"):
        assert name in html
    assert f'<code id="gradcam-layer">{card.gradcam.layer}</code>' in html and "8×8" in html
    assert "Intended use" in html and "Limitations" in html and "not a medical device" in html
    assert all(part in html for part in CITATION)
    plots = sorted(p.name for p in (ungated_model_dir / "report").glob("*.png"))
    assert len(plots) == 5
    for name in plots:
        assert f'src="/model/report/{name}"' in html
        response = client.get(f"/model/report/{name}")
        assert response.status_code == 200 and response.mimetype == "image/png"


@pytest.mark.parametrize("name", ["metrics.json", "history.csv", "..%2Fmodel.json", "../model.json"])
def test_only_the_report_plots_are_served(client, name):
    assert client.get(f"/model/report/{name}").status_code == 404


@pytest.mark.parametrize("path, method", [("/predict", "get"), ("/api/predict", "get"), ("/healthz", "post")])
def test_wrong_method_is_answered_in_kind(client, path, method):
    response = getattr(client, method)(path)
    assert response.status_code == 405
    if path.startswith("/api/") or path == "/healthz":
        assert "does not accept" in response.get_json()["error"]
    else:
        assert "does not accept" in response.get_data(as_text=True)


def _broken_model(tmp_path, ungated_model_dir, how: str) -> Path:
    if how == "missing":
        return tmp_path / "empty"
    broken = tmp_path / "broken"
    shutil.copytree(ungated_model_dir, broken)
    if how == "corrupt model file":
        (broken / "custom.keras").write_bytes(b"not a zip file")
    elif how == "corrupt card":
        (broken / "model.json").write_text("{ not json")
    elif how == "card without preprocessing":
        card = json.loads((broken / "model.json").read_text())
        del card["preprocessing"]
        (broken / "model.json").write_text(json.dumps(card))
    return broken


@pytest.mark.parametrize(
    "how, reason",
    [
        ("missing", "No model card"),
        ("corrupt model file", "could not be loaded"),
        ("corrupt card", "unreadable"),
        ("card without preprocessing", "field preprocessing is missing"),
    ],
)
def test_a_broken_model_is_reported_at_start_up_and_by_healthz(tmp_path, ungated_model_dir, caplog, how, reason):
    (tmp_path / "empty").mkdir()
    with caplog.at_level("ERROR"):
        client = create_app({"MODEL_PATH": str(_broken_model(tmp_path, ungated_model_dir, how))}).test_client()
    assert any("MODEL NOT LOADED" in r.getMessage() and reason in r.getMessage() for r in caplog.records)
    health = client.get("/healthz")
    assert health.status_code == 503 and health.get_json()["ready"] is False and reason in health.get_json()["reason"]
    assert reason in client.get("/").get_data(as_text=True)
    page = client.post("/predict", data=upload(xray_jpeg()))
    api = client.post("/api/predict", data=upload(xray_jpeg()))
    assert page.status_code == api.status_code == client.get("/model").status_code == 503
    assert reason in page.get_data(as_text=True) and reason in api.get_json()["error"]
    assert "Traceback" not in page.get_data(as_text=True)


def test_unexpected_errors_give_a_500_without_traceback_and_log_without_the_image(web_app, monkeypatch, caplog):
    secret = b"\xff\xd8\xffPATIENT-PIXELS"

    def explode(self, data, *args, **kwargs):
        raise RuntimeError(f"bug while handling {data!r}")

    monkeypatch.setattr("pneumonia.web.screener.Screener.prepare", explode)
    client = web_app.test_client()
    with caplog.at_level("ERROR"):
        page = client.post("/predict", data=upload(secret))
        api = client.post("/api/predict", data=upload(secret))
    assert page.status_code == api.status_code == 500
    html = page.get_data(as_text=True)
    assert "Something went wrong" in html and DISCLAIMER in html.lower()
    assert "Traceback" not in html and "PATIENT" not in html and "PATIENT" not in api.get_data(as_text=True)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "RuntimeError" in logged and "explode" in logged  # the stack, for whoever fixes it
    assert "PATIENT" not in logged and "xff" not in logged


def test_uploads_never_touch_the_disk(client, monkeypatch):
    def no_disk(*args, **kwargs):
        raise AssertionError("an upload was spooled to a temporary file")

    for name in ("SpooledTemporaryFile", "TemporaryFile"):
        monkeypatch.setattr(f"werkzeug.formparser.{name}", no_disk, raising=False)
    for name in ("SpooledTemporaryFile", "NamedTemporaryFile", "TemporaryFile", "mkstemp"):
        monkeypatch.setattr(f"tempfile.{name}", no_disk)
    big = encode_image(Image.new("L", (1800, 1700), 90), "BMP")  # 3 MB, well over Werkzeug's 500 kB spool limit
    assert len(big) > 3_000_000
    assert client.post("/api/predict?gradcam=0", data=upload(big, "big.bmp")).status_code == 200
    assert client.application.request_class is InMemoryRequest
    assert isinstance(InMemoryRequest._get_file_stream(None, 50_000_000, "image/png"), io.BytesIO)


def test_concurrent_requests_answer_as_sequential_ones(web_app):
    uploads = [xray_jpeg(300 + 20 * i, 260, seed=i, label=i % 2) for i in range(8)]

    def ask(data: bytes) -> tuple[float, str, np.ndarray]:
        body = web_app.test_client().post("/api/predict?overlay=png", data=upload(data)).get_json()
        return body["probability"], body["label"], decode(base64.b64decode(body["gradcam_png"]))

    sequential = [ask(data) for data in uploads]
    with ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(ask, uploads * 3))
    for i, (probability, label, blended) in enumerate(concurrent):
        expected = sequential[i % len(uploads)]
        assert probability == pytest.approx(expected[0], abs=1e-6) and label == expected[1]
        assert blended.shape == expected[2].shape
        assert np.abs(blended.astype(int) - expected[2]).max() <= 2


def test_default_settings(ungated_model_dir, monkeypatch):
    monkeypatch.setenv("PNEUMONIA_MODEL_PATH", str(ungated_model_dir))
    app = create_app()
    assert app.config["MAX_CONTENT_LENGTH"] == 20 * 1024 * 1024
    assert app.config["MODEL_PATH"] == str(ungated_model_dir)
    assert app.extensions["screener"] is not None


def test_app_module_is_the_wsgi_entry_point(ungated_model_dir, monkeypatch):
    monkeypatch.setenv("PNEUMONIA_MODEL_PATH", str(ungated_model_dir))
    monkeypatch.delitem(sys.modules, "app", raising=False)
    module = importlib.import_module("app")
    assert module.app.test_client().get("/healthz").status_code == 200


def test_procfile_and_gunicorn_settings(monkeypatch):
    assert (REPO / "Procfile").read_text().strip() == "web: gunicorn app:app"
    monkeypatch.setenv("PORT", "5123")
    monkeypatch.setenv("WEB_CONCURRENCY", "3")
    monkeypatch.setenv("GUNICORN_THREADS", "6")
    settings = runpy.run_path(
        str(REPO / "pneumonia" / "web" / "gunicorn_conf.py")
    )  # executed afresh, not the imported module
    assert settings["bind"] == "0.0.0.0:5123" and settings["workers"] == 3 and settings["threads"] == 6
    assert settings["preload_app"] is False and settings["timeout"] >= 60


def test_gunicorn_serves_the_app(ungated_model_dir):
    """The Procfile command with gunicorn.conf.py (on loopback): the worker loads the model, then serves."""
    with gunicorn_serving(ungated_model_dir, GUNICORN_THREADS="2") as (server, url):
        assert requests.get(f"{url}/healthz", timeout=5).json()["status"] == "ready"
        answer = requests.post(f"{url}/api/predict", files={"file": ("x.jpg", xray_jpeg())}, timeout=60)
        assert answer.status_code == 200 and 0 <= answer.json()["probability"] <= 1
    assert "Model custom loaded" in server.stderr.read().decode()


def test_api_overlay_is_a_jpeg_unless_png_is_asked_and_an_unknown_format_is_named(client):
    data = xray_jpeg(400, 300, seed=2)
    body = client.post("/api/predict", data=upload(data)).get_json()
    asked = client.post("/api/predict?overlay=jpeg", data=upload(data)).get_json()
    assert "gradcam_png" not in body and body["gradcam_jpeg"] == asked["gradcam_jpeg"]
    overlay = cv2.imdecode(np.frombuffer(base64.b64decode(body["gradcam_jpeg"]), np.uint8), cv2.IMREAD_COLOR)
    assert overlay.shape == (300, 400, 3)
    png = client.post("/api/predict?overlay=PNG", data=upload(data)).get_json()
    assert png["probability"] == body["probability"] and "gradcam_jpeg" not in png
    lossless = cv2.imdecode(np.frombuffer(base64.b64decode(png["gradcam_png"]), np.uint8), cv2.IMREAD_COLOR)
    assert lossless.shape == overlay.shape and np.abs(lossless.astype(int) - overlay).mean() < 8  # the same picture
    refused = client.post("/api/predict?overlay=gif", data=upload(data))
    assert refused.status_code == 400 and "overlay=gif: choose one of png, jpeg" in refused.get_json()["error"]
