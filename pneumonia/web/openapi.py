"""The OpenAPI 3.1 document of the JSON API: pneumonia/web/openapi.json (carried in the wheel), served at
/openapi.json with `info.x-limits` set to the limits this server enforces (its settings, not the
defaults the document's prose names), the batch's `maxItems` to its BATCH_MAX_FILES, and the document's
`security` (an access key, pneumonia/web/access.py) left out when this server has no keys: it is open."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

DOCUMENT = Path(__file__).with_name("openapi.json")


@lru_cache(maxsize=1)
def _document_text() -> str:
    return DOCUMENT.read_text(encoding="utf-8")


def limits(config) -> dict:
    """The limits a client meets, from the app's settings (pneumonia/web/__init__.py DEFAULTS)."""
    return {
        "max_content_length_bytes": int(config["MAX_CONTENT_LENGTH"]),
        "max_form_parts": int(config["MAX_FORM_PARTS"]),
        "batch_max_files": int(config["BATCH_MAX_FILES"]),
        "batch_chunk_size": int(config["BATCH_CHUNK_SIZE"]),
        "body_timeout_s": float(config["BODY_TIMEOUT"]),
        "body_read_timeout_s": float(config["BODY_READ_TIMEOUT"]),
        "model_queue_seconds": float(config["MODEL_QUEUE_SECONDS"]),
        "rate_limit": {
            "enabled": bool(config["RATE_LIMIT_ENABLED"]),
            "uploads": str(config["RATE_LIMIT_UPLOADS"]),
            "pages": str(config["RATE_LIMIT_PAGES"]),
            "scope": "per client address, per worker process",
        },
        "access": {
            "keys_required": keys_required(config),
            "failures_limit": str(config["ACCESS_FAILURES_LIMIT"]),
            "scope": "per client address, per worker process",
        },
    }


def keys_required(config) -> bool:
    """Whether this server asks for an access key (start-up refuses a set but empty key setting)."""
    return config.get("ACCESS_KEYS") is not None or bool(config.get("ACCESS_KEYS_FILE"))


def document(config) -> dict:
    """A fresh copy of the document for this app (the caller may change it)."""
    spec = json.loads(_document_text())
    spec["info"]["x-limits"] = limits(config)
    batch = spec["paths"]["/api/predict/batch"]["post"]["requestBody"]["content"]["multipart/form-data"]
    batch["schema"]["properties"]["file"]["maxItems"] = int(config["BATCH_MAX_FILES"])
    if not keys_required(config):
        del spec["security"]
    return spec
