"""Records read from JSON (the model card, the gate's metadata) as pydantic dataclasses: validated when made
and when read, refused with an error that names the field as the card's readers know it
("preprocessing.normalization.std[2]"), and written back in the same shape.

Pydantic dataclasses, not BaseModel: they stay dataclasses, so the card's writers change a copy with
`dataclasses.replace` (validated again) and `dataclasses.asdict` reads one, as before pydantic.
"""

from __future__ import annotations

import functools
import json

from pydantic import ConfigDict, Field, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass

# The card's format is ours: a field it does not define is refused (a misspelt one would be lost silently).
RECORD_CONFIG = ConfigDict(extra="forbid")


def record(cls):
    """A card record: a frozen pydantic dataclass that refuses unknown fields."""
    return dataclass(cls, frozen=True, config=RECORD_CONFIG)


def optional():
    """A field that a card (or one of its records) leaves out when it has no value, as cards always have:
    `to_dict` omits it, `load` reads its absence as None. Other fields that may be None are written as null."""
    return Field(default=None, exclude_if=lambda value: value is None)


class CardFieldError(ValueError):
    """A field of a card that is missing, unknown or of the wrong type; the message names it."""


class NotJsonError(CardFieldError):
    """A record's text that is not JSON at all."""


@functools.cache
def type_adapter(kind) -> TypeAdapter:
    """One TypeAdapter per type, built once (building one compiles its validator): the card's records, and
    the API's answers (pneumonia/web/schemas.py: built)."""
    return TypeAdapter(kind)


def parsed_record(kind, content, where: str = ""):
    """`content` (JSON text, or parsed JSON) as the record type `kind`, read strictly as JSON is (1 is a float,
    true is not an int, "0.5" is not a float); CardFieldError naming the first bad field (under `where`, the
    name of the record in its file)."""
    text = content if isinstance(content, (str, bytes)) else json.dumps(content)
    try:
        return type_adapter(kind).validate_json(text, strict=True)
    except ValidationError as err:
        error = err.errors()[0]
        if error["type"] == "json_invalid":
            raise NotJsonError(f"not JSON ({error['ctx']['error']})") from None
        raise CardFieldError(field_error(error, where)) from None


def as_json(value) -> dict:
    """A card or one of its records as parsed JSON, leaving out the `optional()` fields without a value."""
    return type_adapter(type(value)).dump_python(value)


# What the field's value should have been, by pydantic's error type.
EXPECTED = {
    "float_type": "float",
    "float_parsing": "float",
    "int_type": "int",
    "int_parsing": "int",
    "int_from_float": "int",
    "string_type": "str",
    "bool_type": "bool",
    "bool_parsing": "bool",
    "list_type": "a list",
    "dict_type": "an object",
    "dataclass_type": "an object",
}


def field_error(error: dict, where: str = "") -> str:
    """One pydantic error as the card's readers read it: "field thresholds.screening is missing"."""
    parts = [where, *error["loc"]] if where else list(error["loc"])
    name = _path(*parts) or "the card"
    kind = error["type"]
    if kind == "missing":
        return f"field {name} is missing"
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        return f"unknown field {name}"
    if kind == "literal_error":
        parent = _path(*parts[:-1]) or "the card"
        return f"{parent}: {parts[-1]} {error['input']!r} is not one of {error['ctx']['expected']}"
    if kind == "value_error":  # a record's own check
        return f"{name}: {error['ctx']['error']}"
    if kind in EXPECTED:
        return f"{name} should be {EXPECTED[kind]}, not {json.dumps(error['input'])[:40]}"
    return f"{name}: {error['msg']}"


def _path(*parts) -> str:
    """("lineage", 0, "started_from") -> "lineage[0].started_from"."""
    text = ""
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part != "":
            text += f".{part}" if text else part
    return text
