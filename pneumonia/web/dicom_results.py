"""DICOM results for a DICOM upload: `POST /api/predict?result=dicom-sr` or `?result=dicom` answers the
objects `pacs screen` stores (pneumonia/pacs/reports.py) instead of JSON:

    result=dicom-sr   application/dicom: the Structured Report (TID 1500) alone
    result=dicom      multipart/related; type="application/dicom": the Grad-CAM Secondary Capture, then
                      the SR. The body STOW-RS takes: it can be posted as it is to a PACS's studies/{UID}

Both belong to the upload's study (its identification copied as DICOM requires) in new series, and
reference the uploaded image, so only a DICOM upload can have them (415 otherwise). What the gate
refuses is the JSON API's 422: no SR carries a probability for it, as in `pacs screen`. highdicom and
urllib3 (the multipart body's writer, with requests) come with the pacs extra; an install without them
answers 501. Built in memory: nothing is written or logged.
"""

from __future__ import annotations

from flask import Response, request

from pneumonia.reading.dicom import is_dicom
from pneumonia.web.capacity import model_slot
from pneumonia.web.uploads import UploadError, read_upload

DICOM = "application/dicom"
PACS_EXTRA = "pip install .[pacs] (or pip install -r requirements-pacs.txt)"


def report_builders():
    """pneumonia.pacs.reports, or a 501 when this install lacks what DICOM results need (highdicom, urllib3)."""
    try:
        import urllib3  # noqa: F401  (related_body writes with it)

        from pneumonia.pacs import reports
    except ImportError as err:
        raise UploadError(
            501, f"DICOM results need {err.name}, which this server does not have: its operator can {PACS_EXTRA}."
        ) from None
    return reports


def related_body(instances: list[bytes]) -> tuple[str, bytes]:
    """(Content-Type, body): `instances` (Part 10 bytes) as multipart/related; type="application/dicom"
    (PS3.18 8.6.1.2), binary parts with a Content-Type each. urllib3 writes it: the standard library's
    email generator rewrites every CR and LF inside a binary part as its line ending."""
    from urllib3.fields import RequestField
    from urllib3.filepost import choose_boundary, encode_multipart_formdata

    boundary = choose_boundary()
    parts = [RequestField(str(index), data, headers={"Content-Type": DICOM}) for index, data in enumerate(instances)]
    body, _ = encode_multipart_formdata(parts, boundary)  # the type it names is form-data's; these parts are not
    return f'multipart/related; type="{DICOM}"; boundary={boundary}', body


def source_reference(screener, data: bytes, reports):
    """The upload's identifiers its results carry, read from its header in the decoding sandbox (only
    text comes back); 400 without its UIDs or with invalid ones."""
    try:
        return reports.reference_from_header(screener.batch.sandbox.dicom_header(data, reports.SOURCE_KEYWORDS))
    except reports.UnreferableImage as err:
        raise UploadError(400, str(err)) from None


def dicom_results(screener, form: str) -> Response:
    """The answer to result=dicom-sr or result=dicom. The header and the pixels are read in the decoding
    sandbox, before the model slot is taken."""
    reports = report_builders()
    data = read_upload(request)
    if not is_dicom(data):
        raise UploadError(
            415, "DICOM results need a DICOM upload: a JPEG, PNG, BMP or TIFF has no study to attach them to."
        )
    source = source_reference(screener, data, reports)
    prepared = screener.prepare(data, reports.GRADCAM_SIDE if form == "dicom" else None)
    with model_slot():
        row = screener.screened_row(prepared)
    identity, series = reports.ModelIdentity.of(screener.classifier), reports.RunSeries.new()
    try:
        if form == "dicom-sr":
            return Response(reports.part10(reports.structured_report(identity, source, row, series)), mimetype=DICOM)
        sr, capture = reports.result_objects(identity, source, row, series, screener.overlay_alpha)
    except ValueError as err:  # highdicom refusing a value of the upload's header; its message may quote it
        raise UploadError(
            400, f"The DICOM results could not be built from this upload's header ({type(err).__name__})."
        ) from None
    content_type, body = related_body([reports.part10(capture), reports.part10(sr)])
    return Response(body, content_type=content_type)
