"""Per-client rate limits (Flask-Limiter): uploads (every POST: the form, /api/predict and
/api/predict/batch) and pages (every GET: /, /model, its plots, /openapi.json), each counted per
client address in a moving window. /healthz and static files are never limited.

Over a limit the answer is 429 with Retry-After (seconds until the window lets one more in):
JSON under /api/, the too_many.html page for the form (pneumonia/web/error_responses.py).

The counts live in each worker's memory ("memory://"): nothing to run beside the app, but a
client whose requests gunicorn spreads over WEB_CONCURRENCY workers gets up to that many times
the limit, and a restarted worker starts from zero. The model's capacity (pneumonia/web/capacity.py, 503)
protects the server from overload whatever the limits; these keep one client from taking all of it.

The client's address: `request.remote_addr`, or, behind RATE_LIMIT_PROXY_HOPS trusted proxies
(1 behind a PaaS router such as Heroku's), the address that many hops from the right of
X-Forwarded-For, the one the nearest trusted proxy saw (entries further left are the client's word).
"""

from __future__ import annotations

import math
import time

from flask import current_app, request
from flask_limiter import Limit, Limiter

from pneumonia.web.settings import current_settings, settings

EXEMPT_ENDPOINTS = {"api.healthz"}


def client_address() -> str:
    hops = current_settings().rate_limit_proxy_hops
    if hops > 0:
        forwarded = [part.strip() for part in request.headers.get("X-Forwarded-For", "").split(",") if part.strip()]
        if len(forwarded) >= hops:
            return forwarded[-hops]
    return request.remote_addr or "unknown"


def register(app) -> None:
    """app.extensions["rate_limiter"]: on when RATE_LIMIT_ENABLED, with RATE_LIMIT_UPLOADS and
    RATE_LIMIT_PAGES ("30 per minute", "120/minute;1000/hour": Flask-Limiter's notation)."""
    configured = settings(app)
    limiter = Limiter(
        client_address,
        default_limits=[
            Limit(configured.rate_limit_uploads, scope="uploads", shared=True, methods=["POST"]),
            Limit(configured.rate_limit_pages, scope="pages", shared=True, methods=["GET", "HEAD"]),
        ],
        storage_uri="memory://",
        strategy="moving-window",
        headers_enabled=False,  # its headers would add a Retry-After to every answer; errors.py sets 429's
        enabled=configured.rate_limit_enabled,
    )
    limiter.request_filter(lambda: request.endpoint in EXEMPT_ENDPOINTS)
    limiter.init_app(app)
    app.extensions["rate_limiter"] = limiter


def retry_after_s() -> int:
    """Whole seconds until the breached limit lets this client's next request in (at least 1)."""
    breached = current_app.extensions["rate_limiter"].current_limit
    if breached is None:
        return 1
    return max(1, math.ceil(breached.reset_at - time.time()))
