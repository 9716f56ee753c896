"""Access keys: with ACCESS_KEYS (and/or ACCESS_KEYS_FILE) set, every route but /healthz and the
static files needs one of the keys; unset, the app is open and says so once at start-up.

    the API (/api/*, /openapi.json)   Authorization: Bearer KEY         401 challenge: Bearer
    the pages                         HTTP Basic, any user, KEY as the   401 challenge: Basic (a browser
                                      password                           asks for it itself)

Either form is accepted on every route (a browser that logged in to the pages sends Basic to the
document they link). Keys are compared in constant time against every configured key, so the time
taken says nothing about which key came near. A key travels only in the Authorization header, never
in the URL (gunicorn's access log prints the path and query). The header is taken out of the request
once read, so nothing after this check sees it: gunicorn's access log would print a Basic user name,
and a person may type the key there.

What is logged: at start-up, how many keys are required (never the keys); on a refused credential,
the client's address and the path (never the credential). A client that presents wrong credentials
more than ACCESS_FAILURES_LIMIT times (Flask-Limiter's notation; its `limits` storage and moving
window, per client address as pneumonia/web/rate_limit.py sees it) is answered 429 with Retry-After
until the window lets it in again, whatever it presents. A request without credentials is not a
failure: it is how a browser learns that it must ask.

A setting that cannot be what was meant (an empty list, a key with spaces or non-ASCII characters,
a short key, a missing keys file) stops the start-up with AccessKeyError, naming the key by its
position only: an app meant to be closed never starts open.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import math
import re
import time
from pathlib import Path

from flask import current_app, jsonify, render_template, request
from limits import parse
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

from pneumonia.web.error_responses import wants_json
from pneumonia.web.rate_limit import client_address
from pneumonia.web.settings import Settings, settings

# Static files are open: the page's CSS and scripts hold nothing of a patient's and load before a key can be
# typed (issue 39 keeps them from starving the screening: pneumonia/web/static_files.py). Every other route is
# closed unless its documented operation says `open` (pneumonia/web/operations.py).
OPEN_WITHOUT_OPERATION = {"static"}
KEYS_ENV, KEYS_FILE_ENV = "PNEUMONIA_ACCESS_KEYS", "PNEUMONIA_ACCESS_KEYS_FILE"
MIN_KEY_LENGTH = 16  # `python -c "import secrets; print(secrets.token_urlsafe(32))"` gives 43
KEY_CHARACTERS = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no spaces: what a header carries intact
REALM = "pneumonia screening"


class AccessKeyError(ValueError):
    """The access-key settings cannot be used; the message names keys by position, never by value."""


def is_open(endpoint: str | None) -> bool:
    """Whether a request to `endpoint` is answered without a key: its operation's own `open` flag."""
    if endpoint in OPEN_WITHOUT_OPERATION:
        return True
    operation = getattr(current_app.view_functions.get(endpoint), "operation", None)
    return bool(operation is not None and operation.open)


def checked_keys(entries: list[str], source: str) -> list[bytes]:
    """The keys of `source` as bytes, or AccessKeyError saying which entry is wrong and why."""
    if not entries:
        raise AccessKeyError(f"{source} is set but holds no key: set at least one, or unset it to run open.")
    for position, key in enumerate(entries, 1):
        if not KEY_CHARACTERS.fullmatch(key):
            raise AccessKeyError(f"{source}: key {position} is empty or has spaces or non-ASCII characters.")
        if len(key) < MIN_KEY_LENGTH:
            raise AccessKeyError(f"{source}: key {position} is shorter than {MIN_KEY_LENGTH} characters.")
    return [key.encode("ascii") for key in entries]


def keys_from_setting(value: str | tuple[str, ...]) -> list[bytes]:
    """ACCESS_KEYS: comma-separated text (a PaaS config var) or a tuple of keys (the config dict's list)."""
    entries = value.split(",") if isinstance(value, str) else list(value)
    return checked_keys([entry.strip() for entry in entries if entry.strip()], KEYS_ENV)


def keys_from_file(path: str) -> list[bytes]:
    """ACCESS_KEYS_FILE: one key a line (a mounted secret); blank lines and lines starting with # are skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise AccessKeyError(f"{KEYS_FILE_ENV}={path} cannot be read: {type(err).__name__}.") from None
    lines = [line.strip() for line in text.splitlines()]
    return checked_keys([line for line in lines if line and not line.startswith("#")], f"{KEYS_FILE_ENV}={path}")


def configured_keys(configured: Settings) -> list[bytes]:
    """Every key the settings name (both sources together), [] when neither is set."""
    keys = []
    if configured.access_keys is not None:
        keys += keys_from_setting(configured.access_keys)
    if configured.access_keys_file:
        keys += keys_from_file(configured.access_keys_file)
    return keys


def taken_authorization() -> str | None:
    """The Authorization header, taken out of the request: gunicorn's access log prints the user name of
    a Basic header from the same WSGI environ (its `%(u)s`), and a person may type the key there."""
    return request.environ.pop("HTTP_AUTHORIZATION", None)


def presented_key(header: str | None) -> bytes | None:
    """The key an Authorization header carries (Bearer, or Basic's password); None without the header,
    b"" for one that cannot be read (it then fails like a wrong key)."""
    if header is None:
        return None
    scheme, _, credentials = header.strip().partition(" ")
    credentials = credentials.strip().encode("latin-1", "replace")  # WSGI headers are latin-1 text
    if scheme.lower() == "bearer":
        return credentials
    if scheme.lower() == "basic":
        try:
            return base64.b64decode(credentials, validate=True).partition(b":")[2]
        except binascii.Error:
            return b""
    return b""


def key_matches(presented: bytes, keys: list[bytes]) -> bool:
    """Compared with every key, in constant time each, so the answer's timing does not tell which key is near."""
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(presented, key)
    return matched


def challenge() -> str:
    """WWW-Authenticate: Bearer for the API (RFC 6750), Basic for the pages, so a browser asks for the key."""
    if wants_json():
        return f'Bearer realm="{REALM}"'
    return f'Basic realm="{REALM}", charset="UTF-8"'


def refusal(status: int, message: str, headers: dict):
    if request.method == "POST":  # the body was not read: the connection cannot carry another request
        headers["Connection"] = "close"
    if wants_json():
        return jsonify(error=message, status=status), status, headers
    return render_template("access_needed.html", status=status, message=message), status, headers


class AccessGuard:
    """The keys, and the failures counted per client in a moving window."""

    def __init__(self, keys: list[bytes], failures_limit: str):
        self.keys = keys
        self.limit = parse(failures_limit)
        self.failures = MovingWindowRateLimiter(MemoryStorage())

    def retry_after_s(self, client: str) -> int:
        reset_at = self.failures.get_window_stats(self.limit, "access", client).reset_time
        return max(1, math.ceil(reset_at - time.time()))

    def check(self):
        """Before every request: None lets it through; otherwise the 401 or 429 answer."""
        header = taken_authorization()  # from every request, the open routes' too: browsers send it there
        if is_open(request.endpoint):
            return None
        client = client_address()
        if not self.failures.test(self.limit, "access", client):
            retry_after = self.retry_after_s(client)
            message = f"Too many wrong access keys from this address. Please try again in {retry_after} s."
            return refusal(429, message, {"Retry-After": str(retry_after)})
        presented = presented_key(header)
        if presented is not None and key_matches(presented, self.keys):
            return None
        if presented is None:
            message = "This screening service needs an access key: ask whoever runs it for one."
        else:
            self.failures.hit(self.limit, "access", client)
            # %r: a path's encoded line breaks stay escaped, so a request cannot write lines into the log
            current_app.logger.warning("Access refused: a wrong key from %s for %r", client, request.path)
            message = "That access key is not valid here."
        return refusal(401, message, {"WWW-Authenticate": challenge()})


def register(app) -> None:
    """app.extensions["access_guard"]: the guard in front of every route when keys are set, else None."""
    configured = settings(app)
    keys = configured_keys(configured)
    if not keys:
        app.extensions["access_guard"] = None
        app.logger.warning(
            "Access: open, no key needed (%s and %s are unset): anyone who can reach this address can use it",
            KEYS_ENV,
            KEYS_FILE_ENV,
        )
        return
    guard = AccessGuard(keys, configured.access_failures_limit)
    app.extensions["access_guard"] = guard
    app.before_request(guard.check)
    app.logger.info("Access: %d key(s); every route but /healthz and static files needs one", len(keys))
