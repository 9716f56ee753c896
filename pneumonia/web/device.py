"""/device/: "Screen on this device", the in-browser screener (pneumonia/web/device_site.py) served by
the app. The page and what it loads are the files `export-web` writes; here they come with the
headers a static host may not send: cross-origin isolation, which lets ONNX Runtime use WASM threads."""

from __future__ import annotations

import io
import mimetypes
from pathlib import Path

from flask import Blueprint, abort, current_app, send_file

from pneumonia.errors import ModelLoadError
from pneumonia.web.device_site import PAGE, DeviceSite, Overlay, build_site
from pneumonia.web.error_responses import error_response
from pneumonia.web.settings import current_settings

bp = Blueprint("device", __name__)

# SharedArrayBuffer (WASM threads) only in a cross-origin-isolated page; every file is same-origin.
ISOLATION = {"Cross-Origin-Opener-Policy": "same-origin", "Cross-Origin-Embedder-Policy": "require-corp"}
# A module script and streaming WebAssembly compilation need these types; Python's table may lack .mjs.
TYPES = {".mjs": "text/javascript", ".wasm": "application/wasm", ".onnx": "application/octet-stream"}
# The page's own modules import one another by relative URLs that carry no version: each is revalidated
# (ETag, 304) on every load, so a page never runs modules of two versions; the rest keeps its hour.
MODULES = "static/device/"


def device_site() -> DeviceSite:
    """Built once per worker, on the first request for it (hashing the export takes a moment), showing the
    heatmap as the app's result page does."""
    if "device_site" not in current_app.extensions:
        settings = current_settings()
        overlay = Overlay(settings.overlay_alpha, settings.page_image_max_side)
        current_app.extensions["device_site"] = build_site(settings.model_path, server_url="../", overlay=overlay)
    return current_app.extensions["device_site"]


@bp.get("/device/")
def page():
    return _send(PAGE)


@bp.get("/device/<path:name>")
def site_file(name: str):
    return _send(name)


def _send(name: str):
    try:
        site = device_site()
    except ModelLoadError as err:
        return error_response(503, str(err))
    source = site.files.get(name)
    if source is None:
        abort(404)
    mimetype = TYPES.get(Path(name).suffix) or mimetypes.guess_type(name)[0] or "application/octet-stream"
    if isinstance(source, Path):
        max_age = 0 if name.startswith(MODULES) else 3600
        response = send_file(source, mimetype=mimetype, conditional=True, max_age=max_age)
    else:
        response = send_file(io.BytesIO(source), mimetype=mimetype, download_name=Path(name).name, max_age=0)
    response.headers.update(ISOLATION)
    return response
