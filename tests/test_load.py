"""Slow clients and overload: the body deadline (408), model capacity (503 with Retry-After),
and gunicorn as the Procfile starts it staying responsive while slow clients hold connections.
The full scenarios are `python -m bench.load`."""

from __future__ import annotations

import json
import runpy
import socket
import threading
import time
from urllib.parse import urlsplit

import pytest
import requests
from builders import REPO, gunicorn_serving, upload, xray_jpeg

from pneumonia.web import create_app
from pneumonia.web.capacity import ModelBusy, ModelCapacity
from pneumonia.web.screener import Screener

BODY_TIMEOUT = 3  # seconds, the server's total body deadline in these tests
BODY_READ_TIMEOUT = 1.5  # seconds without a byte


@pytest.fixture(scope="module")
def gunicorn_server(ungated_model_dir):
    """`gunicorn app:app` with gunicorn.conf.py (threads as shipped) on loopback, a 3 s body deadline:
    (port, url). The tiny model without its gate: what is measured here is serving, and a 4-epoch
    model's gate refuses some of its own kind of images (test_gate.py tests the gate)."""
    with gunicorn_serving(
        ungated_model_dir, PNEUMONIA_BODY_TIMEOUT=str(BODY_TIMEOUT), PNEUMONIA_BODY_READ_TIMEOUT=str(BODY_READ_TIMEOUT)
    ) as (_, url):
        yield urlsplit(url).port, url


class SlowClient(threading.Thread):
    """POST /api/predict announcing a 100 kB body, then one byte every `interval` s (never, when
    `stall_after` bytes are sent), until the server answers or closes: `outcome` ("408",
    "closed", ...) and `held_s`."""

    def __init__(self, port: int, interval: float = 0.5, stall_after: int | None = None):
        super().__init__(daemon=True)
        self.port, self.interval, self.stall_after = port, interval, stall_after
        self.outcome, self.answer, self.held_s = None, b"", None

    def run(self):
        boundary = "slowclientboundary"
        body = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.jpg"\r\n\r\n'.encode()
            + b"\xff\xd8\xff"
            + b"\0" * 100_000
        )
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        started = time.monotonic()
        try:
            sock.sendall(
                (
                    f"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body) + 100}\r\n"
                    f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n"
                ).encode()
            )
            sock.settimeout(self.interval)
            sent = 0
            while time.monotonic() - started < 30:
                if self.stall_after is None or sent < self.stall_after:
                    sock.sendall(body[sent : sent + 1])
                    sent += 1
                try:
                    self.answer = sock.recv(65536)
                except TimeoutError:
                    continue
                break
            self.held_s = time.monotonic() - started
            sock.settimeout(1)
            while self.answer:  # the rest of the answer, until the server closes
                more = sock.recv(65536)
                if not more:
                    break
                self.answer += more
            self.outcome = self.answer.split(b" ", 2)[1].decode() if self.answer else "closed"
        except OSError:
            self.outcome = self.outcome or ("closed" if not self.answer else self.answer.split(b" ", 2)[1].decode())
        finally:
            self.held_s = self.held_s or time.monotonic() - started
            sock.close()


def test_slow_clients_do_not_hold_the_app_and_get_408_after_the_deadline(gunicorn_server):
    port, url = gunicorn_server
    slow = [SlowClient(port) for _ in range(8)]
    for client in slow:
        client.start()
    time.sleep(0.5)  # all eight are trickling and hold a thread each
    for path in ("/healthz", "/", "/model"):
        started = time.perf_counter()
        response = requests.get(f"{url}{path}", timeout=5)
        assert response.status_code == 200 and time.perf_counter() - started < 1.0, path
    upload = requests.post(f"{url}/api/predict", files={"file": ("x.jpg", xray_jpeg())}, timeout=10)
    assert upload.status_code == 200 and 0 <= upload.json()["probability"] <= 1
    assert all(client.is_alive() for client in slow)  # still holding their connections meanwhile
    for client in slow:
        client.join(15)
    for client in slow:
        assert client.outcome in ("408", "closed"), client.answer
        assert BODY_TIMEOUT - 0.6 <= client.held_s <= BODY_TIMEOUT + 2.5, client.held_s
    answered = [client for client in slow if client.outcome == "408"]
    assert answered, "no slow client saw the 408"
    body = json.loads(answered[0].answer.split(b"\r\n\r\n", 1)[1])
    assert body["status"] == 408 and f"within {BODY_TIMEOUT:g} s" in body["error"]
    assert requests.get(f"{url}/healthz", timeout=5).status_code == 200


def test_a_stalled_body_gets_408_after_the_read_timeout(gunicorn_server):
    port, _ = gunicorn_server
    client = SlowClient(port, interval=0.1, stall_after=5)
    client.start()
    client.join(10)
    assert client.outcome in ("408", "closed")
    assert BODY_READ_TIMEOUT - 0.3 <= client.held_s <= BODY_READ_TIMEOUT + 1.0 < BODY_TIMEOUT
    if client.outcome == "408":
        assert b"nothing more of the upload arrived" in client.answer


# --- model capacity ---------------------------------------------------------------------------


@pytest.fixture
def blocked_app(ungated_model_dir, monkeypatch):
    """The app with one model slot and a 1 s line, whose screenings wait for `release`."""
    release = threading.Event()
    screen = Screener.screen

    def blocked(self, *args, **kwargs):
        release.wait(10)
        return screen(self, *args, **kwargs)

    monkeypatch.setattr("pneumonia.web.screener.Screener.screen", blocked)
    app = create_app(
        {"MODEL_PATH": str(ungated_model_dir), "TESTING": True, "MODEL_SLOTS": 1, "MODEL_QUEUE_SECONDS": 1.0}
    )
    app.extensions["model_capacity"].service_s = 0.4  # one waits 0.4 s, two 0.8 s, a third 1.2 s > 1 s
    yield app, release
    release.set()


def test_when_the_line_for_the_model_is_full_an_upload_gets_503_with_retry_after(blocked_app):
    app, release = blocked_app
    capacity = app.extensions["model_capacity"]
    answers = []

    def post():
        answers.append(app.test_client().post("/api/predict", data=upload(xray_jpeg(), "x.jpg")).status_code)

    threads = [threading.Thread(target=post) for _ in range(3)]  # one screening, two in line
    for thread in threads:
        thread.start()
        time.sleep(0.1)
    deadline = time.time() + 5
    while (capacity.running, capacity.waiting) != (1, 2):
        assert time.time() < deadline, capacity.snapshot()
        time.sleep(0.02)

    client = app.test_client()
    started = time.perf_counter()
    busy = client.post("/api/predict", data=upload(xray_jpeg(), "x.jpg"))
    assert time.perf_counter() - started < 0.5  # at once, not after waiting
    assert busy.status_code == 503 and int(busy.headers["Retry-After"]) >= 1
    assert busy.get_json()["status"] == 503 and "busy" in busy.get_json()["error"]
    page = client.post("/predict", data=upload(xray_jpeg(), "x.jpg"))
    assert page.status_code == 503 and page.headers["Retry-After"] == busy.headers["Retry-After"]
    assert page.mimetype == "text/html" and "busy" in page.get_data(as_text=True)
    for path in ("/healthz", "/", "/model"):  # everything else still answers while the model is busy
        assert client.get(path).status_code == 200, path

    release.set()
    for thread in threads:
        thread.join(10)
    assert answers == [200, 200, 200]
    assert client.post("/api/predict", data=upload(xray_jpeg(), "x.jpg")).status_code == 200
    assert capacity.snapshot()["refused"] == 2


def _hold_slot_and_queue(capacity: ModelCapacity, queued: int):
    """A thread holding the slot until `hold` is set, and `queued` more in line: (threads, order, hold)."""
    order, hold = [], threading.Event()

    def job(name):
        try:
            with capacity.slot():
                order.append(name)
                if name == 0:
                    hold.wait(5)
        except ModelBusy as busy:
            order.append(("busy", name, busy.retry_after))

    threads = [threading.Thread(target=job, args=(i,)) for i in range(queued + 1)]
    for thread in threads:
        thread.start()
        time.sleep(0.05)
    return threads, order, hold


def test_model_capacity_serves_the_line_in_order():
    capacity = ModelCapacity(slots=1, max_wait_s=5, initial_service_s=0.1)
    threads, order, hold = _hold_slot_and_queue(capacity, queued=4)
    assert capacity.running == 1 and capacity.waiting == 4
    hold.set()
    for thread in threads:
        thread.join(5)
    assert order == [0, 1, 2, 3, 4] and capacity.running == capacity.waiting == 0


def test_model_capacity_bounds_the_line_and_the_wait():
    capacity = ModelCapacity(slots=1, max_wait_s=0.45, initial_service_s=0.1)
    threads, order, hold = _hold_slot_and_queue(capacity, queued=4)
    assert capacity.running == 1 and capacity.waiting == 4  # the fourth in line expects 4 x 0.1 s <= 0.45 s
    started = time.perf_counter()
    with pytest.raises(ModelBusy) as refused:  # a fifth would expect 5 x 0.1 s: refused at once
        with capacity.slot():
            pass
    assert time.perf_counter() - started < 0.1 and refused.value.retry_after == 1  # the line drains in 0.4 s
    time.sleep(1.2)  # past 2 x max_wait_s, those in line give up rather than wait on
    assert capacity.waiting == 0
    hold.set()
    for thread in threads:
        thread.join(5)
    assert order[0] == 0 and sorted(order[1:]) == [("busy", i, 1) for i in (1, 2, 3, 4)]
    assert capacity.running == capacity.waiting == 0 and capacity.refused == 5
    with capacity.slot():  # free again
        assert capacity.running == 1


def test_threads_outnumber_model_slots_by_default(ungated_model_dir, monkeypatch):
    monkeypatch.delenv("GUNICORN_THREADS", raising=False)
    settings = runpy.run_path(
        str(REPO / "pneumonia" / "web" / "gunicorn_conf.py")
    )  # executed afresh, not the imported module
    app = create_app({"MODEL_PATH": str(ungated_model_dir)})
    assert settings["threads"] >= 4 * app.config["MODEL_SLOTS"] and settings["worker_class"] == "gthread"
    assert app.config["BODY_TIMEOUT"] <= 30 and app.config["BODY_READ_TIMEOUT"] <= app.config["BODY_TIMEOUT"]
    assert 0 < app.config["MODEL_QUEUE_SECONDS"] <= 10
