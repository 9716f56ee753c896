"""DICOM results of the web API (pneumonia/web/dicom_results.py): `POST /api/predict?result=dicom-sr` answers the
Structured Report of a DICOM upload, `?result=dicom` the Grad-CAM Secondary Capture and the SR as
multipart/related, read back here with pydicom and the standard library's MIME parser. On the shipped
model, gate included."""

from __future__ import annotations

import builtins
import email
import email.policy
import io

import numpy as np
import pydicom
import pytest
import schemathesis
from builders import PATIENT_ID, PATIENT_NAME, REAL_XRAYS, dicom_bytes, sr_content, upload
from PIL import Image
from pydicom.uid import generate_uid

from pneumonia.web.api import bp
from pneumonia.web.openapi import document
from pneumonia.web.settings import Settings

pytest.importorskip("highdicom", reason="DICOM results need highdicom: pip install -r requirements-pacs.txt")

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


SPEC = document(Settings(), bp)
ANSWERED = set(SPEC["paths"]["/api/predict"]["post"]["responses"]["200"]["content"])  # documented media types


@pytest.fixture(scope="module")
def contract():
    return schemathesis.openapi.from_dict(SPEC)


def with_uids(data: bytes, **tags) -> bytes:
    """`data` (a DICOM file of builders.dicom_bytes) in a study and series of its own, with `tags` set."""
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def xray_dicom() -> bytes:
    """One of the repository's real X-rays as a DX image: the shipped model's gate accepts it."""
    pixels = np.asarray(Image.open(REAL_XRAYS[0]).convert("L"))
    return with_uids(dicom_bytes(pixels, bits_stored=8), StudyID="S1", AccessionNumber="A1")


def ct_slice() -> bytes:
    """A CT slice of a phantom (an elliptic body, two dark lungs): DICOM the gate refuses as no chest X-ray."""
    y, x = np.mgrid[0:512, 0:512] / 512
    body = np.where(((x - 0.5) / 0.42) ** 2 + ((y - 0.5) / 0.33) ** 2 < 1, 1040, 24)
    lungs = (((np.abs(x - 0.5) - 0.15) / 0.1) ** 2 + ((y - 0.5) / 0.18) ** 2) < 1
    pixels = np.where(lungs, 140, body).astype(np.uint16)
    return with_uids(dicom_bytes(pixels, bits_stored=12), Modality="CT", SOPClassUID=CT_IMAGE_STORAGE)


def evidence_of(sr: pydicom.Dataset) -> tuple[str, str]:
    """(study, SOP instance) of the image the SR reports on."""
    study = sr.CurrentRequestedProcedureEvidenceSequence[0]
    return study.StudyInstanceUID, study.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID


def related_parts(response) -> list[pydicom.Dataset]:
    """The parts of a multipart/related answer, parsed by the standard library's MIME parser."""
    head = f"Content-Type: {response.headers['Content-Type']}\r\n\r\n".encode()
    message = email.message_from_bytes(head + response.data, policy=email.policy.HTTP)
    assert message.get_content_type() == "multipart/related" and message.get_param("type") == "application/dicom"
    parts = list(message.iter_parts())
    assert {part.get_content_type() for part in parts} == {"application/dicom"}
    return [pydicom.dcmread(io.BytesIO(part.get_payload(decode=True))) for part in parts]


def test_the_sr_of_a_dicom_upload_has_the_json_probability_and_references_the_upload(shipped_app, xray_dicom, contract):
    client = shipped_app.test_client()
    source = pydicom.dcmread(io.BytesIO(xray_dicom))
    probability = client.post("/api/predict", data=upload(xray_dicom, "x.dcm")).get_json()["probability"]

    response = client.post("/api/predict?result=dicom-sr", data=upload(xray_dicom, "x.dcm"))

    assert response.status_code == 200 and response.mimetype == "application/dicom" and response.mimetype in ANSWERED
    assert response.headers["Cache-Control"] == "no-store"
    contract["/api/predict"]["POST"].validate_response(response)
    sr = pydicom.dcmread(io.BytesIO(response.data))
    assert sr.Modality == "SR" and "RESEARCH USE ONLY" in sr.SeriesDescription
    assert evidence_of(sr) == (source.StudyInstanceUID, source.SOPInstanceUID)
    assert sr.StudyInstanceUID == source.StudyInstanceUID and sr.SeriesInstanceUID != source.SeriesInstanceUID
    assert (sr.PatientID, sr.AccessionNumber) == (PATIENT_ID, "A1")  # identification copied, as DICOM requires
    values = sr_content(sr)
    assert values["Probability"] == pytest.approx(probability, abs=1e-6)
    assert values["Out-of-distribution gate verdict"] == "ok" and "Label at screening threshold" in values


def test_result_dicom_answers_the_capture_then_the_sr_as_multipart_related(shipped_app, xray_dicom, contract):
    client = shipped_app.test_client()
    source = pydicom.dcmread(io.BytesIO(xray_dicom))
    probability = client.post("/api/predict", data=upload(xray_dicom, "x.dcm")).get_json()["probability"]

    response = client.post("/api/predict?result=DICOM", data=upload(xray_dicom, "x.dcm"))

    assert response.status_code == 200, response.get_data(as_text=True)[:300]
    assert response.mimetype == "multipart/related" and response.mimetype in ANSWERED
    contract["/api/predict"]["POST"].validate_response(response)  # the status and headers; not the body
    capture, sr = related_parts(response)
    assert capture.Modality == "OT" and list(capture.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert "RESEARCH USE ONLY" in capture.SeriesDescription
    assert capture.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert capture.pixel_array.ndim == 3 and capture.pixel_array.shape[2] == 3
    assert capture.StudyInstanceUID == sr.StudyInstanceUID == source.StudyInstanceUID
    assert evidence_of(sr) == (source.StudyInstanceUID, source.SOPInstanceUID)
    assert sr_content(sr)["Probability"] == pytest.approx(probability, abs=1e-6)


def test_a_jpeg_asking_for_dicom_results_is_a_415_naming_the_reason(shipped_app):
    response = shipped_app.test_client().post("/api/predict?result=dicom-sr", data=upload(REAL_XRAYS[0].read_bytes()))
    assert response.status_code == 415 and response.mimetype == "application/json"
    assert "need a DICOM upload" in response.get_json()["error"]


def test_a_ct_the_gate_refuses_gets_the_json_422_and_no_probability(shipped_app):
    for result in ("dicom-sr", "dicom"):
        response = shipped_app.test_client().post(f"/api/predict?result={result}", data=upload(ct_slice(), "ct.dcm"))
        body = response.get_json()
        assert response.status_code == 422 and response.mimetype == "application/json"
        assert body["ood"]["verdict"] == "rejected" and "probability" not in body


def test_a_dicom_without_its_study_uid_or_an_unknown_result_is_a_400(shipped_app):
    client = shipped_app.test_client()
    no_study = dicom_bytes(np.asarray(Image.open(REAL_XRAYS[0]).convert("L")), bits_stored=8)
    response = client.post("/api/predict?result=dicom-sr", data=upload(no_study, "x.dcm"))
    assert response.status_code == 400 and "StudyInstanceUID" in response.get_json()["error"]
    response = client.post("/api/predict?result=xml", data=upload(no_study, "x.dcm"))
    assert response.status_code == 400 and "dicom-sr" in response.get_json()["error"]


def test_without_highdicom_dicom_results_are_a_501_naming_the_pacs_extra(shipped_app, xray_dicom, without_highdicom):
    client = shipped_app.test_client()
    response = client.post("/api/predict?result=dicom", data=upload(xray_dicom, "x.dcm"))
    assert response.status_code == 501
    assert "highdicom" in response.get_json()["error"] and "pip install .[pacs]" in response.get_json()["error"]
    assert client.post("/api/predict", data=upload(xray_dicom, "x.dcm")).status_code == 200  # JSON still works


def test_dicom_results_write_nothing_and_log_nothing_of_the_patient(
    shipped_app, xray_dicom, monkeypatch, caplog, capfd
):
    real_open, written = builtins.open, []

    def watched_open(file, mode="r", *args, **kwargs):
        if any(flag in mode for flag in "wax+"):
            written.append(str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", watched_open)
    with caplog.at_level("DEBUG"):
        response = shipped_app.test_client().post("/api/predict?result=dicom", data=upload(xray_dicom, "x.dcm"))
    assert response.status_code == 200 and written == []
    logged = caplog.text + "".join(capfd.readouterr())
    assert PATIENT_ID not in logged and PATIENT_NAME.split("^")[1] not in logged
