"""Per-client rate limits (pneumonia/web/rate_limit.py): off by default; when on, a client over its limit gets
429 with a Retry-After that is right (JSON for the API, a page for the form), other clients and
/healthz are not affected, and behind a trusted proxy the client is the address it forwarded."""

from __future__ import annotations

import time

import pytest
from builders import upload

from pneumonia.web import create_app

JPEG_ISH = b"\xff\xd8\xff\xe0 not really"  # without a model, every upload let past the limits answers 503


@pytest.fixture(scope="module")
def no_model(tmp_path_factory):
    return str(tmp_path_factory.mktemp("no_model"))  # every upload answers 503: the limits come first


def limited_app(no_model, **settings):
    return create_app({"MODEL_PATH": no_model, "TESTING": True, "RATE_LIMIT_ENABLED": True, **settings})


def post(client, path="/api/predict", address="10.0.0.1", **headers):
    return client.post(path, data=upload(JPEG_ISH), environ_base={"REMOTE_ADDR": address}, headers=headers)


def test_the_limits_are_off_by_default(no_model):
    client = create_app({"MODEL_PATH": no_model, "TESTING": True}).test_client()
    statuses = {post(client).status_code for _ in range(40)}  # more than the default 30 a minute
    assert statuses == {503}


def test_an_api_client_over_its_limit_gets_json_429_with_retry_after(no_model):
    client = limited_app(no_model, RATE_LIMIT_UPLOADS="2 per minute").test_client()
    assert [post(client).status_code for _ in range(2)] == [503, 503]
    refused = post(client)
    assert refused.status_code == 429 and refused.is_json
    assert refused.get_json()["status"] == 429 and "2 per 1 minute" in refused.get_json()["error"]
    assert 1 <= int(refused.headers["Retry-After"]) <= 61
    assert refused.headers["Connection"] == "close"  # the upload was not read
    assert post(client, "/api/predict/batch").status_code == 429  # one count for every upload route


def test_a_form_over_the_limit_gets_the_too_many_page(no_model):
    client = limited_app(no_model, RATE_LIMIT_UPLOADS="1 per minute").test_client()
    post(client, "/predict")
    refused = post(client, "/predict")
    assert refused.status_code == 429 and refused.mimetype == "text/html"
    page = refused.get_data(as_text=True)
    assert 'id="retry-after"' in page and refused.headers["Retry-After"] in page
    assert "Too many requests from this address" in page


def test_pages_have_their_own_limit_and_healthz_none(no_model):
    client = limited_app(no_model, RATE_LIMIT_UPLOADS="1 per minute", RATE_LIMIT_PAGES="2 per minute").test_client()
    post(client), post(client)  # the uploads' limit is spent...
    assert [client.get(path).status_code for path in ("/", "/openapi.json")] == [200, 200]  # ...not the pages'
    assert client.get("/").status_code == 429
    assert {client.get("/healthz").status_code for _ in range(20)} == {503}  # not ready, never limited
    assert client.get("/static/style.css").status_code == 200


def test_clients_are_counted_apart(no_model):
    client = limited_app(no_model, RATE_LIMIT_UPLOADS="1 per minute").test_client()
    assert [post(client, address="10.0.0.1").status_code for _ in range(2)] == [503, 429]
    assert post(client, address="10.0.0.2").status_code == 503


def test_behind_a_trusted_proxy_the_client_is_the_address_it_forwarded(no_model):
    client = limited_app(no_model, RATE_LIMIT_UPLOADS="1 per minute", RATE_LIMIT_PROXY_HOPS=1).test_client()
    router = "10.9.9.9"  # every request arrives from the PaaS router
    assert post(client, address=router, **{"X-Forwarded-For": "198.51.100.1"}).status_code == 503
    assert post(client, address=router, **{"X-Forwarded-For": "198.51.100.2"}).status_code == 503
    # A client cannot pick its key: what it writes to the left of the router's entry does not count.
    spoofed = post(client, address=router, **{"X-Forwarded-For": "1.2.3.4, 198.51.100.1"})
    assert spoofed.status_code == 429


def test_retry_after_says_when_the_next_request_is_let_in(no_model):
    client = limited_app(no_model, RATE_LIMIT_UPLOADS="1 per 2 second").test_client()
    post(client)
    refused = post(client)
    wait = int(refused.headers["Retry-After"])
    assert refused.status_code == 429 and 1 <= wait <= 3
    time.sleep(wait)
    assert post(client).status_code == 503


def test_the_settings_come_from_the_environment(no_model, monkeypatch):
    monkeypatch.setenv("PNEUMONIA_RATE_LIMIT_ENABLED", "true")
    monkeypatch.setenv("PNEUMONIA_RATE_LIMIT_UPLOADS", "1 per minute")
    client = create_app({"MODEL_PATH": no_model, "TESTING": True}).test_client()
    assert [post(client).status_code for _ in range(2)] == [503, 429]
