"""Several X-rays in one request: the upload page with several files, and POST /api/predict/batch.

Limits: at most BATCH_MAX_FILES files (default 100) per request, and MAX_CONTENT_LENGTH (20 MB)
for the request body as a whole, which must arrive within the body deadline as a single upload
must (pneumonia/web/uploads.py). Both are settings (PNEUMONIA_BATCH_MAX_FILES, PNEUMONIA_BATCH_CHUNK_SIZE in
the environment). Each file is checked for an accepted type before any decoder sees it, as a
single upload is, and answered on its own: one bad file does not fail the others.

Memory: files are screened in chunks of BATCH_CHUNK_SIZE (default 8) by
`pneumonia.serving.screening`, which decodes one file at a time and keeps only the model's square of
it (and a display copy of at most BATCH_IMAGE_MAX_SIDE px when images are shown, dropped once
encoded). A 100-file request holds its raw uploads (at most MAX_CONTENT_LENGTH) and at most one
decoded full-size image.

Decoding (issues 33, 39): the files' headers are read first, in the decoding sandbox (nothing decoded, and
nothing of a file parsed in the worker), and a request whose files declare more than BATCH_MAX_PIXELS
pixels in all (default 1,000 megapixels, a hundred 10-megapixel X-rays) is a 413. Each file is decoded in
the decoding sandbox (pneumonia/web/decoders.py), bounded by its memory and time limits, with no model
slot held.

Capacity: each chunk takes a model slot (pneumonia/web/capacity.py) for its model work only, once its
files are decoded, and records its time per image, so single uploads waiting in line get the slot
between chunks and the capacity's estimate stays that of one screening. When the first chunk finds the
model or the decoders too busy the request is answered 503 with Retry-After, as a single upload is; when
a later chunk does, the files already screened keep their results and the rest are each answered with
status 503.
"""

from __future__ import annotations

import base64
import itertools
import time
from contextlib import contextmanager
from dataclasses import dataclass

from flask import current_app
from werkzeug.exceptions import RequestEntityTooLarge

from pneumonia.serving.outcomes import Outcome
from pneumonia.serving.result_formats import csv_text, screening_json
from pneumonia.serving.sandbox import DecoderBusy
from pneumonia.serving.screening import ScreenedImage, Screening
from pneumonia.web.answers import http_status
from pneumonia.web.capacity import ModelBusy
from pneumonia.web.settings import current_settings
from pneumonia.web.uploads import UploadError, checked_upload, upload_bytes

BATCH_IMAGE_MAX_SIDE = 512  # the Grad-CAM overlays of the results table
THUMBNAIL_SIDE = 128
MAX_FILENAME_CHARS = 255
BUSY_MESSAGE = "The screening service became too busy before this file's turn: please send it again."


@dataclass
class BatchEntry:
    """One uploaded file's answer, in upload order."""

    index: int
    filename: str
    row: ScreenedImage  # its probability and labels, or its error
    status: int = 200  # 400 unreadable or empty, 415 not an accepted type, 422 refused by the gate, 503 busy
    overlay: bytes | None = None  # encoded Grad-CAM overlay, when asked for and screened
    thumbnail: bytes | None = None  # encoded JPEG, when asked for and decoded


@dataclass
class Rendering:
    """What images a batch answer carries: Grad-CAM overlays in `overlay_format`, thumbnails."""

    overlay_format: str | None  # ".jpg", ".png" or None for no Grad-CAM
    max_side: int = BATCH_IMAGE_MAX_SIDE
    thumbnail_side: int | None = None


def max_files() -> int:
    return current_settings().batch_max_files


def read_uploads(request) -> list:
    """The chosen file parts of the multipart field `file` (none, one or several), in order.

    A browser sends one empty, nameless part when no file was chosen; such parts are dropped.
    More than BATCH_MAX_FILES files is a 413 that says so."""
    limit = max_files()
    request.max_form_parts = limit + current_settings().max_form_parts  # before the body is parsed
    try:
        parts = request.files.getlist("file")
    except RequestEntityTooLarge:
        size_limit = request.max_content_length
        if size_limit is not None and (request.content_length is None or request.content_length > size_limit):
            raise  # (possibly) the body's size: the 413 page or JSON that names the size limit
        raise UploadError(413, f"Too many files: at most {limit} can be screened at once.") from None
    chosen = [part for part in parts if part.filename or upload_bytes(part)]
    if len(chosen) > limit:
        raise UploadError(413, f"Too many files: {len(chosen)} were sent, at most {limit} can be screened at once.")
    return chosen


def _checked(index: int, upload) -> tuple[BatchEntry, bytes | None]:
    """The entry, and the bytes when they are an accepted image type (else the entry holds the error)."""
    filename = (upload.filename or f"file {index + 1}")[:MAX_FILENAME_CHARS]
    try:
        data = checked_upload(upload)
    except UploadError as err:
        failed = ScreenedImage(filename, Screening.failed(err.message))
        return BatchEntry(index, filename, failed, status=err.status), None
    return BatchEntry(index, filename, ScreenedImage(filename)), data


def _check_declared_pixels(pending: list[tuple[BatchEntry, bytes]]) -> None:
    """413 when the files' headers declare more than BATCH_MAX_PIXELS pixels in all (nothing decoded)."""
    sandbox = current_app.extensions["decoding_sandbox"]
    pixels = [sandbox.declared_pixels(data, entry.filename) for entry, data in pending]
    limit = current_settings().batch_max_pixels
    if sum(pixels) > limit:
        raise UploadError(
            413,
            f"The files hold {sum(pixels) / 1e6:,.0f} megapixels in all, more than the {limit / 1e6:,.0f} a batch "
            "may hold: send them in smaller batches.",
        )


def screen_uploads(screener, uploads: list, rendering: Rendering | None = None) -> list[BatchEntry]:
    """One entry per upload, in order; the accepted ones screened a chunk at a time, each chunk
    under a model slot. Raises ModelBusy (503) when the first chunk finds the model too busy, and
    UploadError (413) when the files declare more than BATCH_MAX_PIXELS pixels in all."""
    entries, pending = [], []
    for index, upload in enumerate(uploads):
        entry, data = _checked(index, upload)
        entries.append(entry)
        if data is not None:
            pending.append((entry, data))
    _check_declared_pixels(pending)
    size = current_settings().batch_chunk_size
    chunks = [pending[start : start + size] for start in range(0, len(pending), size)]
    for number, chunk in enumerate(chunks):
        try:
            _screen_chunk(screener, chunk, rendering)
        except (ModelBusy, DecoderBusy):
            if number == 0:
                raise
            for entry, _ in itertools.chain.from_iterable(chunks[number:]):
                entry.status, entry.row = 503, ScreenedImage(entry.filename, Screening.failed(BUSY_MESSAGE))
            break
    return entries


def _screen_chunk(screener, chunk: list[tuple[BatchEntry, bytes]], rendering: Rendering | None) -> None:
    """Decoded in the sandbox with no slot held, then the model's part holding one."""
    prepared = screener.batch.prepare(
        [(entry.filename, data) for entry, data in chunk], display_side=rendering.max_side if rendering else None
    )
    with _chunk_slot(len(chunk)):
        rows = screener.batch.score(prepared, with_gradcam=bool(rendering and rendering.overlay_format))
    for (entry, _), row in zip(chunk, rows):
        entry.row, entry.status = row, http_status(row.screening)
        if rendering:
            entry.overlay, entry.thumbnail = screener.batch_images(
                row, rendering.overlay_format, rendering.thumbnail_side
            )
        row.display = row.heat = None  # encoded: the arrays need not outlive the chunk


@contextmanager
def _chunk_slot(images: int):
    """A model slot for one chunk; its time is recorded per image, the unit the capacity estimates in."""
    capacity = current_app.extensions["model_capacity"]
    capacity.acquire()
    started = time.perf_counter()
    try:
        yield
    finally:
        capacity.release((time.perf_counter() - started) / images)


def entry_json(entry: BatchEntry, screener, with_gradcam: bool = False) -> dict:
    """An entry of the API's list: what /api/predict answers for the file (without the model and
    timings), with its index, file name and status."""
    row = entry.row
    answer = {"index": entry.index, "filename": entry.filename, "status": entry.status}
    answer.update(screening_json(row.screening, screener.classifier))
    if with_gradcam and row.outcome == Outcome.SCREENED:
        answer["gradcam_png"] = base64.b64encode(entry.overlay).decode("ascii") if entry.overlay else None
    return answer


def entries_csv(entries: list[BatchEntry], screener) -> str:
    """The results table as CSV (the columns of `predict --csv`, the file name first)."""
    classifier = screener.classifier
    return csv_text((entry.row for entry in entries), "file", classifier.thresholds, classifier.gate is not None)
