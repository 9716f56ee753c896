"""Several X-rays in one request: POST /api/predict/batch and the upload page's results table
(pneumonia/web/batch.py): upload order, an answer per file, limits, model slots per chunk, bounded memory."""

from __future__ import annotations

import base64
import csv
import io
import re

import numpy as np
import pytest
from builders import PATIENT_ID, PATIENT_NAME, REAL_XRAYS, app_on, dicom_bytes, sample_photo, upload, xray_jpeg
from PIL import Image

from pneumonia.serving import preprocessing
from pneumonia.web.capacity import ModelBusy


def files(*uploads: tuple[bytes, str]) -> dict:
    return {"file": [(io.BytesIO(data), name) for data, name in uploads]}


def dicom_xray() -> bytes:
    pixels = np.asarray(Image.open(io.BytesIO(xray_jpeg(160, 128, seed=9))), np.uint16) * 257
    return dicom_bytes(pixels)


MIXED = [
    (xray_jpeg(320, 256, seed=1), "first.jpeg"),
    (xray_jpeg(320, 256, seed=2)[:300], "truncated.jpeg"),
    (b"ward round notes", "notes.txt"),
    (b"", "empty.png"),
    (dicom_xray(), "IM0001"),
    (xray_jpeg(300, 260, seed=3, label=0), "last.jpeg"),
]


def test_a_batch_with_bad_files_answers_every_file_in_upload_order(client, caplog, capfd):
    response = client.post("/api/predict/batch", data=files(*MIXED))
    assert response.status_code == 200 and response.headers["Cache-Control"] == "no-store"
    entries = response.get_json()
    assert [e["index"] for e in entries] == list(range(6))
    assert [e["filename"] for e in entries] == [name for _, name in MIXED]
    assert [e["status"] for e in entries] == [200, 400, 415, 400, 200, 200]
    assert "truncated" in entries[1]["error"].lower() and "JPEG, PNG" in entries[2]["error"]
    assert entries[3]["error"] == "The uploaded file is empty."
    for entry, (data, name) in zip(entries, MIXED):
        single = client.post("/api/predict?gradcam=0", data=files((data, name))).get_json()
        if entry["status"] in (400, 415):  # a bad file is answered as a single upload of it is
            assert single["status"] == entry["status"], name
            assert single["error"].split(" (")[0] == entry["error"].split(" (")[0], name
        if entry["status"] != 200:
            assert entry["probability"] is None and "label" not in entry
            continue
        assert entry["probability"] == pytest.approx(single["probability"], abs=1e-5)
        assert (entry["label"], entry["screening_label"]) == (single["label"], single["screening_label"])
        assert entry["thresholds"] == single["thresholds"] and entry["ood"]["verdict"] == "unchecked"
        assert entry["notice"] == "Research tool, not a medical device." and "gradcam_png" not in entry
    logged = caplog.text + "".join(capfd.readouterr())
    assert PATIENT_NAME not in response.get_data(as_text=True) + logged and PATIENT_ID not in logged


def test_the_shipped_gate_refuses_a_photo_in_a_batch_and_screens_the_x_rays(shipped_app):
    uploads = [(path.read_bytes(), path.name) for path in REAL_XRAYS] + [(sample_photo("flower.jpg"), "flower.jpg")]
    client = shipped_app.test_client()
    entries = client.post("/api/predict/batch", data=files(*uploads)).get_json()
    assert [e["status"] for e in entries] == [200] * len(REAL_XRAYS) + [422]
    refused = entries[-1]
    assert refused["ood"]["verdict"] == "rejected" and refused["ood"]["reason"] == "colour"
    assert refused["probability"] is None and refused["error"].startswith("Not screened:")
    for entry, (data, name) in zip(entries, uploads):
        single = client.post("/api/predict?gradcam=0", data=files((data, name))).get_json()
        if entry["status"] == 200:
            assert entry["probability"] == pytest.approx(single["probability"], abs=1e-5)
            assert entry["ood"]["verdict"] == single["ood"]["verdict"] in ("ok", "unusual")
            assert entry["ood"]["score"] == pytest.approx(single["ood"]["score"], rel=1e-4)


def test_gradcam_overlays_on_request(client, web_app):
    entries = client.post("/api/predict/batch?gradcam=1", data=files(*MIXED[:2], MIXED[4])).get_json()
    assert entries[1]["status"] == 400 and "gradcam_png" not in entries[1]
    side = web_app.config["API_IMAGE_MAX_SIDE"]
    for entry, size in ((entries[0], (320, 256)), (entries[2], (160, 128))):
        overlay = Image.open(io.BytesIO(base64.b64decode(entry["gradcam_png"])))
        assert overlay.format == "PNG" and overlay.mode == "RGB" and overlay.size == size and max(size) <= side


def test_limits_are_answered_with_what_they_are(ungated_model_dir):
    app = app_on(ungated_model_dir, BATCH_MAX_FILES=3)
    client = app.test_client()
    for path in ("/api/predict/batch", "/predict"):
        response = client.post(path, data=files(*[(xray_jpeg(seed=i), f"{i}.jpeg") for i in range(4)]))
        assert response.status_code == 413
        assert "at most 3" in response.get_data(as_text=True)
    many = client.post("/api/predict/batch", data=files(*[(xray_jpeg(64, 64, seed=i), f"{i}.jpeg") for i in range(25)]))
    assert many.status_code == 413 and "at most 3" in many.get_json()["error"]  # over the form's part limit too
    three = client.post("/api/predict/batch", data=files(*[(xray_jpeg(seed=i), f"{i}.jpeg") for i in range(3)]))
    assert [e["status"] for e in three.get_json()] == [200, 200, 200]
    nothing = client.post("/api/predict/batch", data=upload(b"", ""))
    assert nothing.status_code == 400 and "No file was uploaded" in nothing.get_json()["error"]
    app.config["MAX_CONTENT_LENGTH"] = 4096  # Flask reads its own limit from app.config at each request
    large = client.post("/api/predict/batch", data=files(*[(xray_jpeg(seed=i), f"{i}.jpeg") for i in range(3)]))
    assert large.status_code == 413 and "too large" in large.get_json()["error"]


class RecordingCapacity:
    """The app's capacity, recording each chunk's slot and refusing the n-th acquisition."""

    def __init__(self, capacity, refuse_at: int | None = None):
        self.capacity, self.refuse_at = capacity, refuse_at
        self.acquired, self.released = 0, []

    def acquire(self):
        self.acquired += 1
        if self.acquired == self.refuse_at:
            raise ModelBusy(7, 9.0)
        self.capacity.acquire()

    def release(self, elapsed_s=None):
        self.released.append(elapsed_s)
        self.capacity.release(elapsed_s)


def test_each_chunk_takes_a_model_slot_and_records_its_time_per_image(ungated_model_dir):
    app = app_on(ungated_model_dir, BATCH_CHUNK_SIZE=2)
    recorder = RecordingCapacity(app.extensions["model_capacity"])
    app.extensions["model_capacity"] = recorder
    response = app.test_client().post(
        "/api/predict/batch", data=files(*MIXED)
    )  # 3 files to screen, 3 refused before decoding
    assert [e["status"] for e in response.get_json()] == [200, 400, 415, 400, 200, 200]
    assert recorder.acquired == 2 and len(recorder.released) == 2
    assert all(0 < seconds < 5 for seconds in recorder.released)
    assert recorder.capacity.running == 0  # every slot was given back


def test_a_busy_model_mid_batch_answers_the_rest_503(ungated_model_dir):
    app = app_on(ungated_model_dir, BATCH_CHUNK_SIZE=2)
    client = app.test_client()
    capacity = app.extensions["model_capacity"]
    app.extensions["model_capacity"] = RecordingCapacity(capacity, refuse_at=2)
    entries = client.post(
        "/api/predict/batch", data=files(*[(xray_jpeg(seed=i), f"{i}.jpeg") for i in range(5)])
    ).get_json()
    assert [e["status"] for e in entries] == [200, 200, 503, 503, 503]
    assert all("busy" in e["error"] and e["probability"] is None for e in entries[2:])
    app.extensions["model_capacity"] = RecordingCapacity(capacity, refuse_at=1)
    refused = client.post("/api/predict/batch", data=files(*[(xray_jpeg(seed=i), f"{i}.jpeg") for i in range(5)]))
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "7"


def test_a_100_file_request_decodes_nothing_in_the_serving_process(client, monkeypatch):
    """Every file is decoded in the decoding sandbox's children: the worker never holds a full-size image."""
    monkeypatch.setattr(preprocessing, "decode_xray", lambda *args: pytest.fail("decoded in the serving process"))
    jpeg = xray_jpeg(1200, 1000, seed=4)
    response = client.post("/api/predict/batch", data=files(*[(jpeg, f"{i:03d}.jpeg") for i in range(100)]))
    entries = response.get_json()
    assert len(entries) == 100 and all(e["status"] == 200 for e in entries)


def test_the_page_shows_a_table_with_a_row_per_file_and_its_csv(client):
    uploads = [MIXED[0], MIXED[2], MIXED[4]]
    response = client.post("/predict", data=files(*uploads))
    page = response.get_data(as_text=True)
    assert response.status_code == 200 and "research tool, not a medical device" in page.lower()
    assert len(re.findall(r'<tr class="batch-row', page)) == 3
    assert page.count('<details class="gradcam">') == 2 and page.count('class="thumb"') == 2
    assert "JPEG, PNG, BMP, TIFF or DICOM" in page  # the text file's row says why it was not screened
    href = re.search(r'id="csv-download"[^>]*href="data:text/csv;charset=utf-8;base64,([^"]+)"', page)
    assert href and 'download="pneumonia-screening.csv"' in page
    table = list(csv.DictReader(io.StringIO(base64.b64decode(href.group(1)).decode("utf-8"))))
    assert [row["file"] for row in table] == [name for _, name in uploads]
    assert table[1]["probability"] == "" and "JPEG" in table[1]["error"]
    shown = [float(p) for p in re.findall(r'<td class="probability">([\d.]+) %</td>', page)]
    assert shown == pytest.approx([100 * float(table[i]["probability"]) for i in (0, 2)], abs=0.05)


def test_one_file_still_gets_the_detailed_result_page(client):
    page = client.post("/predict", data=files(MIXED[0])).get_data(as_text=True)
    assert 'id="probability"' in page and 'id="overlay"' in page and "batch-results" not in page


def test_the_form_takes_several_files_and_says_how_many(client):
    page = client.get("/").get_data(as_text=True)
    assert re.search(r'<input type="file" id="file" name="file" multiple required data-max-files="100">', page)
    assert "up to 100 at once" in page
