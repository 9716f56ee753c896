"""The Flask app: upload page, result page, JSON API, model card and health check.

`create_app` loads the model once (per gunicorn worker, since `app.py` calls it at import);
a model that cannot be loaded is logged at start-up and reported by /healthz and every
page, and the app still starts so the reason can be read.
"""

from __future__ import annotations

import logging
import warnings

from flask import Flask

from pneumonia.serving.classifier import SHIPPED_MODEL_DIR
from pneumonia.serving.decoding_child import DEFAULT_LIMITS
from pneumonia.web.uploads import BodyDeadline, InMemoryRequest

DEFAULTS = {
    "MODEL_PATH": str(SHIPPED_MODEL_DIR),
    "RUNTIME": None,  # "onnx" or "keras"; None: onnx when the model's export is current (pneumonia/serving/runtime.py)
    "MAX_CONTENT_LENGTH": 20 * 1024 * 1024,  # 413 above this
    "MAX_FORM_PARTS": 16,  # the forms' fields besides the files (a batch adds BATCH_MAX_FILES parts)
    # Several files in one request (pneumonia/web/batch.py): at most this many, screened this many at a time
    # (a chunk's model work is the longest a single upload waits behind it: docs/benchmarks.md).
    "BATCH_MAX_FILES": 100,
    "BATCH_CHUNK_SIZE": 8,
    "BATCH_MAX_PIXELS": 1_000_000_000,  # declared by the files' headers in all (pneumonia/web/batch.py); else 413
    "OVERLAY_ALPHA": 0.5,
    "PAGE_IMAGE_MAX_SIDE": 1024,  # JPEGs in the result page
    "API_IMAGE_MAX_SIDE": 512,  # the overlay in the JSON answer (JPEG, or PNG on request: its cost grows with area)
    # Slow clients (pneumonia/web/uploads.py): 408 when a body takes longer than this in all, or pauses this long.
    "BODY_TIMEOUT": 30,  # seconds; a PaaS router (Heroku's) gives up on a request after 30 s anyway
    "BODY_READ_TIMEOUT": 10,  # seconds without a byte of the body
    # Model capacity (pneumonia/web/capacity.py): screenings at once per worker, and the longest expected
    # wait for one before an upload is answered 503 with Retry-After. On ONNX Runtime with 2 threads
    # a call (pneumonia/serving/runtime.py), 2 slots keep both cores busy while one screening decodes or
    # encodes; slots x threads measured on 2 cores: docs/benchmarks.md.
    "MODEL_SLOTS": 2,
    "MODEL_QUEUE_SECONDS": 5,
    # The decoding sandbox (pneumonia/web/decoders.py, pneumonia/serving/sandbox.py): child processes that
    # decode uploads, what one decode may take in them, and how long an upload waits for a free one (else 503).
    # 128 MiB holds the largest image the header checks admit (48 MiB decoded: docs/uploads.md).
    "DECODERS": 2,
    "DECODE_MEMORY_MIB": DEFAULT_LIMITS.memory_mib,
    "DECODE_SECONDS": DEFAULT_LIMITS.seconds,
    "DECODE_QUEUE_SECONDS": 5,
    # Per-client rate limits (pneumonia/web/rate_limit.py), Flask-Limiter's notation, counted per worker in memory:
    # uploads are every POST (form and API), pages every GET; /healthz and static files never count.
    # Off by default: the client's address is only right when the app knows the proxies in front of it
    # (behind a PaaS router every client shares the router's address, so a limit on by default would
    # throttle the whole site as one client); the model's capacity (503) already bounds the load. On a
    # PaaS: PNEUMONIA_RATE_LIMIT_ENABLED=true PNEUMONIA_RATE_LIMIT_PROXY_HOPS=1.
    "RATE_LIMIT_ENABLED": False,
    "RATE_LIMIT_UPLOADS": "30 per minute",  # a person uploading one X-ray at a time stays far below
    "RATE_LIMIT_PAGES": "300 per minute",  # a model card view is 6 requests (the page and its plots)
    "RATE_LIMIT_PROXY_HOPS": 0,  # trusted proxies that append to X-Forwarded-For (1 behind Heroku's router)
    # Access keys (pneumonia/web/access.py): unset, the app is open. ACCESS_KEYS: comma-separated (a PaaS
    # config var); ACCESS_KEYS_FILE: one key a line (a mounted secret); both may be set, every key is valid.
    "ACCESS_KEYS": None,
    "ACCESS_KEYS_FILE": None,
    "ACCESS_FAILURES_LIMIT": "10 per minute",  # wrong keys per client address, then 429 (whatever it sends)
    # Static files (pneumonia/web/static_files.py): bodies of 1 MB or more sent at once per worker, else 503.
    "STATIC_TRANSFERS": 4,
    # The drift monitor (pneumonia/web/monitoring.py): this worker's last MONITOR_WINDOW screenings, numbers only,
    # tested against the card's reference once there are MONITOR_MIN_IMAGES (docs/monitoring.md).
    "MONITOR_WINDOW": 500,
    "MONITOR_MIN_IMAGES": 100,
}


def create_app(config: dict | None = None) -> Flask:
    """Settings: DEFAULTS, then PNEUMONIA_* environment variables (PNEUMONIA_MODEL_PATH,
    PNEUMONIA_MAX_CONTENT_LENGTH, PNEUMONIA_BODY_TIMEOUT, PNEUMONIA_MODEL_SLOTS, PNEUMONIA_RATE_LIMIT_ENABLED,
    ...), then `config`."""
    app = Flask(__name__)  # pneumonia/web/templates and pneumonia/web/static, wherever the package is installed
    app.request_class = InMemoryRequest
    app.config.update(DEFAULTS)
    app.config.from_prefixed_env("PNEUMONIA")
    app.config.update(config or {})
    app.logger.setLevel(logging.INFO)
    _keep_dicom_tags_out_of_logs()

    from pneumonia.web import (
        access,
        api,
        capacity,
        decoders,
        device,
        error_responses,
        monitoring,
        pages,
        rate_limit,
        security,
        static_files,
        telemetry,
    )
    from pneumonia.web.screener import load_screener

    decoders.register(app)
    load_screener(app)
    capacity.register(app)
    telemetry.register(app)  # /metrics; before the limits and the keys, so that their refusals are counted too
    monitoring.register(app)  # the drift monitor, fed by the screening pipeline
    rate_limit.register(app)
    access.register(app)  # after the limits: a flood of wrong keys is counted by them too
    app.wsgi_app = BodyDeadline(app.wsgi_app, app.config["BODY_TIMEOUT"], app.config["BODY_READ_TIMEOUT"])
    app.register_blueprint(pages.bp)
    app.register_blueprint(api.bp)
    app.register_blueprint(device.bp)
    error_responses.register(app)
    static_files.register(app)
    security.register(app)
    return app


def _keep_dicom_tags_out_of_logs() -> None:
    """pydicom's log records and warnings can quote element values (patient name, ID); so could
    highdicom's, which builds the DICOM results (pneumonia/web/dicom_results.py) from the upload's header."""
    for library in ("pydicom", "highdicom"):
        logging.getLogger(library).propagate = False
    for module in ("pydicom", "highdicom", "pneumonia.reading.dicom"):
        warnings.filterwarnings("ignore", module=module)
    # Pillow's warnings on damaged uploads ("Truncated File Read", ...) name its files in site-packages
    # and say nothing the 400 does not; the decompression-bomb check turns its own into errors first.
    warnings.filterwarnings("ignore", module="PIL")
