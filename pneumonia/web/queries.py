"""The JSON API's query parameters: the words each one takes and how a request's value is read. The
OpenAPI document (pneumonia/web/schemas.py) states the same words, so a request that keeps to the
document is never refused for them, and one that does not gets a 400 naming what it may send."""

from __future__ import annotations

from flask import request

from pneumonia.web.uploads import UploadError

# One convention for every on/off parameter (`gradcam`), in any case.
YES = ("1", "true", "yes")
NO = ("0", "false", "no")
# ?overlay=: the overlay's encoding. JPEG by default: for the 1,632x1,225 sample X-ray the PNG took
# 9.4 ms of an upload's 60 ms and made most of its 359 KB answer, the JPEG 0.6 ms (issue 30;
# docs/performance.md). PNG, lossless, on request.
OVERLAY_FORMATS = {"png": ".png", "jpeg": ".jpg"}
DEFAULT_OVERLAY = "jpeg"
RESULT_FORMS = ("json", "dicom-sr", "dicom")


def flag(name: str, default: bool) -> bool:
    """?name= as on (1, true, yes) or off (0, false, no), any case; `default` when absent; 400 for anything else."""
    value = request.args.get(name)
    if value is None:
        return default
    if value.lower() not in YES + NO:
        raise UploadError(400, f"{name}={value}: choose one of {', '.join(YES + NO)}.")
    return value.lower() in YES


def choice(name: str, choices, default: str) -> str:
    """?name= as one of `choices`, any case; `default` when absent; 400 for anything else."""
    value = request.args.get(name, default).lower()
    if value not in choices:
        raise UploadError(400, f"{name}={value}: choose one of {', '.join(choices)}.")
    return value


def overlay_format() -> tuple[str, str]:
    """(field suffix, encoder extension) from ?overlay=jpeg|png."""
    name = choice("overlay", OVERLAY_FORMATS, DEFAULT_OVERLAY)
    return name, OVERLAY_FORMATS[name]


def result_form() -> str:
    """?result=json (the default), dicom-sr or dicom (pneumonia/web/dicom_results.py answers the DICOM ones)."""
    return choice("result", RESULT_FORMS, "json")


def any_case(words) -> str:
    """A JSON Schema pattern (ECMA 262 has no case-insensitive flag) for exactly one of `words`, in any case."""
    spelled = ("".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else c for c in word) for word in words)
    return f"^({'|'.join(spelled)})$"
