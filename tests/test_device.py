"""The in-browser screener ("Screen on this device", `export-web`): the same answers as `predict`, in
headless Chromium, over real, synthetic and non-X-ray images; nothing but GETs of the site's own files
on the network; a tampered export refused; the vendored onnxruntime-web as pinned."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import json
import threading
from pathlib import Path

import numpy as np
import pytest
from builders import (
    REAL_XRAYS,
    SHIPPED_MODEL,
    encode_image,
    noise_png,
    png_bomb,
    sample_photo,
    synthetic_xray,
    xray_jpeg,
)
from PIL import Image
from test_browser import CHROMEDRIVER, CHROMIUM, FLAGS, serve

from pneumonia.serving.outcomes import Outcome
from pneumonia.web.device_site import build_site, write_site

TOLERANCE = 0.005  # issue 31: probability within this of `predict`; labels may differ this close to a threshold
MIN_CAM_CORRELATION = 0.95
needs_chromium = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="the browser tests need Chromium and its driver: apt-get install chromium chromium-driver",
)


def upscaled(path: Path, size: tuple[int, int], fmt: str = "JPEG") -> bytes:
    """A real X-ray at a scanner's size: a large JPEG takes the server's DCT-scale draft path."""
    image = Image.open(path).convert("L").resize(size, Image.Resampling.BICUBIC)
    return encode_image(image, fmt, **({"quality": 92} if fmt == "JPEG" else {}))


def rotated_with_exif(path: Path) -> bytes:
    """A real X-ray stored on its side with EXIF orientation 6: upright only once the tag is applied."""
    image = Image.open(path).convert("L").resize((1000, 820)).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    return encode_image(image, "JPEG", quality=90, exif=exif)


def parity_cases() -> dict[str, bytes]:
    """name -> bytes: real X-rays (as stored, a PNG, two large JPEGs), synthetic ones, and non-X-rays."""
    normal, pneumonia = REAL_XRAYS
    rng = np.random.default_rng(7)
    grey_photo = Image.open(io.BytesIO(sample_photo("china.jpg"))).convert("L")
    return {
        "real-normal.jpeg": normal.read_bytes(),
        "real-pneumonia.jpeg": pneumonia.read_bytes(),
        "real-normal.png": encode_image(Image.open(normal), "PNG"),
        "real-pneumonia-1400.jpeg": upscaled(pneumonia, (1600, 1400)),  # drafted at 1/2
        "real-normal-2200.jpeg": upscaled(normal, (2400, 2200)),  # drafted at 1/4
        "real-normal-1000.png": upscaled(normal, (1100, 1000), "PNG"),
        "real-pneumonia-3000.jpeg": upscaled(pneumonia, (3000, 2600)),  # drafted at 1/4
        "real-normal-exif.jpeg": rotated_with_exif(normal),
        "real-pneumonia-rgb.jpeg": encode_image(Image.open(pneumonia).convert("RGB").resize((1200, 1000)), "JPEG"),
        "real-normal-crop.jpeg": encode_image(Image.open(normal).crop((20, 20, 204, 204)).resize((900, 800)), "JPEG"),
        "synthetic-0.jpeg": xray_jpeg(640, 520, seed=20, label=0),  # saved as RGB: the colour path
        "synthetic-1.jpeg": xray_jpeg(700, 560, seed=21, label=1),
        "synthetic-1.png": encode_image(synthetic_xray(1, rng, 300), "PNG"),
        "flower.jpg": sample_photo("flower.jpg"),  # colour
        "china-grey.jpg": encode_image(grey_photo, "JPEG", quality=90),  # greyscale photo: the features
        "noise.png": noise_png(3),
        "grey.png": encode_image(Image.new("L", (300, 300), 128), "PNG"),  # blank
        "banner.png": encode_image(Image.new("L", (900, 150), 60), "PNG"),  # shape
        "tiny.png": encode_image(Image.new("L", (6, 6), 60), "PNG"),
        "bomb.png": png_bomb(10_000, 10_000),
        "truncated.jpeg": normal.read_bytes()[:3000],
    }


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("site")
    write_site(build_site(SHIPPED_MODEL), folder)
    return folder


def static_host(folder: Path):
    """`folder` over http on 127.0.0.1, as a plain static host (no special headers): yields its address."""
    handler = functools.partial(QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join(10)


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def static_site(site):
    yield from static_host(site)


@pytest.fixture(scope="module")
def app_site(shipped_app):
    yield from serve(shipped_app)


def chromium(profile: Path, *extra_flags: str):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in [*FLAGS, *extra_flags, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(120)
    return driver


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    driver = chromium(tmp_path_factory.mktemp("chromium-device"))
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def references():
    """name -> the server's row for each parity case: `predict`'s own pipeline, computed now."""
    from pneumonia.serving.classifier import XrayClassifier
    from pneumonia.serving.screening import BatchScreener

    screener = BatchScreener(XrayClassifier(SHIPPED_MODEL))
    cases = parity_cases()
    rows = screener.screen_chunk(list(cases.items()), with_gradcam=True)
    return {row.name: row for row in rows}


def open_page(browser, url: str) -> str:
    """Loads the screener and waits until its model is ready (or it says why not): the state."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(url)
    WebDriverWait(browser, 180).until(lambda b: b.find_element(By.ID, "status").get_attribute("data-state"))
    return browser.find_element(By.ID, "status").get_attribute("data-state")


def screen_in_browser(browser, path: Path) -> dict:
    """Chooses `path` on the page and waits for its #result: the result's data-* attributes and texts."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.find_element(By.ID, "file").send_keys(str(path))
    WebDriverWait(browser, 120).until(lambda b: b.find_element(By.ID, "result").get_attribute("data-file") == path.name)
    return browser.execute_script(
        "const r = document.getElementById('result'); return Object.assign({}, r.dataset,"
        " {error: document.getElementById('error-message').textContent,"
        "  refusal: document.getElementById('refusal-reason').textContent});"
    )


def own_requests(browser) -> list[dict]:
    """Every network request made, from Chromium's performance (DevTools network) log: http(s) and ws(s)
    only (a clean clone's CI run logged the browser's chrome:// pages and a data: image here too)."""
    requests = []
    for entry in browser.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            request = message["params"]["request"]
            if not request["url"].startswith(("http://", "https://", "ws://", "wss://")):
                continue  # data: URLs and the browser's own chrome:// pages never leave the machine
            requests.append({"url": request["url"], "method": request["method"], "body": request.get("hasPostData")})
    return requests


def correlation(a, b) -> float:
    a, b = np.ravel(a).astype(float), np.ravel(b).astype(float)
    if a.std() == 0 or b.std() == 0:
        return 1.0 if np.allclose(a, b, atol=1e-3) else 0.0
    return float(np.corrcoef(a, b)[0, 1])


def compare(name: str, answer: dict, row, thresholds: dict) -> dict:
    """Asserts the browser's answer for one file matches the server's row; the measured differences."""
    if row.probability is None:
        assert answer["outcome"] == row.outcome, (name, answer, row.error)
        if row.outcome == Outcome.REFUSED:
            assert answer["reason"] == row.verdict.reason and answer["refusal"] == row.verdict.message, name
        else:
            assert answer["reason"] == "unreadable", (name, answer)
            assert answer["error"].split(" (")[0] == row.error.split(" (")[0], (name, answer["error"], row.error)
        return {}
    assert answer["outcome"] == Outcome.SCREENED, (name, answer)
    probability = float(answer["probability"])
    difference = abs(probability - row.probability)
    assert difference <= TOLERANCE, (name, probability, row.probability)
    for which, threshold in thresholds.items():
        if abs(row.probability - threshold) > TOLERANCE:
            assert answer[f"label{which.capitalize()}"] == row.labels[which], (name, which)
    assert answer["ood"] == row.verdict.verdict, (name, answer["ood"], row.verdict)
    cam = correlation(json.loads(answer["heat"]), row.heat)
    assert cam >= MIN_CAM_CORRELATION, (name, cam)
    return {"probability": difference, "cam": cam}


def run_parity(browser, url: str, references: dict, tmp_path: Path) -> dict:
    from pneumonia.serving.card import ModelCard

    thresholds = ModelCard.load(SHIPPED_MODEL / "model.json").thresholds.as_dict()
    assert open_page(browser, url) == "ready"
    measured = {}
    for name, data in parity_cases().items():
        path = tmp_path / name
        path.write_bytes(data)
        measured[name] = compare(name, screen_in_browser(browser, path), references[name], thresholds)
    return measured


@needs_chromium
def test_the_static_site_answers_as_predict_and_sends_nothing(browser, static_site, references, tmp_path):
    browser.get_log("performance")  # drains what came before
    measured = run_parity(browser, f"{static_site}/index.html", references, tmp_path)
    print("parity:", json.dumps(measured, indent=1))
    assert all(measured[name] for name in measured if name.startswith("real-"))  # screened, not refused
    requests = own_requests(browser)
    assert {r["method"] for r in requests} == {"GET"} and not any(r["body"] for r in requests)
    assert all(r["url"].startswith(static_site + "/") for r in requests), [r["url"] for r in requests]
    problems = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert problems == []


@needs_chromium
def test_the_app_page_is_isolated_for_threads_and_sends_nothing(browser, app_site, tmp_path):
    browser.get_log("performance")
    assert open_page(browser, f"{app_site}/device/") == "ready"
    assert browser.execute_script("return self.crossOriginIsolated && ort.env.wasm.numThreads;") >= 1
    path = tmp_path / "real.jpeg"
    path.write_bytes(upscaled(REAL_XRAYS[1], (1600, 1400)))
    answer = screen_in_browser(browser, path)
    assert answer["outcome"] == Outcome.SCREENED
    requests = own_requests(browser)
    assert {r["method"] for r in requests} == {"GET"} and not any(r["body"] for r in requests)
    assert all(r["url"].startswith(app_site + "/device/") for r in requests), [r["url"] for r in requests]
    # The opacity slider fades the overlay, as on the server's result page.
    opacity = browser.execute_script(
        "const s = document.getElementById('opacity'); s.value = 30; s.dispatchEvent(new Event('input'));"
        " return document.getElementById('overlay').style.opacity;"
    )
    assert opacity == "0.3"


@needs_chromium
def test_an_export_that_is_not_the_cards_is_refused(browser, site, tmp_path):
    import shutil

    tampered = tmp_path / "tampered"
    shutil.copytree(site, tampered)
    graph = bytearray((tampered / "model" / "explain.onnx").read_bytes())
    graph[-1] ^= 0xFF
    (tampered / "model" / "explain.onnx").write_bytes(bytes(graph))
    for url in static_host(tampered):
        from selenium.webdriver.common.by import By

        assert open_page(browser, f"{url}/index.html") == "unavailable"
        assert "fingerprint differs" in browser.find_element(By.ID, "unavailable-reason").text
        assert not browser.find_element(By.ID, "file").is_enabled()


@needs_chromium
def test_a_card_without_contrast_normalisation_is_followed_too(browser, tmp_path):
    """The next model may say contrast "none": the same export with such a card, screened both ways."""
    import shutil

    from pneumonia.serving.classifier import XrayClassifier
    from pneumonia.serving.screening import BatchScreener

    model = tmp_path / "model"
    shutil.copytree(SHIPPED_MODEL, model, ignore=shutil.ignore_patterns("report"))
    card = json.loads((model / "model.json").read_text())
    card["preprocessing"]["contrast"] = "none"
    (model / "model.json").write_text(json.dumps(card))
    write_site(build_site(model), tmp_path / "site")
    cases = {name: data for name, data in parity_cases().items() if name.startswith("real-")}
    classifier = XrayClassifier(model)
    rows = BatchScreener(classifier).screen_chunk(list(cases.items()), with_gradcam=True)
    references, thresholds = {row.name: row for row in rows}, classifier.thresholds
    for url in static_host(tmp_path / "site"):
        assert open_page(browser, f"{url}/index.html") == "ready"
        for name, data in list(cases.items())[:4]:
            (tmp_path / name).write_bytes(data)
            compare(name, screen_in_browser(browser, tmp_path / name), references[name], thresholds)


def test_the_page_applies_every_contrast_a_card_may_name():
    import re

    from pneumonia.serving.card import CONTRASTS
    from pneumonia.web.device_site import WEB

    script = (WEB / "static" / "device" / "pixels.js").read_text()
    assert json.loads(re.search(r"const CONTRASTS = (\[.*?\]);", script).group(1)) == list(CONTRASTS)


@needs_chromium
def test_a_browser_without_webassembly_is_told_and_sent_to_the_server(app_site, tmp_path):
    from selenium.webdriver.common.by import By

    driver = chromium(tmp_path / "profile")
    try:  # an old or locked-down browser: no WebAssembly object at all
        driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": "delete self.WebAssembly;"})
        assert open_page(driver, f"{app_site}/device/") == "unavailable"
        assert "WebAssembly" in driver.find_element(By.ID, "unavailable-reason").text
        assert driver.find_element(By.ID, "unavailable").find_element(By.TAG_NAME, "a").get_attribute("href") == (
            f"{app_site}/"
        )
        assert not driver.find_element(By.ID, "file").is_enabled()
    finally:
        driver.quit()


def test_the_app_serves_the_page_with_isolation_and_its_policy(shipped_app):
    client = shipped_app.test_client()
    assert b'href="/device/"' in client.get("/").data
    page = client.get("/device/")
    assert page.status_code == 200 and page.headers["Cross-Origin-Embedder-Policy"] == "require-corp"
    assert "connect-src 'self'" in page.headers["Content-Security-Policy"]
    assert b"Research tool, not a medical device." in page.data
    wasm = client.get("/device/static/vendor/ort-wasm-simd-threaded.wasm")
    assert wasm.headers["Content-Type"] == "application/wasm"
    assert (
        client.get("/device/static/vendor/ort-wasm-simd-threaded.mjs")
        .headers["Content-Type"]
        .startswith("text/javascript")
    )
    assert client.get("/device/model/../model.json").status_code == 404


def test_the_parameters_come_from_the_card_and_the_gate():
    from pneumonia.serving.card import ModelCard
    from pneumonia.serving.gate import OodGate

    site = build_site(SHIPPED_MODEL)
    parameters = json.loads(site.content("model/screener.json"))
    card = ModelCard.load(SHIPPED_MODEL / "model.json")
    assert parameters["preprocessing"]["contrast"] == card.preprocessing.contrast
    assert parameters["thresholds"] == card.thresholds.as_dict()
    gate = OodGate.load(SHIPPED_MODEL / "ood.npz")
    stored = np.frombuffer(site.content("model/gate.bin"), "<f4")
    dim = parameters["gate"]["feature_dim"]
    assert np.array_equal(stored[: 2 * dim].reshape(2, dim), gate.density.means)
    assert parameters["gate"]["sha256"] == hashlib.sha256(site.content("model/gate.bin")).hexdigest()


def test_the_vendored_onnxruntime_web_is_the_pinned_one():
    from tools.vendor_onnxruntime_web import FILES, MANIFEST, PACKAGE, PIN, VENDOR

    manifest = json.loads((VENDOR / MANIFEST).read_text())
    assert (manifest["package"], manifest["version"]) == (PACKAGE, PIN)
    for name in FILES:
        assert hashlib.sha256((VENDOR / name).read_bytes()).hexdigest() == manifest["files"][name], name
    assert (VENDOR / "onnxruntime-web.LICENSE").read_text().startswith("MIT License")


def test_export_web_writes_the_site(tmp_path):
    from builders import run_cli

    result = run_cli("export-web", str(tmp_path / "site"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for name in ("index.html", "model/screener.json", "model/explain.onnx", "static/device/page.js"):
        assert (tmp_path / "site" / name).is_file(), name


def test_the_device_parameters_follow_the_apps_overlay_settings():
    from builders import app_on

    from pneumonia.web.device_site import Overlay

    client = app_on(SHIPPED_MODEL, OVERLAY_ALPHA=0.3, PAGE_IMAGE_MAX_SIDE=800).test_client()
    overlay = client.get("/device/model/screener.json").get_json()["overlay"]
    assert (overlay["alpha"], overlay["display_max_side"]) == (0.3, 800)
    exported = json.loads(build_site(SHIPPED_MODEL).content("model/screener.json"))["overlay"]
    assert (exported["alpha"], exported["display_max_side"]) == (Overlay.alpha, Overlay.display_max_side)


def test_the_page_modules_are_revalidated_on_every_load(shipped_app):
    """They import one another by unversioned relative URLs: a cached one must never outlive a deploy."""
    client = shipped_app.test_client()
    module = client.get("/device/static/device/screening.js")
    assert module.status_code == 200 and module.headers["Content-Type"].startswith("text/javascript")
    assert "no-cache" in module.headers["Cache-Control"] and module.headers["ETag"]
    assert (
        client.get("/device/static/device/screening.js", headers={"If-None-Match": module.headers["ETag"]}).status_code
        == 304
    )
    assert "max-age=3600" in client.get("/device/static/vendor/ort-wasm-simd-threaded.mjs").headers["Cache-Control"]
