"""The Flask app: upload page, result page, JSON API, model card and health check.

`create_app` loads the model once (per gunicorn worker, since `app.py` calls it at import);
a model that cannot be loaded is logged at start-up and reported by /healthz and every
page, and the app still starts so the reason can be read.
"""

from __future__ import annotations

import logging
import warnings

from flask import Flask

from pneumonia.web.settings import configure
from pneumonia.web.uploads import BodyDeadline, InMemoryRequest


def create_app(config: dict | None = None) -> Flask:
    """Settings (pneumonia/web/settings.py): the defaults, then PNEUMONIA_* environment variables
    (PNEUMONIA_MODEL_PATH, PNEUMONIA_MODEL_SLOTS, ...), then `config` ({"MODEL_SLOTS": 1, "TESTING": True}:
    Flask's own keys go to app.config as given); SettingsError naming the variable when one cannot be used."""
    app = Flask(__name__)  # pneumonia/web/templates and pneumonia/web/static, wherever the package is installed
    app.request_class = InMemoryRequest
    settings = configure(app, config)
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
    app.wsgi_app = BodyDeadline(app.wsgi_app, settings.body_timeout, settings.body_read_timeout)
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
