"""The web app's drift monitor (pneumonia/serving/drift.py) and where it hears of screenings.

`register(app)` gives app.extensions["drift_monitor"]: a window of this worker's last MONITOR_WINDOW
screenings (default 500), numbers only (a calibrated probability and a gate score each: no image, no name,
no time, no client), held in memory, so a restart empties it. It is fed by the one screening pipeline: the
screener's BatchScreener calls `observe` with each chunk's rows (one upload, a batch's chunk, a DICOM
upload's screening), which also counts them for /metrics (pneumonia/web/telemetry.py).

Each gunicorn worker keeps its own window. gunicorn hands requests to whichever worker accepts first, which
has nothing to do with the images, so each worker's window is a random sample of the site's screenings and
its test holds as stated; with W workers a window covers the last ~W x MONITOR_WINDOW screenings of the site
and fills W times slower. /api/monitor and the model page answer from the worker that serves them; /metrics
exports every live worker's signals (a `pid` label) and `pneumonia_drift_alarm` as the highest of them.
"""

from __future__ import annotations

from flask import current_app, has_request_context

from pneumonia.serving.drift import ALPHA, DriftMonitor
from pneumonia.web.settings import current_settings, settings
from pneumonia.web.telemetry import count_rows, set_drift

SCOPE = (
    "this worker process's last screenings, in memory (numbers only): a restart empties the window, and each "
    "gunicorn worker keeps its own"
)
NO_MODEL = "The model is not loaded, so nothing is screened or monitored."


class Observer:
    """What the screening pipeline tells the app of each chunk's rows."""

    def __init__(self, app, monitor: DriftMonitor):
        self.app, self.monitor = app, monitor

    def __call__(self, rows) -> None:
        count_rows(rows)
        for row in rows:
            verdict = row.screening.verdict
            self.monitor.observe(row.screening.probability, None if verdict is None else verdict.score)
        if not has_request_context():
            set_drift(self.monitor.report())
            return
        from flask import g

        g.drift_observed = True


def register(app) -> None:
    """app.extensions["drift_monitor"] from the card's reference, MONITOR_WINDOW and MONITOR_MIN_IMAGES; None
    when the model did not load."""
    screener = app.extensions.get("screener")
    if screener is None:
        app.extensions["drift_monitor"] = None
        return
    configured = settings(app)
    monitor = DriftMonitor(screener.card.monitor, configured.monitor_window, configured.monitor_min_images)
    app.extensions["drift_monitor"] = monitor
    screener.batch.observers.append(Observer(app, monitor))
    set_drift(monitor.report())

    @app.after_request
    def drift_gauges(response):
        from flask import g

        if g.pop("drift_observed", False):
            set_drift(monitor.report())
        return response


def monitor_json() -> dict:
    """GET /api/monitor and the model page: the monitor's answer, or why there is none."""
    monitor = current_app.extensions.get("drift_monitor")
    if monitor is None:
        configured = current_settings()
        answer = {"alarm": False, "images": 0, "min_images": configured.monitor_min_images, "false_alarm_rate": ALPHA}
        answer |= {"reference": None, "signals": [], "advice": NO_MODEL, "window": configured.monitor_window}
        return answer | {"scope": SCOPE}
    return monitor.report() | {"scope": SCOPE}
