"""Response headers: scripts and styles only from static/ (no inline code), images also as
data: URIs (the result page embeds them), never framed, never sniffed, results never cached. Every
answer links the API's OpenAPI document (RFC 8631 "service-desc")."""

from __future__ import annotations

from flask import request

from pneumonia.web.device_site import CONTENT_SECURITY_POLICY as DEVICE_POLICY

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "form-action 'self'",
        "base-uri 'none'",
        "frame-ancestors 'none'",
    ]
)


def register(app) -> None:
    @app.after_request
    def security_headers(response):
        # The in-browser screener compiles WebAssembly and fetches its model: its own, as strict otherwise.
        policy = CONTENT_SECURITY_POLICY
        if request.blueprint == "device":
            policy = f"{DEVICE_POLICY}; frame-ancestors 'none'"
        response.headers["Content-Security-Policy"] = policy
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["Link"] = '</openapi.json>; rel="service-desc"; type="application/json"'
        if request.method == "POST":  # results describe someone's X-ray
            response.headers["Cache-Control"] = "no-store"
        return response
