"""The in-browser screener in headless Chromium: time to the first result on a cold page (downloads,
fingerprint checks, session creation, one screening), per-image latency after that, bytes downloaded;
served by the app at /device/ (cross-origin isolated: WASM threads) and as the static site of
`export-web` on a plain host (no isolation headers: one thread).

    .venv/bin/python -m bench.browser_screening [--images 8] [--out bench-results/browser.json]

Each mode gets a fresh browser profile (an empty cache). Needs chromium and chromedriver.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
XRAYS = sorted((REPO / "tests" / "data").glob("*.jpeg"))


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def serve(make_server) -> tuple[str, object]:
    server = make_server()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_port}", server


def app_server():
    from werkzeug.serving import make_server

    from pneumonia.web import create_app

    return make_server("127.0.0.1", 0, create_app(), threaded=True)


def static_server(folder: Path):
    handler = functools.partial(QuietHandler, directory=str(folder))
    return http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)


def browser(profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)


def screen(driver, path: Path) -> tuple[float, float, float]:
    """Seconds from choosing the file to its #result; the page's own decoding and model times (ms)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    started = time.perf_counter()
    driver.find_element(By.ID, "file").send_keys(str(path))
    WebDriverWait(driver, 120, poll_frequency=0.02).until(
        lambda d: d.find_element(By.ID, "result").get_attribute("data-file") == path.name
    )
    elapsed = time.perf_counter() - started
    result = driver.find_element(By.ID, "result")
    return elapsed, float(result.get_attribute("data-decode-ms")), float(result.get_attribute("data-model-ms"))


def downloaded_bytes(driver) -> int:
    """What went over the wire (encoded sizes), from the DevTools network log."""
    total = 0
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.loadingFinished":
            total += int(message["params"]["encodedDataLength"])
    return total


def measure(url: str, images: list[Path], profile: Path) -> dict:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser(profile)
    try:
        started = time.perf_counter()
        driver.get(url)
        WebDriverWait(driver, 300, poll_frequency=0.02).until(
            lambda d: d.find_element(By.ID, "status").get_attribute("data-state")
        )
        ready = time.perf_counter() - started
        first = screen(driver, images[0])[0]
        timings = [screen(driver, path) for path in images[1:]]
        latencies = [t[0] for t in timings]
        threads = driver.execute_script("return [self.crossOriginIsolated, ort.env.wasm.numThreads];")
        return {
            "cold_page_ready_s": round(ready, 2),
            "time_to_first_result_s": round(ready + first, 2),
            "per_image_s_median": round(statistics.median(latencies), 3),
            "per_image_s_max": round(max(latencies), 3),
            "decode_ms_median": statistics.median(t[1] for t in timings),
            "model_and_gradcam_ms_median": statistics.median(t[2] for t in timings),
            "images_after_the_first": len(latencies),
            "downloaded_mb": round(downloaded_bytes(driver) / 1e6, 2),
            "cross_origin_isolated": threads[0],
            "wasm_threads": threads[1],
        }
    finally:
        driver.quit()


def test_images(folder: Path, count: int) -> list[Path]:
    """The committed X-rays, and upscaled copies (1600x1400 and 2400x2200) like a scanner's files."""
    from PIL import Image

    paths = []
    for i in range(count):
        source = XRAYS[i % len(XRAYS)]
        size = [(224, 224), (1600, 1400), (2400, 2200)][i % 3]
        path = folder / f"{i:02d}-{size[0]}-{source.name}"
        Image.open(source).convert("L").resize(size).save(path, quality=92)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    from pneumonia.serving.classifier import default_model_path
    from pneumonia.web.device_site import build_site, write_site

    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        images = test_images(work, args.images)
        write_site(build_site(default_model_path()), work / "site")
        results = {}
        for mode, factory, page in (
            ("app /device/", app_server, "/device/"),
            ("static site", lambda: static_server(work / "site"), "/index.html"),
        ):
            address, server = serve(factory)
            results[mode] = measure(address + page, images, work / f"profile-{len(results)}")
            server.shutdown()
    print(json.dumps(results, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
