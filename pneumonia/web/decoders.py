"""The decoding sandbox as the web app uses it (pneumonia/serving/sandbox.py): every upload is decoded in
one of DECODERS child processes, each bounded to DECODE_MEMORY_MIB of address space and DECODE_SECONDS
of processor time. An upload that finds every child busy for DECODE_QUEUE_SECONDS is answered 503 with
Retry-After, as one that finds the model busy is; decoding never holds a model slot."""

from __future__ import annotations

import math
import threading

from flask import current_app

from pneumonia.serving.sandbox import DecodeLimits, DecodingSandbox, shared_sandbox
from pneumonia.web.settings import current_settings, settings


def register(app) -> None:
    """app.extensions["decoding_sandbox"]: the process's sandbox for these settings (the tests' many apps
    share it); outside testing its children are started at once, in the background."""
    configured = settings(app)
    limits = DecodeLimits(configured.decode_memory_mib, configured.decode_seconds)
    sandbox = shared_sandbox(limits, configured.decoders, configured.decode_queue_seconds)
    app.extensions["decoding_sandbox"] = sandbox
    if not app.testing:  # a worker's first upload should not wait for the zygote's imports (~0.7 s)
        threading.Thread(target=sandbox.warm, name="decoding-sandbox-warm-up", daemon=True).start()


def current_sandbox() -> DecodingSandbox:
    return current_app.extensions["decoding_sandbox"]


def decoder_retry_after_s() -> int:
    """What a 503 for busy decoders asks a client to wait: one decode at its limit."""
    return max(1, math.ceil(current_settings().decode_seconds))
