"""The OpenAPI 3.1 document of the JSON API, generated: each view of the API's blueprint carries its
`Operation` (`@documented`, pneumonia/web/operations.py), whose bodies and parameters are pydantic models
(pneumonia/web/schemas.py) that pydantic writes as JSON Schema. Served at /openapi.json with `info.x-limits`
set to the limits this server enforces (its settings, not the defaults the document's prose names), the
batch's `maxItems` to its BATCH_MAX_FILES, and the document's `security` (an access key,
pneumonia/web/access.py) left out when this server has no keys: it is open."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from flask import Blueprint, Flask
from pydantic import BaseModel, TypeAdapter
from pydantic.json_schema import GenerateJsonSchema

from pneumonia.web.schemas import UPLOAD_TYPES
from pneumonia.web.settings import Settings

VERSION = "3.1.0"
SCHEMAS = "#/components/schemas/{model}"
INFO = {
    "title": "Pneumonia screening API",
    "version": "1.0.0",
    "summary": "Pneumonia screening from chest X-rays. Research tool, not a medical device.",
    "description": """\
The JSON API of the pneumonia-screening app. Not for diagnosis or treatment decisions: a qualified clinician must \
read every X-ray.

**Errors.** Every failure answers `{"error": "<a sentence for a person>", "status": N}` (a 422 adds `ood`).

**Limits** (defaults; `info.x-limits` of the served document has this server's values): a request body of at most \
PNEUMONIA_MAX_CONTENT_LENGTH (20 MB, else 413) arriving within PNEUMONIA_BODY_TIMEOUT (30 s) without a pause over \
PNEUMONIA_BODY_READ_TIMEOUT (10 s, else 408); at most PNEUMONIA_BATCH_MAX_FILES (100) files per batch (else 413); \
an upload expected to wait for the model longer than PNEUMONIA_MODEL_QUEUE_SECONDS (5 s) is answered 503 with \
Retry-After; with PNEUMONIA_RATE_LIMIT_ENABLED, a client sending more than PNEUMONIA_RATE_LIMIT_UPLOADS uploads \
(POST) or PNEUMONIA_RATE_LIMIT_PAGES pages (GET) is answered 429 with Retry-After. /healthz is never limited.

**Access.** When the server has access keys (PNEUMONIA_ACCESS_KEYS or PNEUMONIA_ACCESS_KEYS_FILE; \
`info.x-limits.access` of the served document says), every operation but GET /healthz needs one: `Authorization: \
Bearer KEY` (HTTP Basic with the key as the password is accepted too, as the pages use it). Without a valid key the \
answer is 401 with `WWW-Authenticate`; more than PNEUMONIA_ACCESS_FAILURES_LIMIT wrong keys (10 per minute) from one \
client address are answered 429 with Retry-After, whatever that client then sends. Keys go in the header only, \
never in the URL. Without keys the server is open and the served document declares no security.

GET /model (the model card) is an HTML page and GET /metrics is for Prometheus (its text format, behind the same \
keys): neither is part of this API.""",
}
SECURITY_SCHEMES = {
    "accessKey": {
        "type": "http",
        "scheme": "bearer",
        "description": "One of the server's access keys (PNEUMONIA_ACCESS_KEYS): `Authorization: Bearer KEY`.",
    },
    "accessKeyBasic": {
        "type": "http",
        "scheme": "basic",
        "description": "HTTP Basic, any user name, an access key as the password: what a browser sends for the pages.",
    },
}


@dataclass(frozen=True)
class Body:
    """One media type of an answer: a type pydantic can describe (a model, `list[Model]`, annotated bytes)
    and named examples of it."""

    kind: Any
    examples: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Header:
    description: str
    kind: Any
    required: bool = False


@dataclass(frozen=True)
class Answer:
    """One status of an operation; one with a `name` is shared (components.responses) by the operations it is in."""

    description: str
    content: dict[str, Body] = field(default_factory=dict)
    headers: dict[str, Header] = field(default_factory=dict)
    name: str | None = None


@dataclass(frozen=True)
class Operation:
    operation_id: str
    summary: str
    description: str
    answers: dict[int, Answer]
    query: type[BaseModel] | None = None
    upload: type[BaseModel] | None = None  # a multipart/form-data body
    open: bool = False  # answered without an access key, whatever the server's keys


def documented(operation: Operation):
    """The view's `operation`, which the document describes it by (under the Flask route decorator)."""

    def mark(view):
        view.operation = operation
        return view

    return mark


class DocumentSchemas(GenerateJsonSchema):
    """pydantic's JSON Schema without what the document does not need: titles (a component's name is its
    title) and defaults of None (an optional field of an answer is absent, not null)."""

    def field_title_should_be_set(self, schema) -> bool:
        return False

    def model_schema(self, schema):
        generated = super().model_schema(schema)
        generated.pop("title", None)
        return generated

    def default_schema(self, schema):
        if schema.get("default") is None:
            return self.generate_inner(schema["schema"])
        return super().default_schema(schema)


def inline(kind) -> dict:
    """The JSON Schema of `kind`, whole (for a model of plain fields: query parameters, an upload, a header)."""
    return TypeAdapter(kind).json_schema(schema_generator=DocumentSchemas)


def routes(blueprint: Blueprint) -> list[tuple[str, str, Operation]]:
    """(path, method, operation) of every route of `blueprint`, read from an app that has only it; a view
    without an operation is an error, so that nothing the API answers goes undocumented."""
    app = Flask(__name__, static_folder=None)
    app.register_blueprint(blueprint)
    found = []
    for rule in app.url_map.iter_rules():
        operation = getattr(app.view_functions[rule.endpoint], "operation", None)
        if operation is None:
            raise ValueError(f"{rule.rule} ({rule.endpoint}) has no @documented operation")
        found += [(rule.rule, method.lower(), operation) for method in sorted(rule.methods - {"HEAD", "OPTIONS"})]
    return found


def answer_schemas(operations: list[Operation]) -> tuple[dict[int, dict], dict]:
    """({id(body): its schema}, the models they refer to, by name): every body in one pass, so that each model
    is one component however many answers hold it."""
    bodies = {id(body): body for op in operations for answer in op.answers.values() for body in answer.content.values()}
    inputs = [(key, "serialization", TypeAdapter(body.kind).core_schema) for key, body in bodies.items()]
    generated, models = DocumentSchemas(ref_template=SCHEMAS).generate_definitions(inputs)
    return {key: schema for (key, _), schema in generated.items()}, models


def response(answer: Answer, schemas: dict[int, dict]) -> dict:
    described: dict[str, Any] = {"description": answer.description}
    if answer.content:
        described["content"] = {}
        for media, body in answer.content.items():
            described["content"][media] = {"schema": schemas[id(body)]}
            if body.examples:
                described["content"][media]["examples"] = {name: {"value": v} for name, v in body.examples.items()}
    if answer.headers:
        described["headers"] = {name: header_object(header) for name, header in answer.headers.items()}
    return described


def header_object(header: Header) -> dict:
    described = {"description": header.description, "schema": inline(header.kind)}
    return described | ({"required": True} if header.required else {})


def parameters(query: type[BaseModel]) -> list[dict]:
    schema = inline(query)
    listed = []
    for name, prop in schema["properties"].items():
        described = {"name": name, "in": "query", "required": name in schema.get("required", [])}
        listed.append(described | {"description": prop.pop("description"), "schema": prop})
    return listed


def request_body(upload: type[BaseModel]) -> dict:
    schema = inline(upload)
    encoding = {name: {"contentType": UPLOAD_TYPES} for name in schema["properties"]}
    return {"required": True, "content": {"multipart/form-data": {"schema": schema, "encoding": encoding}}}


def operation_object(operation: Operation, schemas: dict[int, dict], shared: dict[str, dict]) -> dict:
    """The operation as the document writes it; its shared answers added to `shared` (components.responses)."""
    described: dict[str, Any] = {
        "operationId": operation.operation_id,
        "summary": operation.summary,
        "description": operation.description,
    }
    if operation.query:
        described["parameters"] = parameters(operation.query)
    if operation.upload:
        described["requestBody"] = request_body(operation.upload)
    described["responses"] = {}
    for status, answer in sorted(operation.answers.items()):
        if answer.name:
            shared[answer.name] = response(answer, schemas)
            described["responses"][str(status)] = {"$ref": f"#/components/responses/{answer.name}"}
        else:
            described["responses"][str(status)] = response(answer, schemas)
    if operation.open:
        described["security"] = []
    return described


@lru_cache(maxsize=4)
def generated(blueprint: Blueprint) -> dict:
    """The document of `blueprint`'s operations, as any server with keys serves it (before its limits)."""
    found = routes(blueprint)
    schemas, models = answer_schemas([operation for _, _, operation in found])
    paths: dict[str, dict] = {}
    shared: dict[str, dict] = {}
    for path, method, operation in found:
        paths.setdefault(path, {})[method] = operation_object(operation, schemas, shared)
    components = {"schemas": models, "responses": shared, "securitySchemes": SECURITY_SCHEMES}
    security = [{name: []} for name in SECURITY_SCHEMES]
    return {"openapi": VERSION, "info": INFO, "paths": paths, "components": components, "security": security}


def limits(settings: Settings) -> dict:
    """The limits a client meets, from the app's settings (pneumonia/web/settings.py)."""
    return {
        "max_content_length_bytes": settings.max_content_length,
        "max_form_parts": settings.max_form_parts,
        "batch_max_files": settings.batch_max_files,
        "batch_chunk_size": settings.batch_chunk_size,
        "body_timeout_s": settings.body_timeout,
        "body_read_timeout_s": settings.body_read_timeout,
        "model_queue_seconds": settings.model_queue_seconds,
        "rate_limit": {
            "enabled": settings.rate_limit_enabled,
            "uploads": settings.rate_limit_uploads,
            "pages": settings.rate_limit_pages,
            "scope": "per client address, per worker process",
        },
        "access": {
            "keys_required": keys_required(settings),
            "failures_limit": settings.access_failures_limit,
            "scope": "per client address, per worker process",
        },
    }


def keys_required(settings: Settings) -> bool:
    """Whether this server asks for an access key (start-up refuses a set but empty key setting)."""
    return settings.access_keys is not None or bool(settings.access_keys_file)


def document(settings: Settings, blueprint: Blueprint) -> dict:
    """A fresh copy of the document of `blueprint` for an app with `settings` (the caller may change it)."""
    spec = copy.deepcopy(generated(blueprint))
    spec["info"]["x-limits"] = limits(settings)
    batch = spec["paths"]["/api/predict/batch"]["post"]["requestBody"]["content"]["multipart/form-data"]
    batch["schema"]["properties"]["file"]["maxItems"] = settings.batch_max_files
    if not keys_required(settings):
        del spec["security"]
    return spec
