"""The JSON API's query parameters: the words each one takes, and the request's query read through the
models that the OpenAPI document is generated from (pneumonia/web/schemas.py: PredictQuery, BatchQuery), so
a request that keeps to the document is never refused for them, and one that does not gets a 400 naming
what it may send."""

from __future__ import annotations

from typing import TypeVar

from flask import request
from pydantic import BaseModel, ValidationError

from pneumonia.web.uploads import UploadError

# One convention for every on/off parameter (`gradcam`), in any case.
YES = ("1", "true", "yes")
NO = ("0", "false", "no")
# ?overlay=: the overlay's encoding. JPEG by default: the PNG costs far more time and bytes for the same
# picture (docs/benchmarks.md, "One upload"). PNG, lossless, on request.
OVERLAY_FORMATS = {"png": ".png", "jpeg": ".jpg"}
DEFAULT_OVERLAY = "jpeg"
RESULT_FORMS = ("json", "dicom-sr", "dicom")
WORDS = {"gradcam": YES + NO, "overlay": tuple(OVERLAY_FORMATS), "result": RESULT_FORMS}  # what a 400 offers

Query = TypeVar("Query", bound=BaseModel)


def parsed_query(model: type[Query]) -> Query:
    """The request's query parameters as `model`; a 400 naming the first parameter the document refuses."""
    try:
        return model.model_validate(request.args.to_dict())
    except ValidationError as err:
        name = str(err.errors()[0]["loc"][0])
        value = request.args.get(name, "").lower()
        raise UploadError(400, f"{name}={value}: choose one of {', '.join(WORDS[name])}.") from None


def any_case(words) -> str:
    """A JSON Schema pattern (ECMA 262 has no case-insensitive flag) for exactly one of `words`, in any case."""
    spelled = ("".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else c for c in word) for word in words)
    return f"^({'|'.join(spelled)})$"
