"""A real browser: headless Chromium uploads a full-size X-ray through the page and sees the
probability and the overlay; the page's script runs under the Content-Security-Policy."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from builders import SHARED_SAMPLES, app_on, sample_photo, synthetic_xray, xray_jpeg
from PIL import Image

from pneumonia.web.settings import settings

SAMPLE = SHARED_SAMPLES / "original-train" / "PNEUMONIA" / "person279_bacteria_1315.jpeg"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="the browser test needs Chromium and its driver: apt-get install chromium chromium-driver",
)


def serve(app):
    """The app on 127.0.0.1 and a free port, in a background thread: yields its address."""
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join(10)


@pytest.fixture(scope="module")
def browser_app(ungated_model_dir):
    """The app on the tiny model for this module's tests alone (one changes its batch limit)."""
    return app_on(ungated_model_dir)


@pytest.fixture(scope="module")
def live_server(browser_app):
    yield from serve(browser_app)


@pytest.fixture(scope="module")
def shipped_live_server(shipped_app):
    yield from serve(shipped_app)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in FLAGS + [f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(120)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def full_size_xray(tmp_path_factory) -> Path:
    """A real X-ray from ../shared/samples when there, else a 2000x1800 synthetic one."""
    if SAMPLE.is_file():
        return SAMPLE
    path = tmp_path_factory.mktemp("upload") / "full-size.jpeg"
    synthetic_xray(1, np.random.default_rng(0), 256).resize((2000, 1800)).save(path, quality=92)
    return path


def test_upload_shows_probability_and_overlay(browser, live_server, full_size_xray):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"{live_server}/")
    assert "research tool, not a medical device" in browser.page_source.lower()
    browser.find_element(By.ID, "file").send_keys(str(full_size_xray))
    assert browser.find_element(By.ID, "chosen").text == full_size_xray.name  # static/app.js ran
    browser.find_element(By.ID, "submit").click()
    WebDriverWait(browser, 90).until(expected_conditions.presence_of_element_located((By.ID, "probability")))

    assert browser.find_element(By.ID, "probability").text.endswith("%")
    assert browser.find_element(By.ID, "label-default").text in ("NORMAL", "PNEUMONIA")
    rendered = browser.execute_script(
        "return ['original', 'overlay'].map(id => { const i = document.getElementById(id);"
        " return [i.complete, i.naturalWidth, i.naturalHeight, i.getBoundingClientRect().width]; });"
    )
    width, height = Image.open(full_size_xray).size
    for complete, natural_width, natural_height, shown_width in rendered:
        assert complete and natural_width > 0 and shown_width > 0
        assert natural_width / natural_height == pytest.approx(width / height, rel=0.01)

    # The opacity slider is revealed and works: the script is allowed by the CSP.
    slider = browser.find_element(By.ID, "opacity")
    assert slider.is_displayed()
    opacity = browser.execute_script(
        "const s = document.getElementById('opacity'); s.value = 30; s.dispatchEvent(new Event('input'));"
        " return document.getElementById('overlay').style.opacity;"
    )
    assert opacity == "0.3"
    problems = [entry["message"] for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert problems == []


def test_drag_and_drop_fills_the_file_input(browser, live_server):
    browser.get(f"{live_server}/")
    chosen = browser.execute_script(
        "const files = new DataTransfer(); files.items.add(new File(['x'], 'dropped.png', {type: 'image/png'}));"
        " document.getElementById('dropzone').dispatchEvent("
        "   new DragEvent('drop', {dataTransfer: files, bubbles: true, cancelable: true}));"
        " return [document.getElementById('file').files.length, document.getElementById('chosen').textContent];"
    )
    assert chosen == [1, "dropped.png"]


def test_a_photo_is_refused_with_the_reason_and_no_result(browser, shipped_live_server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    photo = tmp_path / "flower.jpg"
    photo.write_bytes(sample_photo("flower.jpg"))
    browser.get(f"{shipped_live_server}/")
    browser.find_element(By.ID, "file").send_keys(str(photo))
    browser.find_element(By.ID, "submit").click()
    WebDriverWait(browser, 90).until(expected_conditions.presence_of_element_located((By.ID, "refusal-reason")))
    assert "in colour" in browser.find_element(By.ID, "refusal-reason").text
    assert "frontal chest radiograph" in browser.page_source
    assert not browser.find_elements(By.ID, "probability") and not browser.find_elements(By.ID, "overlay")


def _allow_downloads(browser, folder: Path) -> None:
    """Headless Chromium drops downloads unless told where to put them (over the DevTools protocol)."""
    try:
        browser.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(folder)})
    except Exception:  # an older Chromium has only the Page domain's command
        browser.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(folder)})


def test_several_files_give_a_table_and_a_working_csv_link(browser, live_server, browser_app, tmp_path, monkeypatch):
    import csv
    import time

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    paths = []
    for i in range(3):
        paths.append(tmp_path / f"xray-{i}.jpeg")
        paths[-1].write_bytes(xray_jpeg(640 + 40 * i, 520, seed=20 + i, label=i % 2))
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    _allow_downloads(browser, downloads)
    browser.get_log("browser")  # drains what earlier tests left (a refused upload logs its 422)
    # The module's live server keeps running: its Settings are swapped for this test, and monkeypatch puts them back.
    started = settings(browser_app)
    # 2, under the 3 files chosen: the form says so before sending
    monkeypatch.setitem(browser_app.extensions, "settings", started.model_copy(update={"batch_max_files": 2}))
    browser.get(f"{live_server}/")
    browser.find_element(By.ID, "file").send_keys("\n".join(map(str, paths)))
    message = browser.execute_script("return document.getElementById('file').validationMessage;")
    assert message == "At most 2 files can be screened at once."
    monkeypatch.setitem(browser_app.extensions, "settings", started.model_copy(update={"batch_max_files": 3}))
    browser.get(f"{live_server}/")
    browser.find_element(By.ID, "file").send_keys("\n".join(map(str, paths)))
    assert browser.find_element(By.ID, "chosen").text == "3 files: xray-0.jpeg, xray-1.jpeg, xray-2.jpeg"
    assert browser.execute_script("return document.getElementById('file').validity.valid;")
    browser.find_element(By.ID, "submit").click()
    WebDriverWait(browser, 90).until(expected_conditions.presence_of_element_located((By.ID, "batch-results")))

    rows = browser.find_elements(By.CSS_SELECTOR, "#batch-results tbody tr")
    assert [row.find_element(By.CLASS_NAME, "filename").text for row in rows] == [p.name for p in paths]
    thumbnails = browser.execute_script(
        "return Array.from(document.querySelectorAll('img.thumb'), i => i.complete && i.naturalWidth);"
    )
    assert len(thumbnails) == 3 and all(thumbnails)
    # Grad-CAM on demand: hidden until its row's <details> is opened.
    details = rows[1].find_element(By.CSS_SELECTOR, "details.gradcam")
    overlay = details.find_element(By.TAG_NAME, "img")
    assert not overlay.is_displayed()
    details.find_element(By.TAG_NAME, "summary").click()
    assert (
        overlay.is_displayed() and browser.execute_script("return arguments[0].naturalWidth;", overlay) == 512
    )  # 680 px wide, shown at most 512

    browser.find_element(By.ID, "csv-download").click()
    saved = downloads / "pneumonia-screening.csv"
    deadline = time.monotonic() + 30
    while not saved.is_file() and time.monotonic() < deadline:
        time.sleep(0.2)
    with saved.open(newline="", encoding="utf-8") as handle:
        table = list(csv.DictReader(handle))
    assert [row["file"] for row in table] == [p.name for p in paths]
    shown = [row.find_element(By.CLASS_NAME, "probability").text for row in rows]
    assert shown == [f"{100 * float(row['probability']):.1f} %" for row in table]
    problems = [entry["message"] for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert problems == []
