"""JSON: POST /api/predict, POST /api/predict/batch, GET /healthz and GET /openapi.json, the document
of all four, generated from the operation each view carries (pneumonia/web/operations.py: status codes,
bodies, parameters). POST /api/predict answers DICOM instead when asked (`?result=`, pneumonia/web/dicom_results.py)."""

from __future__ import annotations

import base64
import time

from flask import Blueprint, current_app, jsonify, request

from pneumonia.serving.result_formats import screening_json
from pneumonia.web.batch import Rendering, entry_json, read_uploads, screen_uploads
from pneumonia.web.capacity import model_slot
from pneumonia.web.dicom_results import dicom_results
from pneumonia.web.monitoring import monitor_json
from pneumonia.web.openapi import document, documented
from pneumonia.web.operations import HEALTH, MONITOR, OPENAPI, PREDICT, PREDICT_BATCH
from pneumonia.web.queries import parsed_query
from pneumonia.web.schemas import NOTICE, BatchEntry, BatchQuery, Prediction, PredictQuery, built
from pneumonia.web.screener import current_screener
from pneumonia.web.settings import current_settings
from pneumonia.web.uploads import UploadError, read_upload

bp = Blueprint("api", __name__)


@bp.post("/api/predict")
@documented(PREDICT)
def predict():
    """multipart field `file`; `?gradcam=0` skips rendering the overlay, `?overlay=png` encodes it as PNG;
    `?result=dicom-sr` or `?result=dicom` answers DICOM objects instead (pneumonia/web/dicom_results.py)."""
    started = time.perf_counter()
    screener = current_screener()
    query = parsed_query(PredictQuery)
    if query.result_form != "json":
        return dicom_results(screener, query.result_form)
    name, extension = query.overlay_format
    data = read_upload(request)
    with_gradcam = query.with_gradcam
    prepared = screener.prepare(data, current_settings().api_image_max_side if with_gradcam else None)
    with model_slot():  # 503 with Retry-After when too many uploads wait for the model
        result = screener.screen(prepared, extension if with_gradcam else None)
    result.timing_ms["total"] = round((time.perf_counter() - started) * 1000, 1)
    card = screener.card
    return built(
        Prediction,
        **screening_json(result.screening, screener.classifier),
        model={
            "name": screener.classifier.name,
            "architecture": card.architecture,
            "input_size": screener.classifier.image_size,
            "validation_auc": card.validation.auc,
        },
        gradcam={
            "layer": screener.gradcam.layer,
            "map_size": list(screener.gradcam.map_size),
            "target": result.gradcam_target,
            "localised": result.localised,
        },
        **{f"gradcam_{name}": base64.b64encode(result.overlay).decode("ascii") if result.overlay else None},
        timing_ms=result.timing_ms,
        notice=NOTICE,
    )


@bp.post("/api/predict/batch")
@documented(PREDICT_BATCH)
def predict_batch():
    """Several multipart fields `file` -> a JSON list, one entry per file in upload order, each with
    its own status and error (pneumonia/web/batch.py has the limits); `?gradcam=1` adds each overlay as PNG."""
    screener = current_screener()
    uploads = read_uploads(request)
    if not uploads:
        raise UploadError(400, 'No file was uploaded: send one or more chest X-ray images as form fields "file".')
    with_gradcam = parsed_query(BatchQuery).with_gradcam
    rendering = Rendering(".png", current_settings().api_image_max_side) if with_gradcam else None
    entries = screen_uploads(screener, uploads, rendering)
    return jsonify([built(BatchEntry, **entry_json(entry, screener, with_gradcam), notice=NOTICE) for entry in entries])


@bp.get("/healthz")
@documented(HEALTH)
def healthz():
    screener = current_app.extensions["screener"]
    if screener is None:
        return jsonify(status="not ready", ready=False, reason=current_app.extensions["model_error"]), 503
    return jsonify(
        status="ready",
        ready=True,
        model=screener.classifier.name,
        gradcam_layer=screener.gradcam.layer,
        gradcam_map_size=list(screener.gradcam.map_size),
        ood_gate="on" if screener.classifier.gate else f"off: {screener.classifier.gate_status}",
        serving=screener.classifier.serving(),
    )


@bp.get("/openapi.json")
@documented(OPENAPI)
def openapi_json():
    return jsonify(document(current_settings(), bp))


@bp.get("/api/monitor")
@documented(MONITOR)
def monitor():
    """The drift monitor's answer (pneumonia/web/monitoring.py)."""
    return jsonify(monitor_json())
