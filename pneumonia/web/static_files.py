"""Static files (the page's style and scripts under /static/, the in-browser screener's under /device/):
cached by clients, and kept from starving the screening.

Caching: `url_for("static", ...)` adds `?v=` and the file's content hash, and an answer to a URL that
carries the current hash is `Cache-Control: public, max-age=31536000, immutable`: a browser fetches each
version once. Any other URL (an old hash, none, the /device/ files the page loads by relative paths) is
answered with an ETag that the client revalidates (`no-cache`; /device/ keeps its hour): 304 without a
body when nothing changed.

Bounding: a client that ignores caching can still pull the 14.8 MB WebAssembly file in a loop (16 clients
pulled ~12 GB in 20 s from /static/vendor/ and slowed uploads to 1.8 s: issue 39). The vendored files
are served under /device/ only, which needs the access key when keys are set and counts against the
per-client page limit when rate limits are on (pneumonia/web/rate_limit.py); /static/vendor/ is a 404.
At most STATIC_TRANSFERS bodies of LARGE_STATIC_BYTES or more are sent at once per worker (the slot is
held until the body has gone out); one more is answered 503 with Retry-After at once. On a public site,
a CDN or the proxy in front should serve and cache them: docs/deploy.md.
"""

from __future__ import annotations

import hashlib
import threading
from functools import lru_cache
from pathlib import Path

from flask import abort, current_app, request

from pneumonia.web.error_responses import error_response
from pneumonia.web.settings import settings

IMMUTABLE = "public, max-age=31536000, immutable"
LARGE_STATIC_BYTES = 1024 * 1024
STATIC_ENDPOINTS = {"static", "device.page", "device.site_file"}


@lru_cache(maxsize=256)
def content_hash(path: Path, size: int, mtime_ns: int) -> str:
    """The first 16 hex digits of the file's sha256 (cached per size and modification time)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def static_hash(filename: str) -> str | None:
    """The content hash of the static file `filename`, None when there is no such file."""
    folder = Path(current_app.static_folder).resolve()
    path = (folder / filename).resolve()
    if folder not in path.parents or not path.is_file():
        return None
    stat = path.stat()
    return content_hash(path, stat.st_size, stat.st_mtime_ns)


def _hashed_urls(endpoint: str, values: dict) -> None:
    if endpoint == "static" and "v" not in values and (digest := static_hash(values.get("filename", ""))):
        values["v"] = digest


class TransferSlots:
    """At most `slots` large static bodies on their way out at once."""

    def __init__(self, slots: int):
        self._free = threading.BoundedSemaphore(max(1, slots))

    def bound(self, response):
        """The response, holding a slot until its body has been sent; a 503 when none is free."""
        if not self._free.acquire(blocking=False):
            response.close()
            body, status = error_response(503, "Too many large files are being downloaded. Please try again.")
            return current_app.make_response((body, status, {"Retry-After": "1"}))
        _on_body_closed(response, self._free.release)
        return response


def _on_body_closed(response, callback) -> None:
    """Call `callback` once when the server closes the response's body. A file sent by `send_file` goes out
    as the body object itself (direct passthrough, which lets gunicorn use sendfile), so the response's own
    `call_on_close` is never run: the body's close is extended instead."""
    body = response.response
    closed = threading.Event()

    def close() -> None:
        try:
            if original is not None:
                original()
        finally:
            if not closed.is_set():
                closed.set()
                callback()

    original = getattr(body, "close", None)
    try:
        body.close = close
    except AttributeError:  # a body that takes no attribute (a list): the response's own hook runs for it
        response.call_on_close(close)


def register(app) -> None:
    """Content-hashed static URLs, their cache headers, and STATIC_TRANSFERS."""
    slots = TransferSlots(settings(app).static_transfers)
    app.url_defaults(_hashed_urls)

    @app.before_request
    def vendor_files_only_under_device():
        # onnxruntime-web is for the in-browser screener, which loads it from /device/static/vendor/ (keyed,
        # counted by the rate limits); Flask's /static/ is open and never limited.
        if request.endpoint == "static" and (request.view_args or {}).get("filename", "").startswith("vendor/"):
            abort(404)

    @app.after_request
    def static_caching_and_bound(response):
        if request.endpoint not in STATIC_ENDPOINTS:
            return response
        if request.endpoint == "static":
            current = static_hash(request.view_args.get("filename", "")) if request.view_args else None
            fresh = current is not None and request.args.get("v") == current
            response.headers["Cache-Control"] = IMMUTABLE if fresh else "no-cache"
        if response.status_code == 200 and (response.content_length or 0) >= LARGE_STATIC_BYTES:
            return slots.bound(response)
        return response
