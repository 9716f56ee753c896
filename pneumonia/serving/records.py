"""Records read from JSON (the model card, the gate's metadata): dataclasses checked field by field on
load, with an error naming the field, and written back in the same shape.

Hand-written rather than pydantic, cattrs or msgspec: the whole validator is the ~70 lines below, its
errors name the field as the card's readers know it ("preprocessing.normalization.std[2]"), and the slim
serving install (requirements.txt) stays without another compiled dependency.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import field

# A field that a card (or one of its records) leaves out when it has no value, as cards always have:
# `to_dict` omits it, `load` reads its absence as None. Other fields that may be None are written as null.
OMITTED_WHEN_NONE = "omitted when None"


def optional():
    return field(default=None, metadata={OMITTED_WHEN_NONE: True})


class CardFieldError(ValueError):
    """A field of a card that is missing, unknown or of the wrong type; the message names it."""


def parsed_record(kind, content, where: str = ""):
    """`content` (parsed JSON) as the record type `kind`, checked field by field; CardFieldError naming the
    field (under `where`, the name of the record in its file)."""
    return _typed(kind, content, where)


def _typed(kind, value, where: str):
    """`value` (parsed JSON) as `kind` (a card dataclass or a typing annotation), or CardFieldError."""
    name = where or "the card"
    origin = typing.get_origin(kind)
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, dict):
            raise CardFieldError(f"{name} should be an object")
        fields = {f.name: f for f in dataclasses.fields(kind)}
        unknown = sorted(set(value) - set(fields) - set(getattr(kind, "RETIRED_FIELDS", ())))
        if unknown:
            raise CardFieldError(f"unknown field {_join(where, unknown[0])}")
        hints = typing.get_type_hints(kind)
        given = {}
        for key, spec in fields.items():
            if key in value:
                given[key] = _typed(hints[key], value[key], _join(where, key))
            elif spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
                raise CardFieldError(f"field {_join(where, key)} is missing")
        try:
            return kind(**given)
        except CardFieldError as err:  # a dataclass's own check (__post_init__)
            raise CardFieldError(f"{name}: {err}") from None
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        return _typed(next(option for option in options if option is not type(None)), value, where)
    if origin is list:
        if not isinstance(value, list):
            raise CardFieldError(f"{name} should be a list")
        (item,) = typing.get_args(kind)
        return [_typed(item, entry, f"{where}[{i}]") for i, entry in enumerate(value)]
    if origin is dict or kind is dict:
        if not isinstance(value, dict):
            raise CardFieldError(f"{name} should be an object")
        args = typing.get_args(kind)
        return {k: _typed(args[1], v, _join(where, k)) for k, v in value.items()} if args else value
    return _scalar(kind, value, name)


def as_json(value):
    """A card or one of its records as parsed JSON, leaving out the OMITTED_WHEN_NONE fields without a value."""
    if dataclasses.is_dataclass(value):
        return {
            spec.name: as_json(getattr(value, spec.name))
            for spec in dataclasses.fields(value)
            if not (getattr(value, spec.name) is None and spec.metadata.get(OMITTED_WHEN_NONE))
        }
    if isinstance(value, dict):
        return {key: as_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [as_json(item) for item in value]
    return value


def _scalar(kind, value, name: str):
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind in (str, bool) and isinstance(value, kind):
        return value
    raise CardFieldError(f"{name} should be {kind.__name__}, not {json.dumps(value)[:40]}")


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key
