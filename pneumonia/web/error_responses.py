"""Every failure answers with its status and a sentence for a person: a page, or JSON under
/api/ and /healthz. Unexpected errors are logged with their stack but not their message,
which could quote the upload."""

from __future__ import annotations

import traceback

from flask import current_app, jsonify, render_template, request
from flask_limiter import RateLimitExceeded
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from pneumonia.errors import XrayReadError
from pneumonia.serving.gate import EXPECTED
from pneumonia.serving.result_formats import ood_json
from pneumonia.serving.sandbox import DecoderBusy
from pneumonia.web.answers import UNEXPECTED_STATUS, NotScreened, http_status
from pneumonia.web.capacity import ModelBusy
from pneumonia.web.decoders import decoder_retry_after_s
from pneumonia.web.rate_limit import retry_after_s
from pneumonia.web.schemas import Refused, built
from pneumonia.web.screener import ModelNotReady, current_screener
from pneumonia.web.uploads import MalformedBody, UploadError

UNEXPECTED_MESSAGE = "Something went wrong on our side. Nothing was stored; please try again."
HTTP_MESSAGES = {
    404: "There is no page at this address.",
    405: "This address does not accept that kind of request.",
}


def wants_json() -> bool:
    return request.path.startswith("/api/") or request.path in ("/healthz", "/openapi.json")


def error_response(status: int, message: str):
    if wants_json():
        return jsonify(error=message, status=status), status
    return render_template("error.html", status=status, message=message), status


def _too_large_message() -> str:
    """413: the body's size, or (a body within the size limit) its number of form parts."""
    limit = current_app.config["MAX_CONTENT_LENGTH"]
    if limit is not None and request.content_length is not None and request.content_length <= limit:
        return (
            f"The upload has too many parts (at most {request.max_form_parts}): send one X-ray as the form field "
            '"file", or several to /api/predict/batch.'
        )
    return f"The upload is too large: the limit is {limit / (1024 * 1024):g} MB."


def _http_error(err: HTTPException):
    if err.code == 413 or isinstance(err, MalformedBody):
        body, status = error_response(err.code, _too_large_message() if err.code == 413 else err.description)
        # The body was not read (or not to its end): the connection cannot carry another request, so
        # say it closes (a keep-alive client would otherwise send its next upload into a closed socket).
        return body, status, {"Connection": "close"}
    body, status = error_response(err.code or 500, HTTP_MESSAGES.get(err.code, err.description or err.name))
    if isinstance(err, MethodNotAllowed) and err.valid_methods:  # RFC 9110: a 405 names the methods allowed
        return body, status, {"Allow": ", ".join(err.valid_methods)}
    return body, status


def _not_screened(err: NotScreened):
    """An upload the pipeline did not screen, at its outcome's status (pneumonia/web/answers.py): 422 refused
    by the gate (its verdict; no probability, no heatmap), 400 unreadable, 500 a failure of ours (logged by
    the pipeline without its message)."""
    screening, status = err.screening, http_status(err.screening)
    if status == 422 and wants_json():
        ood = ood_json(screening.verdict, current_screener().classifier)
        return built(Refused, error=screening.error, status=422, ood=ood), 422
    if status == 422:
        return render_template("refused.html", verdict=screening.verdict, expected=EXPECTED), 422
    if status == UNEXPECTED_STATUS:
        current_app.logger.error("The screening pipeline failed on an upload of %s %s", request.method, request.path)
        return error_response(status, UNEXPECTED_MESSAGE)
    return error_response(status, screening.error)


def _busy(err: ModelBusy):
    """503 at once, with Retry-After, when more uploads wait for the model than it can serve soon."""
    body, status = error_response(
        503, f"The screening service is busy: too many X-rays are waiting. Please try again in {err.retry_after} s."
    )
    return body, status, {"Retry-After": str(err.retry_after)}


def _decoders_busy(err: DecoderBusy):
    """503 with Retry-After when every decoding child stayed busy for DECODE_QUEUE_SECONDS."""
    retry_after = decoder_retry_after_s()
    body, status = error_response(
        503, f"The screening service is busy decoding other uploads. Please try again in {retry_after} s."
    )
    return body, status, {"Retry-After": str(retry_after)}


def _too_many(err: RateLimitExceeded):
    """429 with Retry-After: this client is over a per-client limit (pneumonia/web/rate_limit.py)."""
    retry_after = retry_after_s()
    headers = {"Retry-After": str(retry_after)}
    if request.method == "POST":  # the upload was refused unread: do not read it to keep the connection
        headers["Connection"] = "close"
    message = f"Too many requests from this address: at most {err.description}. Please try again in {retry_after} s."
    if wants_json():
        return jsonify(error=message, status=429), 429, headers
    return render_template("too_many.html", message=message, retry_after=retry_after), 429, headers


def _unexpected(err: Exception):
    current_app.logger.error(
        "Unexpected %s in %s %s (message withheld: it may quote the upload)\n%s",
        type(err).__name__,
        request.method,
        request.path,
        "".join(traceback.format_tb(err.__traceback__)),
    )
    return error_response(500, UNEXPECTED_MESSAGE)


def register(app) -> None:
    app.register_error_handler(UploadError, lambda err: error_response(err.status, err.message))
    app.register_error_handler(NotScreened, _not_screened)
    app.register_error_handler(ModelBusy, _busy)
    app.register_error_handler(DecoderBusy, _decoders_busy)
    app.register_error_handler(XrayReadError, lambda err: error_response(400, str(err)))
    app.register_error_handler(
        ModelNotReady,
        lambda err: error_response(503, f"The model is not loaded, so nothing can be screened: {err.reason}"),
    )
    app.register_error_handler(RateLimitExceeded, _too_many)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected)
