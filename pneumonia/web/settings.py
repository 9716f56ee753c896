"""The web app's settings, typed and checked once, when the app is made.

Each setting has a default here, is overridden by the environment variable PNEUMONIA_<NAME> (the field's
name in capitals: `model_slots` is PNEUMONIA_MODEL_SLOTS), and then by the `config` dict given to
`create_app` under <NAME> (`{"MODEL_SLOTS": 1}`: what the tests pass). A value that cannot be what was
meant (PNEUMONIA_MODEL_SLOTS=abc, a negative count, a rate limit Flask-Limiter cannot read) stops
`create_app` with SettingsError naming the variable, so a worker refuses to start rather than fail at
its first request.

The environment is read as text and converted by each field's type: PNEUMONIA_ACCESS_KEYS=12345678901234567e3
is that text, not a number (Flask's `from_prefixed_env`, used before, read values as JSON where they parsed).
Other PNEUMONIA_* variables are not the web app's: PNEUMONIA_RUNTIME_THREADS and PNEUMONIA_RUNTIME_SPINNING
are read by pneumonia/serving/runtime.py, which the command line shares.

`configure(app, config)` stores the Settings in app.extensions["settings"] (`settings(app)`,
`current_settings()` in a request) and writes every setting into app.config under its <NAME>, typed: Flask
reads MAX_CONTENT_LENGTH and MAX_FORM_PARTS there itself. Settings are read once: changing app.config
later changes what Flask reads, not the Settings.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Annotated

from flask import current_app
from limits import parse_many
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from pneumonia.serving.classifier import SHIPPED_MODEL_DIR
from pneumonia.serving.decoding_child import DEFAULT_LIMITS
from pneumonia.serving.runtime import RUNTIMES

ENV_PREFIX = "PNEUMONIA_"

Count = Annotated[int, Field(ge=1)]
Seconds = Annotated[float, Field(gt=0)]


class SettingsError(ValueError):
    """A setting cannot be used; the message names its environment variable and says why."""


class Settings(BaseModel):
    """Every setting of the web app, with its type and default.

    A frozen pydantic model rather than a frozen dataclass: pydantic is already a serving dependency
    (the API's schemas), it converts the environment's text to each type and checks the bounds declared
    with the field, and its errors say which field failed and why, which a dataclass would need a
    hand-written cast and check per field for. Frozen: assigning to a setting raises."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False, validate_default=True)

    model_path: str = str(SHIPPED_MODEL_DIR)
    # "onnx" or "keras"; None: onnx when the model's export is current (pneumonia/serving/runtime.py)
    runtime: str | None = None
    max_content_length: Count = 20 * 1024 * 1024  # 413 above this (read by Flask from app.config)
    max_form_parts: int = Field(16, ge=0)  # the forms' fields besides the files (a batch adds BATCH_MAX_FILES parts)
    # Several files in one request (pneumonia/web/batch.py): at most this many, screened this many at a time
    # (a chunk's model work is the longest a single upload waits behind it: docs/benchmarks.md).
    batch_max_files: Count = 100
    batch_chunk_size: Count = 8
    batch_max_pixels: Count = 1_000_000_000  # declared by the files' headers in all (pneumonia/web/batch.py); else 413
    overlay_alpha: float = Field(0.5, ge=0, le=1)
    page_image_max_side: Count = 1024  # JPEGs in the result page
    # the overlay in the JSON answer (JPEG, or PNG on request: its cost grows with area)
    api_image_max_side: Count = 512
    # Slow clients (pneumonia/web/uploads.py): 408 when a body takes longer than this in all, or pauses this long.
    body_timeout: Seconds = 30  # a PaaS router (Heroku's) gives up on a request after 30 s anyway
    body_read_timeout: Seconds = 10  # without a byte of the body
    # Model capacity (pneumonia/web/capacity.py): screenings at once per worker, and the longest expected
    # wait for one before an upload is answered 503 with Retry-After. On ONNX Runtime with 2 threads
    # a call (pneumonia/serving/runtime.py), 2 slots keep both cores busy while one screening decodes or
    # encodes; slots x threads measured on 2 cores: docs/benchmarks.md.
    model_slots: Count = 2
    model_queue_seconds: float = Field(5, ge=0)
    # The decoding sandbox (pneumonia/web/decoders.py, pneumonia/serving/sandbox.py): child processes that
    # decode uploads, what one decode may take in them, and how long an upload waits for a free one (else 503).
    # 128 MiB holds the largest image the header checks admit (48 MiB decoded: docs/uploads.md).
    decoders: Count = 2
    decode_memory_mib: Count = DEFAULT_LIMITS.memory_mib
    decode_seconds: Seconds = DEFAULT_LIMITS.seconds
    decode_queue_seconds: float = Field(5, ge=0)
    # Per-client rate limits (pneumonia/web/rate_limit.py), Flask-Limiter's notation, counted per worker in memory:
    # uploads are every POST (form and API), pages every GET; /healthz and static files never count.
    # Off by default: the client's address is only right when the app knows the proxies in front of it
    # (behind a PaaS router every client shares the router's address, so a limit on by default would
    # throttle the whole site as one client); the model's capacity (503) already bounds the load. On a
    # PaaS: PNEUMONIA_RATE_LIMIT_ENABLED=true PNEUMONIA_RATE_LIMIT_PROXY_HOPS=1.
    rate_limit_enabled: bool = False
    rate_limit_uploads: str = "30 per minute"  # a person uploading one X-ray at a time stays far below
    rate_limit_pages: str = "300 per minute"  # a model card view is 6 requests (the page and its plots)
    rate_limit_proxy_hops: int = Field(0, ge=0)  # trusted proxies that append to X-Forwarded-For (1 behind Heroku's)
    # Access keys (pneumonia/web/access.py, which checks the keys themselves): unset, the app is open.
    # ACCESS_KEYS: comma-separated (a PaaS config var); ACCESS_KEYS_FILE: one key a line (a mounted secret);
    # both may be set, every key is valid.
    access_keys: str | tuple[str, ...] | None = None
    access_keys_file: str | None = None
    access_failures_limit: str = "10 per minute"  # wrong keys per client address, then 429 (whatever it sends)
    # Static files (pneumonia/web/static_files.py): bodies of 1 MB or more sent at once per worker, else 503.
    static_transfers: Count = 4
    # The drift monitor (pneumonia/web/monitoring.py): this worker's last MONITOR_WINDOW screenings, numbers only,
    # tested against the card's reference once there are MONITOR_MIN_IMAGES (docs/monitoring.md).
    monitor_window: Count = 500
    monitor_min_images: Count = 100

    @field_validator("runtime")
    @classmethod
    def known_runtime(cls, value: str | None) -> str | None:
        if value is not None and value.lower() not in (*RUNTIMES, "auto"):
            raise ValueError(f"choose one of {', '.join(RUNTIMES)} (or leave it unset)")
        return None if value is None else value.lower()

    @field_validator("rate_limit_uploads", "rate_limit_pages")
    @classmethod
    def rate_limits(cls, value: str) -> str:
        parse_many(value)  # ValueError, saying what it could not read
        return value

    @field_validator("access_failures_limit")
    @classmethod
    def one_rate_limit(cls, value: str) -> str:
        if len(parse_many(value)) != 1:
            raise ValueError("give one limit (the wrong keys are counted in one moving window)")
        return value

    @field_validator("monitor_min_images")
    @classmethod
    def within_the_window(cls, value: int, info: ValidationInfo) -> int:
        window = info.data.get("monitor_window")
        if window is not None and value > window:
            raise ValueError(f"at most MONITOR_WINDOW ({window}): a window that small never holds enough to test")
        return value

    @classmethod
    def load(cls, config: Mapping | None = None, environ: Mapping[str, str] = os.environ) -> Settings:
        """The defaults, then PNEUMONIA_<NAME> in `environ`, then <NAME> in `config`; SettingsError naming
        each variable whose value cannot be used."""
        config = config or {}
        values = {}
        # a default may be refused too, for another setting's value (MONITOR_MIN_IMAGES for MONITOR_WINDOW's)
        sources = {name: f"{ENV_PREFIX}{name.upper()} (unset: its default)" for name in cls.model_fields}
        for name in cls.model_fields:
            key = name.upper()
            if key in config:
                values[name], sources[name] = config[key], f"{ENV_PREFIX}{key} (given to create_app as {key})"
            elif ENV_PREFIX + key in environ:
                values[name], sources[name] = environ[ENV_PREFIX + key], ENV_PREFIX + key
        try:
            return cls(**values)
        except ValidationError as err:
            problems = [
                f"{sources[error['loc'][0]]}={error['input']!r}: {error['msg'].removeprefix('Value error, ')}"
                for error in err.errors(include_url=False)
            ]
            raise SettingsError("Settings refused:\n  " + "\n  ".join(problems)) from None

    def as_config(self) -> dict:
        """Every setting under its app.config key (<NAME>)."""
        return {name.upper(): value for name, value in self}


def configure(app, config: Mapping | None = None, environ: Mapping[str, str] = os.environ) -> Settings:
    """Settings.load, stored in app.extensions["settings"], with `config` and every setting in app.config."""
    loaded = Settings.load(config, environ)
    app.config.update(config or {})
    app.config.update(loaded.as_config())
    app.extensions["settings"] = loaded
    return loaded


def settings(app) -> Settings:
    return app.extensions["settings"]


def current_settings() -> Settings:
    """The settings of the app serving the current request."""
    return settings(current_app)
