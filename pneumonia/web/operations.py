"""The JSON API's operations as the OpenAPI document describes them (pneumonia/web/openapi.py): what each
takes (pneumonia/web/schemas.py), every status it answers with its body, headers and examples. The views of
pneumonia/web/api.py carry them (`@documented`)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from pneumonia.web.openapi import Answer, Body, Header, Operation
from pneumonia.web.schemas import (
    NOTICE,
    BatchEntry,
    BatchQuery,
    BatchUpload,
    DicomReport,
    DicomResults,
    Document,
    Error,
    Health,
    Monitor,
    NotReady,
    Prediction,
    PredictQuery,
    Refused,
    Upload,
)

RETRY_AFTER = Annotated[int, Field(ge=1)]
THRESHOLDS = {"default": 0.888, "screening": 0.645}
OK_VERDICT = {"verdict": "ok", "score": 21.53, "thresholds": {"unusual": 40.88, "rejected": 47.44}}
COLOUR_VERDICT = {"verdict": "rejected", "reason": "colour", "score": 190.0, "threshold": 16.0}
COLOUR_REFUSAL = (
    "Not screened: The image is in colour; a chest radiograph is greyscale. Expected a frontal chest radiograph "
    "(X-ray), as a greyscale image."
)


def errors(*messages: tuple[str, int, str]) -> dict[str, Body]:
    """The JSON body of a failure, with an example (name, status, message) of each of its messages."""
    return {
        "application/json": Body(Error, {name: {"error": text, "status": status} for name, status, text in messages})
    }


BAD_REQUEST = Answer(
    "No file, an empty file, or a file that does not decode as an X-ray (corrupt, too large in pixels, unsupported "
    "DICOM); a `gradcam` other than 1, true, yes, 0, false or no; for /api/predict also an `overlay` other than png "
    "or jpeg, a `result` other than json, dicom-sr or dicom, and, for DICOM results, a DICOM file without the "
    "Study, Series or SOP Instance UID (or SOP Class, Modality) they must reference.",
    errors(
        ("no_file", 400, 'No file was uploaded: choose a chest X-ray image (form field "file").'),
        ("corrupt", 400, "the upload could not be read as an image: Truncated File Read"),
        ("flag", 400, "gradcam=maybe: choose one of 1, true, yes, 0, false, no."),
    ),
    name="BadRequest",
)
UNAUTHORIZED = Answer(
    "No access key, or one that is not valid here (only when the server has access keys; see info.x-limits.access).",
    errors(
        ("missing", 401, "This screening service needs an access key: ask whoever runs it for one."),
        ("wrong", 401, "That access key is not valid here."),
    ),
    {
        "WWW-Authenticate": Header(
            '`Bearer realm="pneumonia screening"`: send `Authorization: Bearer KEY`.',
            Annotated[str, Field(pattern="^Bearer ")],
            required=True,
        )
    },
    name="Unauthorized",
)
TIMEOUT = Answer(
    "The request body did not arrive within PNEUMONIA_BODY_TIMEOUT seconds (default 30), or paused for "
    "PNEUMONIA_BODY_READ_TIMEOUT seconds (default 10). The connection is closed.",
    errors(
        (
            "stalled",
            408,
            "The upload took too long: nothing more of the upload arrived for 10 s. Check the connection and try "
            "again.",
        )
    ),
    name="Timeout",
)
TOO_LARGE = Answer(
    "The body is over PNEUMONIA_MAX_CONTENT_LENGTH (default 20 MB), or has too many form parts "
    "(PNEUMONIA_MAX_FORM_PARTS, 16 besides the files), or (batch) more than PNEUMONIA_BATCH_MAX_FILES files, or "
    "(batch) files whose headers declare more than PNEUMONIA_BATCH_MAX_PIXELS (default 1,000,000,000) pixels in "
    "all. When the body was not read the answer says `Connection: close`.",
    errors(("size", 413, "The upload is too large: the limit is 20 MB.")),
    name="TooLarge",
)
UNSUPPORTED_TYPE = Answer(
    "The file is not JPEG, PNG, BMP, TIFF or DICOM (judged by its bytes, not its name); no decoder saw it. For "
    "/api/predict with `result=dicom-sr` or `result=dicom` also any file that is not DICOM: it has no study for the "
    "results to belong to.",
    errors(
        ("type", 415, "The upload is not a supported image type. Upload a JPEG, PNG, BMP, TIFF or DICOM file."),
        (
            "not_dicom",
            415,
            "DICOM results need a DICOM upload: a JPEG, PNG, BMP or TIFF has no study to attach them to.",
        ),
    ),
    name="UnsupportedType",
)
REFUSED = Answer(
    "Not a chest X-ray, says the out-of-distribution gate: no probability, no heatmap.",
    {"application/json": Body(Refused, {"colour": {"error": COLOUR_REFUSAL, "status": 422, "ood": COLOUR_VERDICT}})},
    name="Refused",
)
TOO_MANY = Answer(
    "This client sent more requests than the per-client rate limit allows (only when PNEUMONIA_RATE_LIMIT_ENABLED; "
    "see info.x-limits.rate_limit), or more wrong access keys than PNEUMONIA_ACCESS_FAILURES_LIMIT (see "
    "info.x-limits.access). Counted per worker process, in memory.",
    errors(("limited", 429, "Too many requests from this address: at most 30 per 1 minute. Please try again in 12 s.")),
    {"Retry-After": Header("Seconds to wait before sending the request again.", RETRY_AFTER, required=True)},
    name="TooMany",
)
UNEXPECTED = Answer(
    "An unexpected failure (a bug): logged with its stack, never with the upload. Nothing was stored.",
    errors(("unexpected", 500, "Something went wrong on our side. Nothing was stored; please try again.")),
    name="Unexpected",
)
DICOM_UNAVAILABLE = Answer(
    "`result=dicom-sr` or `result=dicom` on a server installed without the pacs extra (highdicom): the JSON answer "
    "still works.",
    errors(
        (
            "no_highdicom",
            501,
            "DICOM results need highdicom, which this server does not have: its operator can pip install .[pacs] "
            "(or pip install -r requirements-pacs.txt).",
        )
    ),
    name="DicomUnavailable",
)
UNAVAILABLE = Answer(
    "The model is not loaded (no Retry-After), or the model is busy: more uploads wait than it can serve within "
    "PNEUMONIA_MODEL_QUEUE_SECONDS (default 5), answered at once with Retry-After.",
    errors(
        ("busy", 503, "The screening service is busy: too many X-rays are waiting. Please try again in 2 s."),
        ("not_loaded", 503, "The model is not loaded, so nothing can be screened: no model at /srv/model"),
    ),
    {"Retry-After": Header("Present when busy: seconds until the line of waiting uploads drains.", RETRY_AFTER)},
    name="Unavailable",
)
# What either upload operation may answer besides its own (the document lists every operation's by status)
UPLOAD_FAILURES = {
    400: BAD_REQUEST,
    401: UNAUTHORIZED,
    408: TIMEOUT,
    413: TOO_LARGE,
    429: TOO_MANY,
    500: UNEXPECTED,
    503: UNAVAILABLE,
}


PREDICT = Operation(
    "predict",
    "Screen one chest X-ray",
    "One X-ray in the multipart field `file` -> the calibrated probability of pneumonia, the label at each "
    "threshold, the out-of-distribution gate's verdict and, unless `gradcam=0`, the Grad-CAM overlay. With "
    "`result=dicom-sr` or `result=dicom` a DICOM upload gets its results as DICOM objects instead, the ones `pacs "
    "screen` stores in a PACS: a TID 1500 Structured Report, and with `dicom` also the Grad-CAM overlay as a "
    "Secondary Capture, both in the upload's study (new series) and referencing the uploaded image. Uploads are "
    "kept in memory and never stored or logged.",
    {
        200: Answer(
            "Screened: JSON, or with `result=dicom-sr` / `result=dicom` the DICOM objects.",
            {
                "application/json": Body(
                    Prediction,
                    {
                        "normal": {
                            "probability": 0.006058,
                            "probability_text": "< 1 %",
                            "label": "NORMAL",
                            "screening_label": "NORMAL",
                            "thresholds": THRESHOLDS,
                            "model": {
                                "name": "densenet121",
                                "architecture": "densenet121",
                                "input_size": 128,
                                "validation_auc": 0.9966,
                            },
                            "gradcam": {
                                "layer": "pool4_relu",
                                "map_size": [8, 8],
                                "target": "NORMAL",
                                "localised": True,
                            },
                            "ood": OK_VERDICT,
                            "gradcam_jpeg": "/9j/4AAQSkZJRgABAQAAAQABAAD...",
                            "timing_ms": {
                                "decode": 13.5,
                                "preprocess": 0.3,
                                "model_gradcam": 72.2,
                                "overlay_encode": 3.4,
                                "total": 90.7,
                            },
                            "notice": NOTICE,
                        }
                    },
                ),
                "application/dicom": Body(DicomReport),
                "multipart/related": Body(DicomResults),
            },
        ),
        **UPLOAD_FAILURES,
        415: UNSUPPORTED_TYPE,
        422: REFUSED,
        501: DICOM_UNAVAILABLE,
    },
    query=PredictQuery,
    upload=Upload,
)

BATCH_EXAMPLE = [
    {"index": 0, "filename": "a.jpeg", "status": 200, "probability": 0.006058, "probability_text": "< 1 %"}
    | {"label": "NORMAL", "screening_label": "NORMAL", "thresholds": THRESHOLDS, "ood": OK_VERDICT, "notice": NOTICE},
    {"index": 1, "filename": "b.png", "status": 422, "probability": None, "ood": COLOUR_VERDICT}
    | {"error": COLOUR_REFUSAL, "notice": NOTICE},
    {"index": 2, "filename": "c.txt", "status": 415, "probability": None}
    | {"error": "The upload is not a supported image type. Upload a JPEG, PNG, BMP, TIFF or DICOM file."}
    | {"notice": NOTICE},
    {"index": 3, "filename": "d.jpeg", "status": 400, "probability": None}
    | {
        "error": "The image is corrupt or truncated (image file is truncated (7 bytes not processed)).",
        "notice": NOTICE,
    },
]

PREDICT_BATCH = Operation(
    "predictBatch",
    "Screen several chest X-rays in one request",
    "Several multipart parts named `file` -> a JSON list, one entry per file in upload order, each with its own "
    "`status` (see BatchEntry): one bad file never fails the others, and the request answers 200 unless it is "
    "refused whole. Files are screened in chunks of PNEUMONIA_BATCH_CHUNK_SIZE (default 8); when a later chunk "
    "finds the model busy, the files not yet screened are entries with status 503.",
    {
        200: Answer(
            "One entry per file, in upload order.",
            {"application/json": Body(list[BatchEntry], {"mixed": BATCH_EXAMPLE})},
        ),
        **UPLOAD_FAILURES,
    },
    query=BatchQuery,
    upload=BatchUpload,
)

HEALTH = Operation(
    "health",
    "Readiness: is the model loaded",
    "Never rate limited. A load balancer's health check: 200 once the model is loaded and warmed up.",
    {
        200: Answer(
            "Ready.",
            {
                "application/json": Body(
                    Health,
                    {
                        "ready": {
                            "status": "ready",
                            "ready": True,
                            "model": "densenet121",
                            "gradcam_layer": "pool4_relu",
                            "gradcam_map_size": [8, 8],
                            "ood_gate": "on",
                            "serving": {
                                "runtime": "onnx",
                                "keras_sha256": "9be05d37...",
                                "export_sha256": {
                                    "forward": "93c40646...",
                                    "explain": "f134e67c...",
                                    "weights": "db98011b...",
                                },
                                "note": None,
                            },
                        }
                    },
                )
            },
        ),
        503: Answer(
            "The model did not load at start-up; `reason` says why.",
            {
                "application/json": Body(
                    NotReady, {"missing": {"status": "not ready", "ready": False, "reason": "no model at /srv/model"}}
                )
            },
        ),
    },
    open=True,
)

OPENAPI = Operation(
    "openapi",
    "This document",
    "The OpenAPI document, with `info.x-limits` set to the limits this server enforces.",
    {
        200: Answer("The OpenAPI 3.1 document.", {"application/json": Body(Document)}),
        401: UNAUTHORIZED,
        429: TOO_MANY,
    },
)

MONITOR_EXAMPLE = {
    "alarm": True,
    "images": 500,
    "window": 500,
    "min_images": 100,
    "false_alarm_rate": 0.01,
    "reference": {"computed_on": "validation part of train/ (patient-grouped), 524 images", "images": 524},
    "signals": [
        {
            "name": "uncertain_share",
            "quantity": "probability",
            "sided": "both",
            "value": 0.182,
            "count": 91,
            "of": 500,
            "expected": [0.034, 0.106],
            "reference": 0.0651,
            "alarm": True,
        },
        {
            "name": "unusual_share",
            "quantity": "gate_score",
            "sided": "above",
            "value": 0.024,
            "count": 12,
            "of": 500,
            "expected": [0.0, 0.058],
            "reference": 0.0267,
            "alarm": False,
        },
    ],
    "advice": "This site's X-rays differ from the validation set the thresholds were chosen on: 18.2 % of "
    "probabilities between 10 % and 90 % against between 3.4 % and 10.6 % expected. The thresholds may not hold "
    "here: check them with `pneumonia calibrate` on about 200 labelled X-rays from this site.",
    "scope": "this worker process's last screenings, in memory (numbers only): a restart empties the window, and "
    "each gunicorn worker keeps its own",
}

MONITOR = Operation(
    "monitor",
    "Drift: do recent screenings still look like the reference",
    "The drift monitor (docs/monitoring.md): the share of this worker's last PNEUMONIA_MONITOR_WINDOW screenings "
    "(default 500) in each signal's band (the gate's unusual share, gate scores above the reference median, "
    "probabilities between 10 % and 90 %, above each threshold), each against the range a window of that size "
    "shows without drift; `alarm` when any is outside, at most `false_alarm_rate` (1 %) of windows alarming "
    "without drift. Under `min_images` (default 100) it never alarms; a model card without reference statistics "
    "answers `signals: []` and says how to compute them; without a model, `signals: []` too. Numbers only, in "
    "memory: a restart empties the window.",
    {
        200: Answer("The monitor's answer.", {"application/json": Body(Monitor, {"drift": MONITOR_EXAMPLE})}),
        401: UNAUTHORIZED,
        429: TOO_MANY,
    },
)
