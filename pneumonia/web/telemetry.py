"""Prometheus metrics: GET /metrics in the Prometheus text format (prometheus_client).

What is counted, and where:

    pneumonia_http_requests_total{route,method,status}     every answer (route: the URL rule, never the path)
    pneumonia_http_request_duration_seconds{route}         its time in the app, histogram
    pneumonia_http_refused_total{status}                   429 (rate limit, wrong keys) and 503 (busy, not loaded)
    pneumonia_screenings_total{outcome,reason}             screened; refused by the gate (reason: size, shape,
                                                           colour, blank, features); unreadable; error (ours)
    pneumonia_screening_labels_total{threshold,label}      the label of each screened image at each threshold
    pneumonia_gate_verdicts_total{verdict}                 ok, unusual, rejected
    pneumonia_stage_duration_seconds{stage}                decode, preprocess, model, model_gradcam,
                                                           overlay_encode (ScreenedImage.timing_ms), histogram
    pneumonia_model_slots, pneumonia_model_slots_busy,     the model capacity (web/capacity.py), summed over
    pneumonia_model_queue_waiting                          the live workers
    pneumonia_model_queue_wait_seconds                     how long an upload waited for a slot, histogram
    pneumonia_model_info{name,card_sha256,runtime,         1, with the model's name, its card's sha256 and
      threshold_default,threshold_screening}               the thresholds it labels at
    pneumonia_drift_*                                      the drift monitor (web/monitoring.py), per worker

Several gunicorn workers: prometheus_client's multiprocess mode. The gunicorn settings
(web/gunicorn_conf.py) make PROMETHEUS_MULTIPROC_DIR (emptied) before any worker starts and mark a worker's
files dead when it exits; each worker writes its metrics there and /metrics, whichever worker answers,
adds them up: counters and histograms over every worker that ever ran since the start (a restarted worker's
counts are kept), the capacity gauges over the live ones, the drift gauges one series per live worker
(`pid` label) and the alarm the highest of them. Without the variable (flask run, the tests) the metrics
are this process's.

The hooks cost an upload a few counter increments and histogram observations (microseconds), after the
answer is made; /metrics itself is behind the access keys like every route but /healthz (web/access.py).
"""

from __future__ import annotations

import os
import time

from flask import Blueprint, Response, current_app, g, has_request_context, request

from pneumonia.serving.outcomes import Outcome

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
STAGES = ("decoder_wait", "decode", "preprocess", "model", "model_gradcam", "overlay_encode")
STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

bp = Blueprint("telemetry", __name__)


class Metrics:
    """Every metric of this process, made once (prometheus_client refuses a name twice in a registry), in a
    registry of its own rather than the library's global one."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

        disable_created_metrics()  # no `_created` series beside each counter: nothing reads them here
        self.registry = registry = CollectorRegistry()

        def gauge(name, text, labels=(), mode="liveall"):
            return Gauge(name, text, labels, registry=registry, multiprocess_mode=mode)

        def histogram(name, text, labels=(), buckets=STAGE_BUCKETS):
            return Histogram(name, text, labels, registry=registry, buckets=buckets)

        route_status = ["route", "method", "status"]
        self.requests = Counter(
            "pneumonia_http_requests", "Answers by route and status.", route_status, registry=registry
        )
        self.request_seconds = histogram(
            "pneumonia_http_request_duration_seconds", "Time in the app per answer.", ["route"], REQUEST_BUCKETS
        )
        self.refused = Counter("pneumonia_http_refused", "Answers 429 and 503.", ["status"], registry=registry)
        self.screenings = Counter(
            "pneumonia_screenings",
            "Images by outcome (and a refusal's reason).",
            ["outcome", "reason"],
            registry=registry,
        )
        self.labels = Counter(
            "pneumonia_screening_labels",
            "Screened images by label at each threshold.",
            ["threshold", "label"],
            registry=registry,
        )
        self.verdicts = Counter("pneumonia_gate_verdicts", "The gate's verdicts.", ["verdict"], registry=registry)
        self.stage_seconds = histogram("pneumonia_stage_duration_seconds", "Time per image in a stage.", ["stage"])
        self.slots = gauge("pneumonia_model_slots", "Screenings at once (all live workers).", mode="livesum")
        self.slots_busy = gauge("pneumonia_model_slots_busy", "Model slots in use.", mode="livesum")
        self.waiting = gauge("pneumonia_model_queue_waiting", "Uploads waiting for a slot.", mode="livesum")
        self.queue_wait = histogram("pneumonia_model_queue_wait_seconds", "Wait for a model slot.")
        info = ["name", "card_sha256", "runtime", "threshold_default", "threshold_screening"]
        self.info = gauge("pneumonia_model_info", "The model served (value 1).", info, mode="livemax")
        self.drift_share = gauge("pneumonia_drift_signal_share", "A drift signal's share in the window.", ["signal"])
        self.drift_low = gauge("pneumonia_drift_signal_expected_low", "Its lowest share expected.", ["signal"])
        self.drift_high = gauge("pneumonia_drift_signal_expected_high", "Its highest share expected.", ["signal"])
        self.drift_signal_alarm = gauge("pneumonia_drift_signal_alarm", "1 when the signal alarms.", ["signal"])
        self.drift_alarm = gauge("pneumonia_drift_alarm", "1 when a live worker's monitor alarms.", mode="livemax")
        self.drift_images = gauge("pneumonia_drift_window_images", "Screenings in the window.")


_METRICS: Metrics | None = None


def metrics() -> Metrics:
    """This process's metrics, made on first use (after gunicorn's fork, so PROMETHEUS_MULTIPROC_DIR is read)."""
    global _METRICS
    if _METRICS is None:
        _METRICS = Metrics()
    return _METRICS


def exposition() -> bytes:
    """The text format: every worker's metrics added up in multiprocess mode, else this process's."""
    from prometheus_client import CollectorRegistry, generate_latest, multiprocess

    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest(metrics().registry)


@bp.get("/metrics")
def metrics_page():
    from prometheus_client import CONTENT_TYPE_LATEST

    return Response(exposition(), content_type=CONTENT_TYPE_LATEST, headers={"Cache-Control": "no-store"})


# --- What the app records ------------------------------------------------------------------------


def count_rows(rows) -> None:
    """A chunk's rows, as the screening pipeline decided them; their stage times once the answer is made
    (the overlay is encoded after the chunk)."""
    recorded = metrics()
    for row in rows:
        screening = row.screening
        outcome = screening.outcome
        reason = ""
        if outcome == Outcome.REFUSED:
            reason = screening.verdict.reason or ""
        elif outcome == Outcome.FAILED:
            outcome = "error" if screening.unexpected else "unreadable"
        recorded.screenings.labels(outcome, reason).inc()
        for threshold, label in (screening.labels or {}).items():
            recorded.labels.labels(threshold, label).inc()
        if screening.verdict is not None:
            recorded.verdicts.labels(screening.verdict.verdict).inc()
    timings = [row.timing_ms for row in rows]  # the dicts themselves: the overlay's time is added to them later
    if has_request_context():
        g.setdefault("telemetry_timings", []).extend(timings)
    else:
        _observe_stages(timings)


def _observe_stages(timings) -> None:
    for timing_ms in timings:
        for stage, ms in timing_ms.items():
            if stage in STAGES:
                metrics().stage_seconds.labels(stage).observe(ms / 1000)


def set_drift(report: dict) -> None:
    """The drift monitor's answer as gauges."""
    recorded = metrics()
    recorded.drift_images.set(report["images"])
    recorded.drift_alarm.set(int(report["alarm"]))
    for signal in report["signals"]:
        name = signal["name"]
        recorded.drift_share.labels(name).set(signal["value"] if signal["value"] is not None else float("nan"))
        low, high = signal["expected"] or (float("nan"), float("nan"))
        recorded.drift_low.labels(name).set(low)
        recorded.drift_high.labels(name).set(high)
        recorded.drift_signal_alarm.labels(name).set(int(signal["alarm"]))


def _started() -> None:
    g.telemetry_started = time.perf_counter()


def _answered(response):
    recorded = metrics()
    route = request.url_rule.rule if request.url_rule is not None else "unmatched"
    recorded.requests.labels(route, request.method, str(response.status_code)).inc()
    if "telemetry_started" in g:
        recorded.request_seconds.labels(route).observe(time.perf_counter() - g.telemetry_started)
    if response.status_code in (429, 503):
        recorded.refused.labels(str(response.status_code)).inc()
    _observe_stages(g.pop("telemetry_timings", ()))
    _set_capacity(current_app.extensions.get("model_capacity"))
    return response


def _set_capacity(capacity) -> None:
    """The capacity's gauges from its snapshot (web/capacity.py); nothing for a capacity without one."""
    if not hasattr(capacity, "snapshot"):
        return
    snapshot = capacity.snapshot()
    recorded = metrics()
    recorded.slots.set(snapshot["slots"])
    recorded.slots_busy.set(snapshot["running"])
    recorded.waiting.set(snapshot["waiting"])


def _time_the_wait(capacity) -> None:
    """The capacity's `acquire`, timed: how long each upload that got a slot waited for it."""
    acquire = capacity.acquire

    def timed_acquire():
        started = time.perf_counter()
        acquire()
        metrics().queue_wait.observe(time.perf_counter() - started)

    capacity.acquire = timed_acquire


def register(app) -> None:
    """/metrics, the hooks that count every answer, the model's info and the capacity's gauges; before the
    access check and the rate limits, so that their refusals are counted and timed too."""
    recorded = metrics()
    app.before_request(_started)
    app.after_request(_answered)
    app.register_blueprint(bp)
    capacity = app.extensions.get("model_capacity")
    if capacity is not None:
        _time_the_wait(capacity)
        _set_capacity(capacity)
    screener = app.extensions.get("screener")
    if screener is not None:
        from pneumonia.serving.card import CARD_NAME, file_sha256

        thresholds = screener.classifier.thresholds
        recorded.info.labels(
            screener.classifier.name,
            file_sha256(screener.classifier.keras_path.with_name(CARD_NAME)),
            screener.classifier.runtime.name,
            f"{thresholds['default']:.6g}",
            f"{thresholds['screening']:.6g}",
        ).set(1)
