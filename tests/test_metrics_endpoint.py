"""GET /metrics (pneumonia/web/telemetry.py) and the web app's drift monitor (pneumonia/web/monitoring.py,
GET /api/monitor, the model page): what an upload, a refusal, an unreadable file and a busy model add, the
access keys in front, the monitor's answer with too few images, an alarm, no reference and no model; and
under gunicorn as the Procfile starts it, two workers and a killed one, the counts added up."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import requests
from builders import ACCESS_KEYS, REAL_XRAYS, REPO, app_on, encode_image, free_port, upload, xray_jpeg
from PIL import Image

XRAYS = [path.read_bytes() for path in REAL_XRAYS]  # the shipped gate lets these through
COLOUR_PHOTO = encode_image(Image.new("RGB", (300, 300), (200, 30, 30)), "PNG")


def scrape(client, **kwargs) -> dict[str, float]:
    """/metrics as {series with its labels: value}."""
    response = client.get("/metrics", **kwargs)
    assert response.status_code == 200 and response.mimetype == "text/plain"
    return parsed(response.get_data(as_text=True))


def parsed(text: str) -> dict[str, float]:
    series = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            series[name] = float(value)
    return series


SCREENED = 'pneumonia_screenings_total{outcome="screened",reason=""}'


def test_an_upload_is_counted_by_route_outcome_label_verdict_and_stage(shipped_app):
    client = shipped_app.test_client()
    before = scrape(client)
    assert client.post("/api/predict", data=upload(XRAYS[0])).status_code == 200
    after = scrape(client)

    def added(name: str) -> float:
        return after.get(name, 0) - before.get(name, 0)

    assert added(SCREENED) == 1
    assert added('pneumonia_http_requests_total{method="POST",route="/api/predict",status="200"}') == 1
    assert (
        sum(
            added(f'pneumonia_screening_labels_total{{label="{label}",threshold="default"}}')
            for label in ("NORMAL", "PNEUMONIA")
        )
        == 1
    )
    assert sum(added(f'pneumonia_gate_verdicts_total{{verdict="{v}"}}') for v in ("ok", "unusual")) == 1
    for stage in ("decode", "model_gradcam", "overlay_encode"):
        assert added(f'pneumonia_stage_duration_seconds_count{{stage="{stage}"}}') == 1
    assert added("pneumonia_model_queue_wait_seconds_count") == 1
    assert after["pneumonia_model_slots"] >= 2 and after["pneumonia_model_slots_busy"] == 0
    info = [name for name in after if name.startswith("pneumonia_model_info{") and 'name="densenet121"' in name]
    assert info and re.search(r'card_sha256="[0-9a-f]{64}"', info[0]) and 'threshold_screening="0.67' in info[0]


def test_refusals_unreadable_files_and_a_busy_model_are_counted(fresh_shipped_app, monkeypatch):
    client = fresh_shipped_app.test_client()
    before = scrape(client)
    assert client.post("/api/predict", data=upload(COLOUR_PHOTO, "x.png")).status_code == 422
    assert client.post("/api/predict", data=upload(XRAYS[0][:300])).status_code == 400
    capacity = fresh_shipped_app.extensions["model_capacity"]
    monkeypatch.setattr(capacity, "running", capacity.slots)
    monkeypatch.setattr(capacity, "max_wait_s", 0.0)
    assert client.post("/api/predict", data=upload(XRAYS[0])).status_code == 503
    after = scrape(client)
    for name in (
        'pneumonia_screenings_total{outcome="refused",reason="colour"}',
        'pneumonia_screenings_total{outcome="unreadable",reason=""}',
        'pneumonia_http_refused_total{status="503"}',
        'pneumonia_http_requests_total{method="POST",route="/api/predict",status="503"}',
    ):
        assert after.get(name, 0) - before.get(name, 0) == 1, name


def test_metrics_and_the_monitor_need_a_key_when_the_server_has_keys(keyed_app):
    client = keyed_app.test_client()
    for path in ("/metrics", "/api/monitor"):
        assert client.get(path).status_code == 401
        assert client.get(path, headers={"Authorization": "Bearer not-a-key-of-this-server"}).status_code == 401
    series = scrape(client, headers={"Authorization": f"Bearer {ACCESS_KEYS[0]}"})
    assert series['pneumonia_http_requests_total{method="GET",route="/metrics",status="401"}'] >= 2
    assert client.get("/api/monitor", headers={"Authorization": f"Bearer {ACCESS_KEYS[1]}"}).status_code == 200


def test_the_monitor_says_it_has_too_few_images_then_alarms_on_a_drifted_window(fresh_shipped_app):
    client = fresh_shipped_app.test_client()
    answer = client.get("/api/monitor").get_json()
    assert answer["images"] == 0 and not answer["alarm"] and "at least 100" in answer["advice"]
    assert answer["window"] == 500 and answer["reference"]["images"] == 524
    assert client.post("/api/predict", data=upload(XRAYS[0])).status_code == 200
    monitor = fresh_shipped_app.extensions["drift_monitor"]
    assert monitor.report()["images"] == 1 and all(
        isinstance(value, (float, type(None))) for entry in monitor._values for value in entry
    )  # numbers only: no image, name or client
    for _ in range(150):
        monitor.observe(0.5, 60.0)  # uncertain, and unusual for the gate
    answer = client.get("/api/monitor").get_json()
    assert answer["alarm"] and answer["images"] == 151
    alarmed = {s["name"] for s in answer["signals"] if s["alarm"]}
    assert {"unusual_share", "uncertain_share"} <= alarmed
    assert "pneumonia calibrate" in answer["advice"]
    page = client.get("/model").get_data(as_text=True)
    assert 'id="monitor"' in page and "Alarm." in page and 'id="monitor-uncertain_share"' in page
    client.post("/api/predict", data=upload(XRAYS[1]))  # the gauges follow the window after a screening
    series = scrape(client)
    assert series["pneumonia_drift_alarm"] == 1 and series['pneumonia_drift_signal_alarm{signal="unusual_share"}'] == 1
    assert series["pneumonia_drift_window_images"] == 152


def test_a_card_without_a_reference_answers_no_signals_and_says_how_to_get_them(ungated_model_dir, tmp_path):
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(ungated_model_dir, copy)
    card = json.loads((copy / "model.json").read_text())
    card.pop("monitor", None)
    (copy / "model.json").write_text(json.dumps(card))
    client = app_on(copy).test_client()
    client.post("/api/predict", data=upload(xray_jpeg()))
    answer = client.get("/api/monitor").get_json()
    assert answer["signals"] == [] and not answer["alarm"] and "fit-ood" in answer["advice"]
    assert answer["reference"] is None and answer["images"] == 1
    assert "fit-ood" in client.get("/model").get_data(as_text=True)


def test_without_a_model_the_monitor_answers_and_says_why(tmp_path):
    client = app_on(tmp_path).test_client()
    answer = client.get("/api/monitor")
    assert answer.status_code == 200 and answer.get_json()["signals"] == []
    assert "not loaded" in answer.get_json()["advice"]


# --- Under gunicorn, as the Procfile starts it ---------------------------------------------------


def metric(url: str, name: str) -> dict[str, float]:
    text = requests.get(f"{url}/metrics", timeout=10).text
    return {k: v for k, v in parsed(text).items() if k.startswith(name)}


def test_under_gunicorn_two_workers_add_up_and_a_killed_worker_keeps_its_counts(ungated_model_dir, tmp_path):
    folder = tmp_path / "metrics"
    folder.mkdir()
    (folder / "counter_999.db").write_bytes(b"stale: a run before this one")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("GUNICORN_THREADS",)}
    env |= {"PORT": str(port), "WEB_CONCURRENCY": "2", "PNEUMONIA_MODEL_PATH": str(ungated_model_dir)}
    env |= {"PROMETHEUS_MULTIPROC_DIR": str(folder), "TF_CPP_MIN_LOG_LEVEL": "2", "GUNICORN_THREADS": "4"}
    server = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "app:app"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url)
        assert not (folder / "counter_999.db").exists()  # an earlier run's files are gone
        for seed in range(6):
            files = {"file": ("x.jpeg", xray_jpeg(seed=seed), "image/jpeg")}
            assert requests.post(f"{url}/api/predict?gradcam=0", files=files, timeout=60).status_code == 200
        assert metric(url, "pneumonia_screenings_total")[SCREENED] == 6
        windows = metric(url, "pneumonia_drift_window_images")
        assert sum(windows.values()) == 6 and all('pid="' in name for name in windows)
        workers = worker_pids(windows)
        os.kill(min(workers), signal.SIGKILL)
        deadline = time.time() + 120  # the new worker loads the model first
        while min(workers) in (now := worker_pids(metric(url, "pneumonia_drift_window_images"))) or len(now) < 2:
            assert time.time() < deadline, "the killed worker was not replaced"
            time.sleep(0.5)
        assert metric(url, "pneumonia_screenings_total")[SCREENED] == 6  # its counts stay
    finally:
        server.terminate()
        server.wait(30)


def worker_pids(series: dict[str, float]) -> set[int]:
    return {int(re.search(r'pid="(\d+)"', name).group(1)) for name in series}


def _wait_ready(url: str) -> None:
    deadline = time.time() + 120
    while True:
        try:
            if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        if time.time() > deadline:
            pytest.fail("gunicorn did not become ready")
        time.sleep(0.3)


def test_the_gunicorn_settings_make_or_empty_the_metrics_folder(tmp_path):
    from pneumonia.web import gunicorn_conf

    environ: dict[str, str] = {}
    made = gunicorn_conf.metrics_folder(environ)
    try:
        assert environ["PROMETHEUS_MULTIPROC_DIR"] == made and os.path.isdir(made)  # the workers inherit it
    finally:
        gunicorn_conf.on_exit(None)
    assert not os.path.exists(made)  # a folder it made goes at exit
    given = tmp_path / "given"
    given.mkdir()
    (given / "gauge_livesum_123.db").write_bytes(b"stale")
    (given / "notes.txt").write_text("not ours")
    assert gunicorn_conf.metrics_folder({"PROMETHEUS_MULTIPROC_DIR": str(given)}) == str(given)
    assert sorted(p.name for p in given.iterdir()) == ["notes.txt"]  # only metric files are removed
