"""The API's contract, the OpenAPI document generated from the operations of its views (pneumonia/web/openapi.py,
operations.py, schemas.py): a valid OpenAPI 3.1 document whose examples conform to their schemas, served at
/openapi.json with this server's limits; it documents every JSON route the app has and nothing else, and every
status it documents for an operation is one the app really answers there (made to happen through
app.test_client()), with a body and headers that conform to it. Its query flags are read as documented."""

from __future__ import annotations

import io
import json
import re

import pytest
import schemathesis
from builders import ACCESS_KEYS, REAL_XRAYS, encode_image, upload
from flask import Blueprint
from jsonschema import Draft202012Validator
from openapi_spec_validator import OpenAPIV31SpecValidator, validate
from PIL import Image
from schemathesis.core.failures import FailureGroup

from pneumonia.web.api import bp
from pneumonia.web.openapi import document, generated
from pneumonia.web.queries import NO, YES
from pneumonia.web.settings import Settings, settings

SPEC = document(Settings(), bp)  # as a server with the default settings serves it
XRAY = REAL_XRAYS[0].read_bytes()
COLOUR_PHOTO = encode_image(Image.new("RGB", (300, 300), (200, 30, 30)), "PNG")  # the gate refuses it (colour)


def documented_statuses() -> set[tuple[str, str, int]]:
    return {
        (path, method.upper(), int(status))
        for path, item in SPEC["paths"].items()
        for method, operation in item.items()
        for status in operation["responses"]
    }


@pytest.fixture(scope="module")
def contract():
    return schemathesis.openapi.from_dict(SPEC)


@pytest.fixture
def not_ready_app(tmp_path):
    """No model (the folder is empty); per-client limits on, 1 upload and 1 page a minute; made for each
    test (no model to load), so its counts start at nothing."""
    from pneumonia.web import create_app

    config = {"MODEL_PATH": str(tmp_path), "TESTING": True, "RATE_LIMIT_ENABLED": True}
    return create_app({**config, "RATE_LIMIT_UPLOADS": "1 per minute", "RATE_LIMIT_PAGES": "1 per minute"})


def test_the_document_is_a_valid_openapi_3_1_document():
    validate(SPEC, cls=OpenAPIV31SpecValidator)
    assert SPEC["openapi"].startswith("3.1.")


def test_the_served_document_is_valid_and_states_this_servers_limits(not_ready_app, monkeypatch):
    changed = not_ready_app.extensions["settings"].model_copy(update={"batch_max_files": 7})
    monkeypatch.setitem(not_ready_app.extensions, "settings", changed)
    response = not_ready_app.test_client().get("/openapi.json")
    served = response.get_json()
    validate(served, cls=OpenAPIV31SpecValidator)
    limits = served["info"]["x-limits"]
    assert limits["batch_max_files"] == 7 and limits["max_content_length_bytes"] == 20 * 1024 * 1024
    assert limits["rate_limit"]["enabled"] is True and limits["rate_limit"]["uploads"] == "1 per minute"
    body = served["paths"]["/api/predict/batch"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert body["schema"]["properties"]["file"]["maxItems"] == 7
    body["schema"]["properties"]["file"]["maxItems"] = 100
    assert served["paths"] == SPEC["paths"]  # nothing else differs from the default settings' document


def test_every_json_route_of_the_app_is_documented_and_nothing_else(shipped_app):
    json_routes = {
        (rule.rule, method)
        for rule in shipped_app.url_map.iter_rules()
        if rule.rule.startswith("/api/") or rule.rule in ("/healthz", "/openapi.json")
        for method in rule.methods - {"HEAD", "OPTIONS"}
    }
    documented = {(path, method.upper()) for path, item in SPEC["paths"].items() for method in item}
    assert documented == json_routes


def schema_errors(schema: dict, value) -> list[str]:
    """How `value` fails `schema` (a schema of SPEC, its references resolved in SPEC's components)."""
    validator = Draft202012Validator({**schema, "components": SPEC["components"]})
    return [error.message for error in validator.iter_errors(value)]


def examples() -> list[tuple[str, dict, object]]:
    """(where, schema, value) of every example of the document: answers' and query parameters'."""
    found = []
    for path, item in SPEC["paths"].items():
        for method, operation in item.items():
            for status, answer in operation["responses"].items():
                answer = (
                    SPEC["components"]["responses"][answer["$ref"].rsplit("/", 1)[1]] if "$ref" in answer else answer
                )
                for media, content in answer.get("content", {}).items():
                    for name, example in content.get("examples", {}).items():
                        found.append((f"{method} {path} {status} {media} {name}", content["schema"], example["value"]))
            for parameter in operation.get("parameters", []):
                for value in parameter["schema"].get("examples", []):
                    found.append((f"{method} {path} ?{parameter['name']}={value}", parameter["schema"], value))
    return found


def test_every_example_conforms_to_its_schema_and_a_wrong_one_does_not():
    found = examples()
    assert len(found) >= 20  # every answer with a body has one
    assert [
        (where, schema_errors(schema, value)) for where, schema, value in found if schema_errors(schema, value)
    ] == []
    where, schema, value = next(example for example in found if example[0].endswith("200 application/json normal"))
    assert schema_errors(schema, {**value, "ood": {"verdict": "rejected", "reason": "colour"}})


def test_a_route_of_the_api_without_an_operation_is_refused_by_the_generator():
    undocumented = Blueprint("undocumented", __name__)
    undocumented.get("/api/secret")(lambda: "")
    with pytest.raises(ValueError, match=r"/api/secret \(undocumented.<lambda>\) has no @documented operation"):
        generated(undocumented)


@pytest.mark.parametrize("path", ["/api/predict", "/api/predict/batch"])
def test_the_query_flags_take_the_documented_words_and_refuse_others_as_documented(path, contract, shipped_app):
    (gradcam,) = [p for p in SPEC["paths"][path]["post"]["parameters"] if p["name"] == "gradcam"]
    words = [*YES, *NO]
    assert all(re.fullmatch(gradcam["schema"]["pattern"], w) for w in words + [w.upper() for w in words])
    client = shipped_app.test_client()
    for value, on in [("TRUE", True), ("Yes", True), ("1", True), ("False", False), ("no", False), ("0", False)]:
        response = client.post(f"{path}?gradcam={value}&overlay=png", data=upload(XRAY))
        body = response.get_json()
        overlay = body[0].get("gradcam_png") if path.endswith("batch") else body["gradcam_png"]
        assert response.status_code == 200 and (overlay is not None) == on, (value, response.status_code)
    for value in ("maybe", "on", ""):
        assert not re.fullmatch(gradcam["schema"]["pattern"], value)
        response = client.post(f"{path}?gradcam={value}", data=upload(XRAY))
        assert response.status_code == 400, value
        assert response.get_json()["error"] == f"gradcam={value}: choose one of 1, true, yes, 0, false, no."
        contract[path]["POST"].validate_response(response)


def test_the_pages_link_the_document(shipped_app):
    response = shipped_app.test_client().get("/")
    assert '</openapi.json>; rel="service-desc"' in response.headers["Link"]


# --- every documented status, made to happen ------------------------------------------------


@pytest.fixture(scope="module")
def locked_app(tmp_path_factory):
    """No model, and access keys: what a request without a key meets."""
    from pneumonia.web import create_app

    return create_app(
        {"MODEL_PATH": str(tmp_path_factory.mktemp("locked")), "TESTING": True, "ACCESS_KEYS": ",".join(ACCESS_KEYS)}
    )


def _busy(app, monkeypatch):
    capacity = app.extensions["model_capacity"]
    monkeypatch.setattr(capacity, "running", capacity.slots)  # every slot taken...
    monkeypatch.setattr(capacity, "max_wait_s", 0.0)  # ...and no wait allowed: 503 at once


def _failing(app, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(app.extensions["screener"].batch, "score", fail)


def _rate_limited(app, client, path, method):
    """The first request of a fresh address is let in, the second is over the limit."""
    send = client.post if method == "POST" else client.get
    send(path, environ_base={"REMOTE_ADDR": f"10.2.0.{len(path)}"})
    return send(path, environ_base={"REMOTE_ADDR": f"10.2.0.{len(path)}"})


def produce(case, shipped_app, not_ready_app, monkeypatch, request):
    """The response for (path, method, status): the request, and the app's state, that gives it."""
    path, method, status = case
    if status in (408, 413, 500, 503):  # made to happen by changing the app: one made for this test
        shipped_app = request.getfixturevalue("fresh_shipped_app")
    client = shipped_app.test_client()
    batch = path.endswith("/batch")
    if path == "/healthz":
        return (client if status == 200 else not_ready_app.test_client()).get(path)
    if status == 401:
        locked = request.getfixturevalue("locked_app").test_client()
        return locked.post(path, data=upload(XRAY)) if method == "POST" else locked.get(path)
    if status == 429:
        return _rate_limited(not_ready_app, not_ready_app.test_client(), path, method)
    if path in ("/openapi.json", "/api/monitor"):
        return client.get(path)
    one = upload({200: XRAY, 415: b"notes", 422: COLOUR_PHOTO}.get(status, XRAY), "x.jpeg")
    form = {"file": [one["file"], upload(XRAY)["file"]]} if batch else one
    if status == 400:
        return client.post(path, data={} if batch else {"file": (io.BytesIO(b""), "")})
    if status == 501:  # DICOM results on the serving install, without the pacs extra
        request.getfixturevalue("without_highdicom")
        return client.post(f"{path}?result=dicom-sr", data=form)
    if status == 408:
        monkeypatch.setattr(shipped_app.wsgi_app, "total_s", 0.0)  # pneumonia.web.uploads BodyDeadline: no time at all
    if status == 413 and batch:
        at_most_one = settings(shipped_app).model_copy(update={"batch_max_files": 1})
        monkeypatch.setitem(shipped_app.extensions, "settings", at_most_one)
    if status == 413 and not batch:
        monkeypatch.setitem(shipped_app.config, "MAX_CONTENT_LENGTH", 1)  # Flask reads its own limit from app.config
    if status == 500:
        _failing(shipped_app, monkeypatch)
    if status == 503:
        _busy(shipped_app, monkeypatch)
    return client.post(path, data=form)


@pytest.mark.parametrize("case", sorted(documented_statuses()), ids=lambda c: f"{c[1]} {c[0]} {c[2]}")
def test_each_documented_status_is_answered_as_documented(
    case, contract, shipped_app, not_ready_app, monkeypatch, request
):
    path, method, status = case
    response = produce(case, shipped_app, not_ready_app, monkeypatch, request)
    assert response.status_code == status, response.get_data(as_text=True)[:300]
    contract[path][method].validate_response(response)  # status documented, body and headers conform
    if status >= 400 and path != "/healthz":
        assert response.get_json()["status"] == status and response.get_json()["error"]
    if status == 429 or (status == 503 and path != "/healthz"):
        assert int(response.headers["Retry-After"]) >= 1


def test_the_model_not_loaded_503_is_documented_for_both_uploads(contract, not_ready_app):
    client = not_ready_app.test_client()
    for path in ("/api/predict", "/api/predict/batch"):
        response = client.post(path, data=upload(XRAY), environ_base={"REMOTE_ADDR": f"10.3.0.{len(path)}"})
        assert response.status_code == 503 and "not loaded" in response.get_json()["error"]
        assert "Retry-After" not in response.headers
        contract[path]["POST"].validate_response(response)


def test_the_batch_entries_of_every_kind_conform(contract, shipped_app):
    kinds = [(XRAY, "a.jpeg"), (COLOUR_PHOTO, "b.png"), (b"hi", "c.txt"), (XRAY[:400], "d")]
    files = [(io.BytesIO(data), name) for data, name in kinds]
    response = shipped_app.test_client().post("/api/predict/batch?gradcam=1", data={"file": files})
    assert [entry["status"] for entry in response.get_json()] == [200, 422, 415, 400]
    contract["/api/predict/batch"]["POST"].validate_response(response)


@pytest.mark.parametrize("query", ["?gradcam=0", "?overlay=JPEG", "?overlay=png", "?gradcam=no&overlay=PNG"])
def test_the_query_parameters_answer_as_documented(query, contract, shipped_app):
    response = shipped_app.test_client().post(f"/api/predict{query}", data=upload(XRAY))
    body = response.get_json()
    field = "gradcam_png" if "png" in query.lower() else "gradcam_jpeg"
    assert response.status_code == 200 and field in body
    assert (body[field] is None) == ("gradcam=" in query)
    contract["/api/predict"]["POST"].validate_response(response)


def test_a_wrong_answer_fails_the_contract(contract, shipped_app):
    """The check can fail: a 200 without its probability, or with a refusing gate verdict, does not conform
    (a failure, or several at once: the verdict is also one the `ood` discriminator does not list)."""
    response = shipped_app.test_client().post("/api/predict?gradcam=0", data=upload(XRAY))
    contract["/api/predict"]["POST"].validate_response(response)
    body = response.get_json()
    refused = {"verdict": "rejected", "reason": "colour", "score": 1, "threshold": 0}
    for wrong in ({"probability": None}, {"ood": refused}):
        response.set_data(json.dumps({**body, **wrong}))
        with pytest.raises((AssertionError, FailureGroup)):
            contract["/api/predict"]["POST"].validate_response(response)
