"""The HTML pages: upload form, result, model card (and its evaluation plots)."""

from __future__ import annotations

import base64
import time

from flask import Blueprint, abort, current_app, render_template, request, send_from_directory

from pneumonia.reading.decoding import ACCEPTED_TYPES
from pneumonia.serving.outcomes import Outcome
from pneumonia.web.batch import THUMBNAIL_SIDE, Rendering, entries_csv, max_files, read_uploads, screen_uploads
from pneumonia.web.capacity import model_slot
from pneumonia.web.monitoring import monitor_json
from pneumonia.web.screener import current_screener
from pneumonia.web.settings import current_settings
from pneumonia.web.uploads import read_upload

bp = Blueprint("pages", __name__)

# The plots `python -m pneumonia train` writes to DIR/report/, in the order shown.
REPORT_PLOTS = {
    "roc_curve.png": "ROC curve",
    "pr_curve.png": "Precision-recall curve",
    "confusion_matrix_default.png": "Confusion matrix at the default threshold",
    "confusion_matrix_screening.png": "Confusion matrix at the screening threshold",
    "training_curves.png": "Training curves",
}


def data_uri(encoded: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(encoded).decode('ascii')}"


@bp.get("/")
def index():
    return render_template(
        "index.html",
        model_error=current_app.extensions["model_error"],
        accepted=ACCEPTED_TYPES,
        max_mb=current_app.config["MAX_CONTENT_LENGTH"] / (1024 * 1024),
        max_files=max_files(),
    )


@bp.post("/predict")
def predict():
    started = time.perf_counter()
    screener = current_screener()
    if len(uploads := read_uploads(request)) > 1:
        return _batch_result(screener, uploads, started)
    prepared = screener.prepare(read_upload(request), current_settings().page_image_max_side)
    with model_slot():  # 503 with Retry-After when too many uploads wait for the model
        result = screener.screen(prepared, ".jpg", with_original=True)
    result.timing_ms["total"] = round((time.perf_counter() - started) * 1000, 1)
    return render_template(
        "result.html",
        result=result,
        card=screener.card,
        gradcam=screener.gradcam,
        original_uri=data_uri(result.original, "image/jpeg"),
        overlay_uri=data_uri(result.overlay, "image/jpeg"),
    )


def _batch_result(screener, uploads: list, started: float):
    """The results table: a row per file, its Grad-CAM in a <details> (shown on demand, no script
    needed), and the table as a CSV data: URI built into this response (nothing is stored)."""
    entries = screen_uploads(screener, uploads, Rendering(".jpg", thumbnail_side=THUMBNAIL_SIDE))
    rows = [
        {
            "entry": entry,
            "row": entry.row,
            "thumbnail_uri": data_uri(entry.thumbnail, "image/jpeg") if entry.thumbnail else None,
            "overlay_uri": data_uri(entry.overlay, "image/jpeg") if entry.overlay else None,
        }
        for entry in entries
    ]
    csv_uri = data_uri(entries_csv(entries, screener).encode("utf-8"), "text/csv;charset=utf-8")
    return render_template(
        "batch_result.html",
        rows=rows,
        card=screener.card,
        csv_uri=csv_uri,
        gated=screener.classifier.gate is not None,
        screened=sum(entry.row.outcome == Outcome.SCREENED for entry in entries),
        elapsed_ms=(time.perf_counter() - started) * 1000,
    )


@bp.get("/model")
def model_card():
    screener = current_app.extensions["screener"]
    if screener is None:
        return render_template("model.html", card=None, model_error=current_app.extensions["model_error"]), 503
    plots = {name: title for name, title in REPORT_PLOTS.items() if (screener.report_dir / name).is_file()}
    gate = screener.classifier.gate
    return render_template(
        "model.html",
        card=screener.card,
        gradcam=screener.gradcam,
        plots=plots,
        ood=gate.summary() if gate else None,
        gate_status=screener.classifier.gate_status,
        serving=screener.classifier.serving(),
        monitor=monitor_json(),
    )


@bp.get("/model/report/<name>")
def report_plot(name: str):
    if name not in REPORT_PLOTS:
        abort(404)
    return send_from_directory(current_screener().report_dir, name, max_age=3600)
