"""The DICOMweb client (dicomweb-client, wrapped by pneumonia/pacs/dicomweb.py) and `pacs screen`'s
failures against a small local stub PACS (an HTTP server in a thread that answers each path as a test
says): urllib3's retries with doubling backoff for 429 and 5xx, Retry-After, a STOW never sent twice, no
retry for 401, TLS settings and the timeout on every request, a STOW rejection, an answer that is not
DICOM, an image the reader cannot decode. No Orthanc needed."""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pydicom
import pytest
import requests
from builders import PATIENT_ID, REAL_XRAYS, dicom_bytes, run_cli
from PIL import Image
from pydicom.uid import JPEG2000Lossless, generate_uid
from urllib3.fields import RequestField
from urllib3.filepost import choose_boundary, encode_multipart_formdata

from pneumonia.pacs.dicomweb import (
    Connection,
    DicomWeb,
    PacsAuthError,
    PacsError,
    PacsUnreachable,
    first_value,
    single_part,
)

pytest.importorskip("highdicom", reason="pacs needs highdicom: pip install -r requirements-pacs.txt")

STUDY, SERIES = generate_uid(), generate_uid()
DROP = "drop"
BROKEN = "broken"  # headers and half the body, then the connection closed


class StubPacs(BaseHTTPRequestHandler):
    """Answers (method, path prefix) from `routes`: (status, content type, body[, headers]), or a list of
    them given in turn (the last one from then on), or DROP (the connection closed unanswered); 404
    otherwise; BROKEN (a 200 whose body breaks off). `times` gets the monotonic time of each request."""

    routes: dict = {}
    hits: list = []
    accepts: list = []
    times: list = []

    def _answer(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        self.hits.append((self.command, self.path))
        self.accepts.append(self.headers.get("Accept"))
        self.times.append(time.monotonic())
        answer = self._route()
        if answer in (DROP, BROKEN):
            self.close_connection = True
            if answer == BROKEN:
                self.send_response(200)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", "100")
                self.end_headers()
                self.wfile.write(b"[{")
            return
        status, content_type, body, *headers = answer
        self.send_response(status)
        for name, value in {"Content-Type": content_type, "Content-Length": str(len(body)), **dict(*headers)}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _route(self):
        path = self.path.split("?")[0]
        found = [
            answer
            for (method, prefix), answer in self.routes.items()
            if method == self.command and path.startswith(prefix)
        ]
        if not found:
            return 404, "text/plain", b"no route"
        if isinstance(found[0], list):
            return found[0].pop(0) if len(found[0]) > 1 else found[0][0]
        return found[0]

    do_GET = do_POST = _answer

    def log_message(self, *args):
        pass


class StubPacsClosingIdleConnections(StubPacs):
    """The stub keeping each connection open after its answer (HTTP/1.1), then closing it unanswered when a
    second request comes on it: a PACS whose keep-alive timeout ran out as that request went out."""

    protocol_version = "HTTP/1.1"

    def _answer(self):
        if getattr(self, "answered", False):
            self.close_connection = True
            return
        self.answered = True
        super()._answer()

    do_GET = do_POST = _answer


@contextmanager
def stub_pacs(routes: dict, accepts: list | None = None, times: list | None = None, stub: type = StubPacs):
    """The stub on a free port: yields (DICOMweb root, the (method, path) of each request); `accepts`
    gets each request's Accept header, `times` the time each arrived."""
    settings = {"accepts": accepts if accepts is not None else [], "times": times if times is not None else []}
    handler = type("Routes", (stub,), {"routes": routes, "hits": [], **settings})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/dicom-web", handler.hits
    finally:
        server.shutdown()
        server.server_close()


def client(url: str, **settings) -> DicomWeb:
    return DicomWeb(Connection(url, **{"retries": 2, "backoff_s": 0.05, **settings}))


def gaps(times: list[float]) -> list[float]:
    return [later - earlier for earlier, later in zip(times, times[1:])]


def retries_logged(caplog) -> list[str]:
    """pneumonia.pacs.dicomweb's line for each retry."""
    return [r.getMessage() for r in caplog.records if r.name == "pneumonia.pacs.dicomweb"]


def instance_json(instance: str) -> bytes:
    return json.dumps(
        [{"0020000D": {"vr": "UI", "Value": [STUDY]}, "0020000E": {"vr": "UI", "Value": [SERIES]},
          "00080018": {"vr": "UI", "Value": [instance]}}]
    ).encode()  # fmt: skip


def multipart(data: bytes) -> tuple[str, bytes]:
    """`data` as a WADO-RS answer: multipart/related with one application/dicom part, written by urllib3."""
    boundary = choose_boundary()
    body, _ = encode_multipart_formdata(
        [RequestField("0", data, headers={"Content-Type": "application/dicom"})], boundary
    )
    return f'multipart/related; type="application/dicom"; boundary="{boundary}"', body


class Recording(requests.adapters.BaseAdapter):
    """A transport that answers every request with an empty QIDO result and keeps its settings."""

    def __init__(self):
        super().__init__()
        self.settings: list[dict] = []

    def send(self, request, **settings):
        self.settings.append(settings)
        response = requests.Response()
        response.status_code, response._content, response.request, response.url = 200, b"[]", request, request.url
        response.headers["Content-Type"] = "application/dicom+json"
        return response

    def close(self):
        pass


def xray_dicom(**tags) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(np.asarray(Image.open(REAL_XRAYS[0]).convert("L")), bits_stored=8)))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = STUDY, SERIES
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


# --- The client ---------------------------------------------------------------------------------


def test_a_5xx_is_retried_with_doubling_backoff_then_reported_with_its_status(caplog):
    times: list[float] = []
    with stub_pacs({("GET", "/dicom-web/instances"): (503, "text/plain", b"busy")}, times=times) as (url, hits):
        with pytest.raises(PacsError, match="search for images: the PACS answered HTTP 503 Service Unavailable$"):
            list(client(url, backoff_s=0.2).search_instances(None, {}, ()))
    assert len(hits) == 3 and [line.rsplit(" in ", 1)[1] for line in retries_logged(caplog)] == ["0.2 s", "0.4 s"]
    assert [gap >= wait for gap, wait in zip(gaps(times), (0.2, 0.4))] == [True, True]


def test_a_pacs_failing_twice_then_answering_is_asked_three_times_and_its_answer_used(caplog):
    failing = [
        (502, "text/plain", b""),
        (500, "text/plain", b""),
        (200, "application/dicom+json", instance_json("1.2")),
    ]
    with stub_pacs({("GET", "/dicom-web/instances"): failing}) as (url, hits):
        found = list(client(url).search_instances(None, {}, ()))
    assert len(hits) == 3 and [first_value(item, "00080018") for item in found] == ["1.2"]
    assert [line.split(";")[0] for line in retries_logged(caplog)] == [
        "GET: try 1 of 3 failed (HTTP 502)",
        "GET: try 2 of 3 failed (HTTP 500)",
    ]


def test_a_429_waits_as_long_as_its_retry_after_asks():
    times: list[float] = []
    limited = [(429, "text/plain", b"", {"Retry-After": "1"}), (200, "application/dicom+json", b"[]")]
    with stub_pacs({("GET", "/dicom-web/instances"): limited}, times=times) as (url, hits):
        assert list(client(url, backoff_s=0.01).search_instances(None, {}, ())) == []
    assert len(hits) == 2 and gaps(times)[0] >= 1.0


def test_a_retry_after_that_is_no_time_is_waited_as_the_backoff():
    times: list[float] = []
    unclear = [(503, "text/plain", b"", {"Retry-After": "soon"}), (200, "application/dicom+json", b"[]")]
    with stub_pacs({("GET", "/dicom-web/instances"): unclear}, times=times) as (url, hits):
        assert list(client(url, backoff_s=0.3).search_instances(None, {}, ())) == []
    assert len(hits) == 2 and gaps(times)[0] >= 0.3


@pytest.mark.parametrize("answer", [(503, "text/plain", b"busy"), DROP], ids=["503", "dropped"])
def test_a_stow_the_pacs_may_have_received_is_never_sent_again(answer):
    with stub_pacs({("POST", "/dicom-web/studies/"): answer}) as (url, hits):
        with pytest.raises(PacsError) as raised:
            client(url).store(STUDY, [small_dicom()])
    assert hits == [("POST", f"/dicom-web/studies/{STUDY}")]
    message = str(raised.value)
    if answer == DROP:
        assert isinstance(raised.value, PacsUnreachable) and message.endswith(
            "not sent again: the PACS may have received it"
        )
    else:
        assert message == "store the results: the PACS answered HTTP 503 Service Unavailable"


def test_a_stow_refused_with_429_is_sent_again_after_its_retry_after():
    times: list[float] = []
    accepted = {"00081199": {"vr": "SQ", "Value": []}}
    limited = [
        (429, "text/plain", b"", {"Retry-After": "1"}),
        (200, "application/dicom+json", json.dumps(accepted).encode()),
    ]
    with stub_pacs({("POST", "/dicom-web/studies/"): limited}, times=times) as (url, hits):
        client(url, backoff_s=0.01).store(STUDY, [small_dicom()])
    assert hits == [("POST", f"/dicom-web/studies/{STUDY}")] * 2 and gaps(times)[0] >= 1.0


def test_a_stow_after_a_search_goes_on_a_new_connection_not_one_the_pacs_may_be_closing():
    accepted = {"00081199": {"vr": "SQ", "Value": []}}
    routes = {
        ("GET", "/dicom-web/instances"): (200, "application/dicom+json", instance_json("1.2")),
        ("POST", "/dicom-web/studies/"): (200, "application/dicom+json", json.dumps(accepted).encode()),
    }
    with stub_pacs(routes, stub=StubPacsClosingIdleConnections) as (url, hits):
        pacs = client(url)
        assert len(list(pacs.search_instances(None, {}, ()))) == 1
        pacs.store(STUDY, [small_dicom()])
    assert [(method, path.split("?")[0]) for method, path in hits] == [
        ("GET", "/dicom-web/instances"),
        ("POST", f"/dicom-web/studies/{STUDY}"),
    ]


def test_an_answer_that_breaks_off_is_asked_for_again_and_then_named(caplog):
    found = [BROKEN, (200, "application/dicom+json", instance_json("1.2"))]
    with stub_pacs({("GET", "/dicom-web/instances"): found}) as (url, hits):
        assert [first_value(item, "00080018") for item in client(url).search_instances(None, {}, ())] == ["1.2"]
    assert len(hits) == 2 and retries_logged(caplog)[0].startswith("GET: try 1 failed (its answer broke off)")
    with stub_pacs({("GET", "/dicom-web/instances"): BROKEN}) as (url, hits):
        with pytest.raises(PacsUnreachable, match="search for images: .*ChunkedEncodingError.*; its answer broke off$"):
            list(client(url).search_instances(None, {}, ()))
    assert len(hits) == 3  # the first try and --retries 2 more


def test_an_unreachable_pacs_is_tried_again_and_then_named_with_the_tries(caplog):
    with socket.socket() as taken:  # a port nobody listens on: the connection is refused
        taken.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{taken.getsockname()[1]}/dicom-web"
        with pytest.raises(PacsUnreachable) as raised:
            client(url, backoff_s=0.1).store(STUDY, [small_dicom()])  # not yet sent: a STOW is tried again too
    assert str(raised.value) == f"store the results: the PACS at {url} is unreachable after 3 tries (ConnectionError)"
    assert retries_logged(caplog) == [
        "POST: try 1 of 3 failed (NewConnectionError); retrying in 0.1 s",
        "POST: try 2 of 3 failed (NewConnectionError); retrying in 0.2 s",
    ]


def test_a_401_is_not_retried_and_says_the_credentials_were_refused():
    with stub_pacs({("GET", "/dicom-web/instances"): (401, "text/plain", b"")}) as (url, hits):
        pacs = client(url, user="someone", password="secret")
        with pytest.raises(PacsAuthError, match="refused the credentials") as raised:
            list(pacs.search_instances(None, {}, ()))
    assert len(hits) == 1 and "secret" not in str(raised.value)


def test_a_token_is_sent_as_a_bearer_and_tls_is_verified_by_default():
    pacs = DicomWeb(Connection("https://pacs.invalid/dicom-web", token="t0k"))
    assert pacs.session.headers["Authorization"] == "Bearer t0k" and pacs.session.verify is True


@pytest.mark.parametrize("verify", [False, "/etc/site/pacs-ca.pem"], ids=["--insecure", "--ca-bundle"])
def test_tls_settings_and_the_timeout_go_with_every_request_over_requests_ca_bundle(verify, monkeypatch):
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/somewhere/else.pem")  # requests would let it win over the session's
    pacs = DicomWeb(Connection("https://pacs.invalid/dicom-web", verify=verify, timeout_s=7.5))
    transport = Recording()
    pacs.session.mount("https://", transport)
    list(pacs.search_instances(None, {"Modality": "CR"}, ("00080018",)))
    assert [(s["verify"], s["timeout"]) for s in transport.settings] == [(verify, 7.5)]


def test_an_image_is_asked_for_in_its_stored_transfer_syntax_and_read_from_its_multipart_answer():
    from pydicom.uid import JPEGLSLossless

    image = xray_dicom()
    ds = pydicom.dcmread(io.BytesIO(image))
    ds.compress(JPEGLSLossless)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    content_type, body = multipart(buffer.getvalue())
    accepts: list[str] = []
    with stub_pacs({("GET", "/dicom-web/studies/"): (200, content_type, body)}, accepts) as (url, _):
        pacs = client(url)
        fetched = pacs.retrieve_instance(STUDY, SERIES, ds.SOPInstanceUID)
    assert accepts == ['multipart/related; type="application/dicom"; transfer-syntax=*']
    assert fetched == buffer.getvalue()  # the bytes the PACS sent, parsed by nothing here
    fetched = pydicom.dcmread(io.BytesIO(fetched))
    assert fetched.SOPInstanceUID == ds.SOPInstanceUID and fetched.file_meta.TransferSyntaxUID == JPEGLSLossless
    assert np.array_equal(fetched.pixel_array, pydicom.dcmread(io.BytesIO(image)).pixel_array)


@pytest.mark.parametrize(
    ("content_type", "body", "expected"),
    [
        (
            'multipart/related; type="application/dicom"; boundary=b1',
            b"--b1\r\nContent-Type: application/dicom\r\n\r\nDICM\r\n\r\n--b1--\r\n",
            b"DICM\r\n",
        ),
        ("application/dicom", b"DICM", b"DICM"),  # a server that sends the part alone
    ],
)
def test_the_one_part_of_an_answer_is_its_bytes(content_type, body, expected):
    assert single_part(content_type, body) == expected


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/json", b"{}"),
        ("multipart/related; boundary=b1", b"--b1\r\n\r\nA\r\n--b1\r\n\r\nB\r\n--b1--"),  # two parts
        ("multipart/related; boundary=b1", b"no delimiter at all"),
        ("multipart/related", b"--\r\n"),  # no boundary
    ],
)
def test_an_answer_that_is_not_one_instance_is_refused(content_type, body):
    with pytest.raises(ValueError):
        single_part(content_type, body)


def small_dicom() -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(dicom_bytes(np.zeros((4, 4), np.uint16))))


def test_a_stow_failure_sequence_is_a_rejection_naming_the_reason():
    answer = {"00081198": {"vr": "SQ", "Value": [{"00081197": {"vr": "US", "Value": [42752]}}]}}
    with stub_pacs({("POST", "/dicom-web/studies/"): (409, "application/dicom+json", json.dumps(answer).encode())}) as (
        url,
        _,
    ):
        pacs = client(url, retries=0)
        with pytest.raises(PacsError, match="HTTP 409"):
            pacs.store(STUDY, [small_dicom()])
    with stub_pacs({("POST", "/dicom-web/studies/"): (202, "application/dicom+json", json.dumps(answer).encode())}) as (
        url,
        _,
    ):
        pacs = client(url, retries=0)
        with pytest.raises(PacsError, match="rejected 1 of 2 result object.*42752"):
            pacs.store(STUDY, [small_dicom(), small_dicom()])


# --- pacs screen against the stub ---------------------------------------------------------------


def pacs_routes(image: bytes, stow_status: int = 200) -> dict:
    content_type, body = multipart(image)
    rejected = {"00081198": {"vr": "SQ", "Value": [{"00081197": {"vr": "US", "Value": [49152]}}]}}
    return {
        ("GET", f"/dicom-web/studies/{STUDY}/series/{SERIES}/instances/"): (200, content_type, body),
        ("GET", f"/dicom-web/studies/{STUDY}/series"): (200, "application/dicom+json", b"[]"),
        ("GET", "/dicom-web/instances"): (200, "application/dicom+json", instance_json("1.2.3.4")),
        ("POST", "/dicom-web/studies/"): (stow_status, "application/dicom+json", json.dumps(rejected).encode()),
    }


def test_a_stow_rejection_fails_the_image_with_exit_1_and_says_it_was_not_stored(tmp_path):
    with stub_pacs(pacs_routes(xray_dicom(), stow_status=409)) as (url, hits):
        result = run_cli("pacs", "screen", url, "--modality", "DX", "--retries", "0", cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert "Screened but not stored" in result.stdout and "1 failed" in result.stderr
    assert ("POST", f"/dicom-web/studies/{STUDY}") in hits and PATIENT_ID not in result.stdout + result.stderr


def test_an_answer_that_is_not_dicom_fails_the_image_with_exit_1_and_nothing_is_stored(tmp_path):
    routes = pacs_routes(xray_dicom())
    routes[("GET", f"/dicom-web/studies/{STUDY}/series/{SERIES}/instances/")] = (
        200,
        "text/html",
        b"<html>log in</html>",
    )
    with stub_pacs(routes) as (url, hits):
        result = run_cli("pacs", "screen", url, "--modality", "DX", cwd=tmp_path)
    assert result.returncode == 1 and "1 failed" in result.stderr, result.stderr
    assert "retrieve an image: the PACS's answer is not one DICOM instance" in result.stdout
    assert "log in" not in result.stdout
    assert not [hit for hit in hits if hit[0] == "POST"]


def test_an_image_the_reader_cannot_decode_fails_with_exit_1_and_nothing_is_stored(tmp_path):
    broken = dicom_bytes(
        np.zeros((64, 64), np.uint16),
        transfer_syntax=JPEG2000Lossless,
        encapsulated=b"\xfe\xff\x00\xe0\x00\x00\x00\x00\xfe\xff\x00\xe0\x04\x00\x00\x00junk",
    )
    ds = pydicom.dcmread(io.BytesIO(broken))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = STUDY, SERIES
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    with stub_pacs(pacs_routes(buffer.getvalue())) as (url, hits):
        result = run_cli("pacs", "screen", url, "--modality", "DX", cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert "refused before decoding" in result.stdout and not [hit for hit in hits if hit[0] == "POST"]


def test_a_5xx_on_the_search_exits_2_with_the_status(tmp_path):
    with stub_pacs({("GET", "/dicom-web/instances"): (500, "text/plain", b"boom")}) as (url, hits):
        result = run_cli("pacs", "screen", url, "--retries", "1", "--backoff", "0.01", cwd=tmp_path)
    assert result.returncode == 2 and "HTTP 500" in result.stderr and "boom" not in result.stderr
    assert len(hits) == 2  # two tries of the first search, then the run ends


def test_a_pacs_that_accepts_the_connection_and_never_answers_times_out_with_exit_2(tmp_path):
    with socket.socket() as silent:  # the kernel completes the handshake; nobody ever reads or answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/dicom-web"
        args = ("pacs", "screen", url, "--timeout", "0.5", "--retries", "1", "--backoff", "0.01")
        started = time.monotonic()
        result = run_cli(*args, cwd=tmp_path, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "unreachable after 2 tries (no answer within 0.5 s: ReadTimeout)" in result.stderr, result.stderr
    assert time.monotonic() - started < 60


def test_watch_stops_at_until_and_never_sleeps_past_it():
    from datetime import datetime, timedelta

    from pneumonia.pacs.runs import watch

    clock = [datetime(2024, 3, 1, 12, 0, 0)]
    runs = []

    def sleep(seconds: float) -> None:
        clock[0] += timedelta(seconds=seconds)

    status = watch(
        lambda: runs.append(clock[0]) or 1, 60, None, datetime(2024, 3, 1, 12, 2, 30), sleep, lambda: clock[0]
    )
    assert status == 1 and [t.strftime("%H:%M:%S") for t in runs] == ["12:00:00", "12:01:00", "12:02:00"]


def test_body_part_and_view_filters_match_case_blind_and_pass_an_image_that_lacks_the_attribute():
    from pneumonia.pacs.runs import Filters

    chest_pa = Filters(body_parts=("CHEST",), views=("PA",))
    assert chest_pa.admits("chest", "PA") and chest_pa.admits(None, None)
    assert not chest_pa.admits("HAND", "PA") and not chest_pa.admits("CHEST", "AP")
    assert Filters().admits("HAND", "LL")


def test_a_url_that_is_not_dicomweb_is_a_usage_error_before_the_model_loads(tmp_path):
    result = run_cli("pacs", "screen", "ftp://pacs.example.org/dicom-web", cwd=tmp_path)
    assert result.returncode == 2
    assert "ftp://pacs.example.org/dicom-web: not a DICOMweb URL" in result.stderr
    assert "Traceback" not in result.stderr
