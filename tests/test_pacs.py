"""`pacs screen` and `pacs watch` against a real Orthanc with its DICOMweb plugin: started once per
session on a free port with its own storage and configuration (skipped, saying why, without the
`Orthanc` binary or the plugin: .ci/run installs both). The X-rays are the two real ones of
tests/data wrapped in DICOM, so the shipped model's gate accepts them; a noise image in DICOM is what
it refuses. Failures that Orthanc does not make by itself (a TLS front, a STOW that fails, a PACS that
goes away mid-run) come from a small proxy in front of it: Debian's Orthanc 1.10 crashes on its own
HTTPS (SslEnabled) at the first handshake."""

from __future__ import annotations

import csv
import io
import json
import shutil
import ssl
import subprocess
import threading
import uuid
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
from builders import (
    PATIENT_ID,
    PATIENT_NAME,
    REAL_XRAYS,
    SHIPPED_MODEL,
    dicom_bytes,
    free_port,
    noise_png,
    run_cli,
    sr_content,
)
from dicomweb_client.api import DICOMwebClient
from PIL import Image
from pydicom.uid import generate_uid

pytest.importorskip("highdicom", reason="pacs needs highdicom: pip install -r requirements-pacs.txt")

USER, PASSWORD = "screener", "right-password"
READER = "reader"  # the same password; may read but not store (READ_ONLY_FILTER)
# Orthanc's Lua request filter: a request it turns down is answered 403 Forbidden.
READ_ONLY_FILTER = f"""
function IncomingHttpRequestFilter(method, uri, ip, username, httpHeaders)
  return not (method == 'POST' and username == '{READER}')
end
"""
STUDY, SERIES, INSTANCE = "0020000D", "0020000E", "00080018"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def orthanc_server(folder: Path, **settings):
    """pneumonia.pacs.local_orthanc's server, or the test skipped saying why."""
    from pneumonia.pacs import local_orthanc

    if reason := local_orthanc.missing():
        pytest.skip(reason)
    return local_orthanc.orthanc_server(folder, **settings)


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory):
    with orthanc_server(tmp_path_factory.mktemp("orthanc")) as url:
        yield url


@pytest.fixture(scope="session")
def orthanc_with_auth(tmp_path_factory):
    """Orthanc with users: USER may do everything, READER may read but not store (403)."""
    folder = tmp_path_factory.mktemp("orthanc_auth")
    (folder / "read_only.lua").write_text(READ_ONLY_FILTER)
    settings = {
        "AuthenticationEnabled": True,
        "RegisteredUsers": {USER: PASSWORD, READER: PASSWORD},
        "LuaScripts": [str(folder / "read_only.lua")],
    }
    with orthanc_server(folder, **settings) as url:
        yield url


@pytest.fixture(scope="module")
def shipped_classifier():
    from pneumonia.serving.classifier import XrayClassifier

    return XrayClassifier(SHIPPED_MODEL)


# --- A proxy in front of Orthanc: TLS, and failures on cue ----------------------------------------


@contextmanager
def proxy(upstream: str, fault=lambda method, posts: None, tls: tuple[Path, Path] | None = None):
    """A server on loopback in front of the DICOMweb root `upstream` that forwards every request, unless
    `fault(method, POSTs so far)` answers a status to send instead, or "drop" (the connection closed
    unanswered); with `tls` (certificate, key) it speaks HTTPS. Yields its DICOMweb root."""
    origin = upstream.removesuffix("/dicom-web")
    posts = []

    class Forward(BaseHTTPRequestHandler):
        def _answer(self):
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            if self.command == "POST":
                posts.append(self.path)
            status = fault(self.command, len(posts))
            if status == "drop":
                self.close_connection = True
                return
            if status is None:
                headers = {k: self.headers[k] for k in ("Content-Type", "Accept", "Authorization") if k in self.headers}
                answer = requests.request(self.command, origin + self.path, data=body, headers=headers, timeout=60)
                status, content_type, content = answer.status_code, answer.headers.get("Content-Type"), answer.content
            else:
                content_type, content = "text/plain", b"failed on cue"
            self.send_response(status)
            self.send_header("Content-Type", content_type or "application/octet-stream")
            self.send_header("Content-Length", str(len(content)))
            self.end_headers()
            self.wfile.write(content)

        do_GET = do_POST = _answer

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Forward)
    if tls is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*tls)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{server.server_address[1]}/dicom-web"
    finally:
        server.shutdown()
        server.server_close()


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 signed by its own key, made by `openssl` (skipped without it)."""
    if shutil.which("openssl") is None:
        pytest.skip("the TLS test makes its certificate with openssl, which is not installed")
    certificate, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", key, "-out", certificate, "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return certificate, key


# --- Building and reading the PACS's content ------------------------------------------------------


def xray_pixels(index: int) -> np.ndarray:
    return np.asarray(Image.open(REAL_XRAYS[index]).convert("L"))


def study_dicom(pixels: np.ndarray, study: str, modality: str = "CR", transfer_syntax=None, **tags) -> bytes:
    """`pixels` as an image of `study` (a new series), Part 10 bytes; compressed when `transfer_syntax` says."""
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(pixels, bits_stored=8)))
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study, generate_uid(), modality
    ds.StudyDate, ds.BodyPartExamined = "20240301", "CHEST"
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    if transfer_syntax is not None:
        ds.compress(transfer_syntax)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def reader(url: str, auth=None) -> DICOMwebClient:
    """dicomweb-client as the tests' own view of the PACS: what they store and what they read back."""
    session = requests.Session()
    session.auth = auth
    return DICOMwebClient(url, session=session)


def ct_dicom(study: str) -> bytes:
    """A CT slice of a phantom (an elliptic body, two dark lungs) in `study`: DICOM the gate refuses."""
    y, x = np.mgrid[0:512, 0:512] / 512
    body = np.where(((x - 0.5) / 0.42) ** 2 + ((y - 0.5) / 0.33) ** 2 < 1, 1040, 24)
    lungs = (((np.abs(x - 0.5) - 0.15) / 0.1) ** 2 + ((y - 0.5) / 0.18) ** 2) < 1
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(np.where(lungs, 140, body).astype(np.uint16), bits_stored=12)))
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality, ds.BodyPartExamined = study, generate_uid(), "CT", "CHEST"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def stow(url: str, study: str, *instances: bytes, auth=None) -> None:
    datasets = [pydicom.dcmread(io.BytesIO(data)) for data in instances]
    assert not reader(url, auth).store_instances(datasets, study).get("FailedSOPSequence")  # Orthanc: empty


def value(item: dict, tag: str):
    return (item.get(tag) or {}).get("Value", [None])[0]


def series_of(url: str, study: str, modality: str | None = None, auth=None) -> list[dict]:
    filters = {"Modality": modality} if modality else None
    return reader(url, auth).search_for_series(study, search_filters=filters, fields=["0008103E"])


def instances_of(url: str, study: str, modality: str) -> list[str]:
    """The SOP Instance UIDs of `modality` (SR or OT) in `study`."""
    pacs = reader(url)
    series = [value(s, SERIES) for s in series_of(url, study, modality)]
    return [value(i, INSTANCE) for uid in series for i in pacs.search_for_instances(study, uid)]


def results_in(url: str, study: str, modality: str) -> list[pydicom.Dataset]:
    """Every instance of `modality` (SR or OT) in `study`, fetched over WADO-RS as stored."""
    pacs, found = reader(url), []
    for series in series_of(url, study, modality):
        uid = value(series, SERIES)
        for item in pacs.search_for_instances(study, uid):
            found.append(
                pacs.retrieve_instance(study, uid, value(item, INSTANCE), media_types=(("application/dicom", "*"),))
            )
    return found


def evidence_of(sr: pydicom.Dataset) -> str:
    """The SOP Instance UID of the image the SR reports on."""
    return (
        sr.CurrentRequestedProcedureEvidenceSequence[0]
        .ReferencedSeriesSequence[0]
        .ReferencedSOPSequence[0]
        .ReferencedSOPInstanceUID
    )


def predicted(tmp_path: Path, data: bytes) -> float:
    """`predict --json` on the same DICOM bytes."""
    path = tmp_path / f"{uuid.uuid4().hex}.dcm"
    path.write_bytes(data)
    result = run_cli("predict", path, "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])["probability"]


def csv_rows(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


# --- pacs screen --------------------------------------------------------------------------------


def test_screen_stores_an_sr_and_a_research_only_gradcam_capture_in_the_study_with_predicts_probability(
    orthanc, tmp_path
):
    study = generate_uid()
    images = [study_dicom(xray_pixels(i), study) for i in range(2)]
    stow(orthanc, study, *images)
    sources = {pydicom.dcmread(io.BytesIO(d)).SOPInstanceUID: d for d in images}
    source_series = {value(s, SERIES) for s in series_of(orthanc, study)}

    result = run_cli("pacs", "screen", orthanc, "--study", study, "--csv", tmp_path / "run.csv", cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    reports, captures = results_in(orthanc, study, "SR"), results_in(orthanc, study, "OT")
    assert len(reports) == len(captures) == 2
    assert {r.SeriesInstanceUID for r in reports + captures}.isdisjoint(source_series)  # new series
    assert len({r.SeriesInstanceUID for r in reports}) == len({c.SeriesInstanceUID for c in captures}) == 1
    for sr in reports:
        referenced = evidence_of(sr)
        assert sr.StudyInstanceUID == study and sr.PatientID == PATIENT_ID and referenced in sources
        items = sr_content(sr)
        assert items["Probability"] == pytest.approx(predicted(tmp_path, sources[referenced]), abs=1e-6)
        assert {"Threshold default", "Threshold screening", "Label at default threshold"} <= set(items)
        assert items["Out-of-distribution gate verdict"] == "ok"
        assert "RESEARCH USE ONLY" in sr.SeriesDescription
    for capture in captures:
        assert (
            list(capture.ImageType)[:2] == ["DERIVED", "SECONDARY"] and "RESEARCH USE ONLY" in capture.SeriesDescription
        )
        assert capture.SourceImageSequence[0].ReferencedSOPInstanceUID in sources
        assert capture.pixel_array.shape[2] == 3
    rows = csv_rows(tmp_path / "run.csv")
    assert sorted(r["sop_instance_uid"] for r in rows) == sorted(sources) and {r["status"] for r in rows} == {
        "screened"
    }
    written = (tmp_path / "run.csv").read_text() + result.stdout + result.stderr
    assert PATIENT_NAME.split("^")[0] not in written and PATIENT_ID not in written


def test_a_second_run_skips_what_the_pacs_has_and_force_stores_it_again(orthanc, tmp_path):
    study = generate_uid()
    stow(orthanc, study, study_dicom(xray_pixels(0), study))
    assert run_cli("pacs", "screen", orthanc, "--study", study, cwd=tmp_path).returncode == 0

    again = run_cli("pacs", "screen", orthanc, "--study", study, "--csv", tmp_path / "again.csv", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert [r["status"] for r in csv_rows(tmp_path / "again.csv")] == ["skipped"]
    assert len(results_in(orthanc, study, "SR")) == 1

    forced = run_cli("pacs", "screen", orthanc, "--study", study, "--force", cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr
    assert len(series_of(orthanc, study, "SR")) == 2 and len(results_in(orthanc, study, "OT")) == 2


def test_an_image_the_gate_refuses_gets_nothing_stored_and_its_row_says_why(orthanc, tmp_path):
    study = generate_uid()
    noise = np.asarray(Image.open(io.BytesIO(noise_png())))
    stow(orthanc, study, study_dicom(noise, study, modality="DX"))

    result = run_cli("pacs", "screen", orthanc, "--study", study, "--csv", tmp_path / "run.csv", cwd=tmp_path)

    assert result.returncode == 0, result.stderr  # a refusal is an answer, not a failure
    [row] = csv_rows(tmp_path / "run.csv")
    assert row["status"] == "refused" and row["probability"] == "" and row["ood_verdict"] == "rejected"
    assert row["error"].startswith("Not screened") or "does not look like" in row["error"]
    assert series_of(orthanc, study, "SR") == [] and series_of(orthanc, study, "OT") == []


def test_a_ct_screened_with_the_x_rays_is_refused_by_the_gate_and_gets_no_probability(orthanc, tmp_path):
    """--modality CR,DX,CT fetches the CT too: the gate refuses it, so nothing is stored for it, its row
    says why, and the run exits 0 (a refusal is an answer); the study's X-ray gets its results."""
    study = generate_uid()
    xray, ct = study_dicom(xray_pixels(0), study), ct_dicom(study)
    stow(orthanc, study, xray, ct)
    uid_of = {kind: pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID for kind, data in (("xray", xray), ("ct", ct))}

    args = ("pacs", "screen", orthanc, "--study", study, "--modality", "CR,DX,CT", "--csv", tmp_path / "run.csv")
    result = run_cli(*args, cwd=tmp_path)

    assert result.returncode == 0 and "1 screened, 0 skipped, 1 refused" in result.stderr, result.stderr
    rows = {row["sop_instance_uid"]: row for row in csv_rows(tmp_path / "run.csv")}
    ct_row = rows[uid_of["ct"]]
    assert ct_row["status"] == "refused" and ct_row["probability"] == "" and ct_row["ood_verdict"] == "rejected"
    assert ct_row["error"] and ct_row["sr_sop_instance_uid"] == "" and ct_row["gradcam_sop_instance_uid"] == ""
    assert rows[uid_of["xray"]]["status"] == "screened"
    reports, captures = results_in(orthanc, study, "SR"), results_in(orthanc, study, "OT")
    assert [evidence_of(sr) for sr in reports] == [uid_of["xray"]]
    assert [c.SourceImageSequence[0].ReferencedSOPInstanceUID for c in captures] == [uid_of["xray"]]


def test_the_modality_filter_leaves_other_modalities_alone(orthanc, tmp_path):
    study = generate_uid()
    stow(orthanc, study, study_dicom(xray_pixels(1), study, modality="MG"))
    result = run_cli("pacs", "screen", orthanc, "--study", study, cwd=tmp_path)
    assert result.returncode == 0 and "0 image(s)" in result.stderr
    dx = run_cli("pacs", "screen", orthanc, "--study", study, "--modality", "MG", cwd=tmp_path)
    assert dx.returncode == 0 and "1 screened" in dx.stderr


def test_a_jpeg_ls_and_a_jpeg_2000_image_are_screened_as_their_uncompressed_pixels(orthanc, tmp_path):
    from pydicom.uid import JPEG2000Lossless, JPEGLSLossless

    study = generate_uid()
    pixels = xray_pixels(1)
    compressed = [study_dicom(pixels, study, transfer_syntax=s) for s in (JPEGLSLossless, JPEG2000Lossless)]
    stow(orthanc, study, *compressed)

    result = run_cli("pacs", "screen", orthanc, "--study", study, cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    expected = predicted(tmp_path, study_dicom(pixels, generate_uid()))
    probabilities = [sr_content(sr)["Probability"] for sr in results_in(orthanc, study, "SR")]
    assert probabilities == pytest.approx([expected, expected], abs=1e-6)


# --- Failures -----------------------------------------------------------------------------------


def test_an_unreachable_pacs_exits_2_naming_it(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/dicom-web"
    result = run_cli("pacs", "screen", url, "--retries", "1", "--backoff", "0.01", cwd=tmp_path)
    assert result.returncode == 2
    assert "unreachable" in result.stderr and url in result.stderr and "Traceback" not in result.stderr


def test_wrong_credentials_exit_2_with_http_401_and_right_ones_connect(orthanc_with_auth, tmp_path):
    wrong = run_cli("pacs", "screen", orthanc_with_auth, "--user", USER, "--password", "wrong", cwd=tmp_path)
    assert wrong.returncode == 2 and "HTTP 401" in wrong.stderr and "wrong" not in wrong.stderr
    right = run_cli("pacs", "screen", orthanc_with_auth, "--user", USER, "--password", PASSWORD, cwd=tmp_path)
    assert right.returncode == 0, right.stderr


def test_a_user_who_may_read_but_not_store_exits_2_with_http_403_and_nothing_is_stored(orthanc_with_auth, tmp_path):
    study = generate_uid()
    stow(orthanc_with_auth, study, study_dicom(xray_pixels(0), study), auth=(USER, PASSWORD))
    args = ("pacs", "screen", orthanc_with_auth, "--study", study, "--user", READER, "--password", PASSWORD)
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 2 and "HTTP 403" in result.stderr and "store the results" in result.stderr
    assert series_of(orthanc_with_auth, study, "SR", auth=(USER, PASSWORD)) == []
    assert series_of(orthanc_with_auth, study, "OT", auth=(USER, PASSWORD)) == []


def test_tls_is_verified_unless_insecure_and_a_ca_bundle_makes_a_self_signed_pacs_verify(
    orthanc, tmp_path, monkeypatch
):
    import certifi

    certificate, key = self_signed(tmp_path)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", certifi.where())  # set on many machines: the options must win over it
    study = generate_uid()
    stow(orthanc, study, study_dicom(xray_pixels(0), study))
    with proxy(orthanc, tls=(certificate, key)) as url:
        refused = run_cli("pacs", "screen", url, "--study", study, cwd=tmp_path)
        verified = run_cli("pacs", "screen", url, "--study", study, "--ca-bundle", certificate, cwd=tmp_path)
        insecure = run_cli("pacs", "screen", url, "--study", study, "--insecure", "--force", cwd=tmp_path)
    assert refused.returncode == 2 and "TLS verification" in refused.stderr and "Traceback" not in refused.stderr
    assert verified.returncode == 0 and "1 screened" in verified.stderr, verified.stderr
    assert insecure.returncode == 0 and "1 screened" in insecure.stderr, insecure.stderr
    assert len(instances_of(orthanc, study, "SR")) == 2


@pytest.mark.parametrize("failing", [1, 2], ids=["the capture's STOW fails", "the SR's STOW fails"])
def test_a_result_is_all_in_the_pacs_or_failed_and_redone_by_the_next_run(orthanc, shipped_classifier, failing):
    """The capture goes first, the SR (what marks an image done) last: whichever STOW fails, no SR is
    stored without its capture, the row says so, and the next run screens the image again."""
    from pneumonia.pacs.dicomweb import Connection, DicomWeb
    from pneumonia.pacs.runs import Filters, PacsScreener

    study = generate_uid()
    stow(orthanc, study, study_dicom(xray_pixels(1), study))
    filters = Filters(studies=(study,))
    with proxy(orthanc, lambda method, posts: 500 if method == "POST" and posts == failing else None) as url:
        [row] = PacsScreener(DicomWeb(Connection(url, retries=0)), shipped_classifier).run(filters)
    assert row.status == "failed" and row.screened.error.startswith("Screened but not stored")
    assert instances_of(orthanc, study, "SR") == [] and len(instances_of(orthanc, study, "OT")) == failing - 1
    assert row.stored == ("", instances_of(orthanc, study, "OT")[0] if failing == 2 else "")

    [again] = PacsScreener(DicomWeb(Connection(orthanc)), shipped_classifier).run(filters)
    assert again.status == "screened" and instances_of(orthanc, study, "SR") == [again.stored[0]]
    assert again.stored[1] in instances_of(orthanc, study, "OT")


def test_a_pacs_that_goes_away_mid_run_exits_2_and_the_next_run_does_the_rest(orthanc, tmp_path):
    study = generate_uid()
    stow(orthanc, study, *(study_dicom(xray_pixels(i), study) for i in range(2)))

    stows = []

    def gone_after_one_image(method, posts):  # its two STOWs go through, then nothing answers
        stows.extend([posts] if method == "POST" else [])
        return "drop" if posts > 2 else None

    with proxy(orthanc, gone_after_one_image) as url:
        args = ("pacs", "screen", url, "--study", study, "--retries", "1", "--backoff", "0.01")
        cut = run_cli(*args, "--csv", tmp_path / "cut.csv", cwd=tmp_path)
    assert cut.returncode == 2 and "store the results: the connection to the PACS" in cut.stderr, cut.stderr
    assert "not sent again: the PACS may have received it" in cut.stderr and stows == [1, 2, 3]  # the 3rd sent once
    assert [r["status"] for r in csv_rows(tmp_path / "cut.csv")] == ["screened"]
    assert len(instances_of(orthanc, study, "SR")) == 1

    rest = run_cli("pacs", "screen", orthanc, "--study", study, "--csv", tmp_path / "rest.csv", cwd=tmp_path)
    assert rest.returncode == 0, rest.stderr
    assert sorted(r["status"] for r in csv_rows(tmp_path / "rest.csv")) == ["screened", "skipped"]
    assert len(instances_of(orthanc, study, "SR")) == 2


def test_watch_needs_a_bound_and_polls_max_runs_times(orthanc, tmp_path):
    unbounded = run_cli("pacs", "watch", orthanc, cwd=tmp_path)
    assert unbounded.returncode == 2 and "--max-runs" in unbounded.stderr
    study = generate_uid()
    stow(orthanc, study, study_dicom(xray_pixels(0), study))
    args = ("pacs", "watch", orthanc, "--study", study, "--max-runs", "2", "--interval", "0.1")
    result = run_cli(*args, "--csv", tmp_path / "watch.csv", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("image(s):") == 2
    assert [r["status"] for r in csv_rows(tmp_path / "watch.csv")] == ["screened", "skipped"]


def test_watch_screens_an_image_that_arrives_between_two_runs_and_skips_the_done_one(orthanc, shipped_classifier):
    from pneumonia.pacs.dicomweb import Connection, DicomWeb
    from pneumonia.pacs.runs import Filters, PacsScreener, watch

    study = generate_uid()
    stow(orthanc, study, study_dicom(xray_pixels(0), study))
    screener = PacsScreener(DicomWeb(Connection(orthanc)), shipped_classifier)
    runs, waits = [], []
    arrivals = [lambda: stow(orthanc, study, study_dicom(xray_pixels(1), study))]

    def run_once() -> int:
        runs.append(sorted(row.status for row in screener.run(Filters(studies=(study,)))))
        return 0

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        if arrivals:
            arrivals.pop()()

    assert watch(run_once, 5.0, 3, None, sleep=sleep) == 0
    assert runs == [["screened"], ["screened", "skipped"], ["skipped", "skipped"]] and waits == [5.0, 5.0]
    assert len(results_in(orthanc, study, "SR")) == 2


def test_a_run_tally_counts_skipped_images_beside_the_outcomes():
    from pneumonia.pacs.runs import RunTally

    tally = RunTally()
    for status in ("skipped", "screened", "failed"):
        tally.count(status)
    assert (tally.files, tally.skipped, tally.failed) == (3, 1, 1)
    assert tally.summary() == "3 image(s): 1 screened, 1 skipped, 0 refused, 1 failed"
