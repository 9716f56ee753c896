"""Access keys (pneumonia/web/access.py): every route but /healthz and static files needs a key when keys
are set, as a Bearer token or an HTTP Basic password; a wrong, missing or unreadable credential is a 401
with the challenge of its kind, never a 500; too many wrong ones from one client are a 429; settings that
cannot be meant stop the start-up; no key ever reaches the log."""

from __future__ import annotations

import base64
import logging

import pytest
from builders import ACCESS_KEYS, upload, xray_jpeg
from flask import Flask, request

from pneumonia.web import access
from pneumonia.web.access import AccessKeyError
from pneumonia.web.settings import configure, settings

WRONG_KEY = "wrong-key-7a1c9e3f5b2d"
FILE_KEY = "file-key-6e2b8f4a0d17"

# (method, path, status with a right key): every kind of route the app has, and one it has not.
ROUTES = [
    ("GET", "/", 200),
    ("POST", "/predict", 200),
    ("GET", "/model", 200),
    ("GET", "/model/report/nothing.png", 404),
    ("POST", "/api/predict", 200),
    ("POST", "/api/predict/batch", 200),
    ("GET", "/openapi.json", 200),
    ("GET", "/no-such-page", 404),
]


def basic(password: str, user: str = "radiology") -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


def send(app, method: str, path: str, authorization: str | None = None, address: str = "10.9.0.1"):
    headers = {"Authorization": authorization} if authorization is not None else {}
    data = upload(xray_jpeg(300, 260)) if method == "POST" else None
    return app.test_client().open(
        path, method=method, data=data, headers=headers, environ_base={"REMOTE_ADDR": address}
    )


def bare_app(**config) -> Flask:
    """A Flask app with only the access check and one JSON route: start-up checks without a model."""
    app = Flask(__name__)
    configure(app, config, environ={})
    access.register(app)
    app.add_url_rule("/api/echo", "echo", lambda: "ok")
    return app


@pytest.mark.parametrize("method, path, status", ROUTES, ids=[f"{m} {p}" for m, p, _ in ROUTES])
def test_each_route_needs_a_key_as_bearer_or_basic(keyed_app, method, path, status):
    api = path.startswith("/api/") or path == "/openapi.json"
    scheme = "Bearer" if api else "Basic"
    for authorization in [None, f"Bearer {WRONG_KEY}", basic(WRONG_KEY)]:  # 2 wrong keys: under keyed_app's 3
        refused = send(keyed_app, method, path, authorization)
        assert refused.status_code == 401, (authorization, refused.get_data(as_text=True)[:200])
        assert refused.headers["WWW-Authenticate"].startswith(f'{scheme} realm="pneumonia screening"')
        assert WRONG_KEY not in refused.get_data(as_text=True)
        if api:
            assert refused.get_json()["status"] == 401 and refused.get_json()["error"]
        else:
            assert "An access key is needed" in refused.get_data(as_text=True)
        assert (refused.headers.get("Connection") == "close") == (method == "POST")  # the body was not read
    for key in ACCESS_KEYS:
        for authorization in (f"Bearer {key}", basic(key), basic(key, user="")):
            answered = send(keyed_app, method, path, authorization)
            assert answered.status_code == status, (authorization[:6], answered.get_data(as_text=True)[:200])


def test_healthz_and_static_files_need_no_key(keyed_app):
    client = keyed_app.test_client()
    assert client.get("/healthz").status_code == 200
    for name in ("style.css", "app.js", "favicon.svg"):
        assert client.get(f"/static/{name}").status_code == 200


def test_without_keys_the_app_is_open_and_says_so_once_at_start_up(web_app, caplog):
    assert web_app.extensions["access_guard"] is None
    assert web_app.test_client().get("/").status_code == 200
    assert web_app.test_client().post("/api/predict?gradcam=0", data=upload(xray_jpeg())).status_code == 200
    with caplog.at_level(logging.INFO):
        bare_app()
    said = [record for record in caplog.records if record.getMessage().startswith("Access:")]
    assert len(said) == 1 and said[0].levelno == logging.WARNING and "open" in said[0].getMessage()
    with caplog.at_level(logging.INFO):
        bare_app(ACCESS_KEYS=",".join(ACCESS_KEYS))
    assert "Access: 2 key(s)" in caplog.text


def test_the_served_document_declares_the_key_only_when_keys_are_set(keyed_app, web_app):
    keyed = keyed_app.test_client().get("/openapi.json", headers={"Authorization": f"Bearer {ACCESS_KEYS[0]}"})
    document = keyed.get_json()
    assert document["security"] == [{"accessKey": []}, {"accessKeyBasic": []}]
    assert document["components"]["securitySchemes"]["accessKey"] == {
        "type": "http",
        "scheme": "bearer",
        "description": document["components"]["securitySchemes"]["accessKey"]["description"],
    }
    assert document["info"]["x-limits"]["access"]["keys_required"] is True
    assert document["paths"]["/healthz"]["get"]["security"] == []
    open_document = web_app.test_client().get("/openapi.json").get_json()
    assert "security" not in open_document and open_document["info"]["x-limits"]["access"]["keys_required"] is False


def test_keys_from_a_file_and_a_config_var_are_all_valid(tmp_path):
    secret = tmp_path / "keys"
    secret.write_text(f"# rotated 2026-12-01\n\n  {ACCESS_KEYS[1]}  \n{FILE_KEY}\n")
    app = bare_app(ACCESS_KEYS=ACCESS_KEYS[0], ACCESS_KEYS_FILE=str(secret))
    client = app.test_client()
    for key in (ACCESS_KEYS[0], ACCESS_KEYS[1], FILE_KEY):
        assert client.get("/api/echo", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    assert client.get("/api/echo", headers={"Authorization": "Bearer rotated-2026-12-01-x"}).status_code == 401
    only_file = bare_app(ACCESS_KEYS_FILE=str(secret)).test_client()
    assert only_file.get("/api/echo", headers={"Authorization": f"Bearer {ACCESS_KEYS[0]}"}).status_code == 401
    assert only_file.get("/api/echo", headers={"Authorization": f"Bearer {FILE_KEY}"}).status_code == 200


@pytest.mark.parametrize(
    "setting, value, complaint",
    [
        ("ACCESS_KEYS", "", "holds no key"),
        ("ACCESS_KEYS", " , ,", "holds no key"),
        ("ACCESS_KEYS", f"{ACCESS_KEYS[0]},short-key", "key 2 is shorter than 16"),
        ("ACCESS_KEYS", "has a space-0123456789", "key 1 is empty or has spaces or non-ASCII"),
        ("ACCESS_KEYS", "clé-secrète-0123456789", "key 1 is empty or has spaces or non-ASCII"),
        ("ACCESS_KEYS_FILE", "/nonexistent/keys", "cannot be read: FileNotFoundError"),
    ],
)
def test_settings_that_cannot_be_meant_stop_the_start_up(setting, value, complaint):
    with pytest.raises(AccessKeyError) as raised:
        bare_app(**{setting: value})
    assert complaint in str(raised.value)
    for key in ("short-key", "has a space", "clé", ACCESS_KEYS[0]):
        assert key not in str(raised.value)  # a key is named by its position, never by its value


def test_a_keys_file_without_keys_or_in_another_encoding_stops_the_start_up(tmp_path):
    empty = tmp_path / "empty"
    empty.write_text("# keys go here\n\n")
    latin1 = tmp_path / "latin1"
    latin1.write_bytes("clé-secrète-0123456789\n".encode("latin-1"))
    for path, complaint in ((empty, "holds no key"), (latin1, "cannot be read: UnicodeDecodeError")):
        with pytest.raises(AccessKeyError, match=complaint):
            bare_app(ACCESS_KEYS_FILE=str(path))


def test_create_app_does_not_start_open_when_the_keys_are_unusable(tmp_path):
    from pneumonia.web import create_app

    with pytest.raises(AccessKeyError, match="holds no key"):
        create_app({"MODEL_PATH": str(tmp_path), "TESTING": True, "ACCESS_KEYS": ","})


def test_a_key_that_looks_like_a_number_is_read_as_its_text(monkeypatch):
    """Read as JSON (Flask's from_prefixed_env), 12345678901234567e3 would become 1.2345678901234567e+19."""
    monkeypatch.setenv("PNEUMONIA_ACCESS_KEYS", "12345678901234567e3")
    app = Flask(__name__)
    configure(app, {})
    assert settings(app).access_keys == "12345678901234567e3"
    access.register(app)
    app.add_url_rule("/api/echo", "echo", lambda: "ok")
    client = app.test_client()
    assert client.get("/api/echo", headers={"Authorization": "Bearer 12345678901234567e3"}).status_code == 200
    assert client.get("/api/echo", headers={"Authorization": "Bearer 1.2345678901234567e+19"}).status_code == 401


@pytest.mark.parametrize(
    "authorization",
    [
        "",
        "Bearer",
        "Bearer ",
        "Basic",
        "Basic !!!not-base64!!!",
        "Basic " + base64.b64encode(ACCESS_KEYS[0].encode()).decode(),  # no "user:" before the key
        f"Digest {ACCESS_KEYS[0]}",
        f"{ACCESS_KEYS[0]}",
        f"Bearer {ACCESS_KEYS[0]} {ACCESS_KEYS[1]}",
        f"Bearer {ACCESS_KEYS[0]}\u00e9",
        "Bearer ключ-доступа-0123456789",
        "Basic " + base64.b64encode("radiology:ключ-доступа".encode()).decode(),
        f"Bearer {ACCESS_KEYS[0][:-1]}\x00",
    ],
)
def test_a_malformed_or_foreign_credential_is_a_401_never_a_500(authorization):
    app = bare_app(ACCESS_KEYS=",".join(ACCESS_KEYS), ACCESS_FAILURES_LIMIT="100 per minute")
    response = app.test_client().get("/api/echo", headers={"Authorization": authorization})
    assert response.status_code == 401 and response.headers["WWW-Authenticate"].startswith("Bearer ")
    assert response.get_json()["error"] == "That access key is not valid here."


def test_wrong_keys_are_limited_per_client_and_a_missing_key_is_not_a_failure(keyed_app):
    right = f"Bearer {ACCESS_KEYS[0]}"
    for _ in range(3):  # keyed_app: 3 wrong keys a minute
        assert send(keyed_app, "GET", "/openapi.json", basic(WRONG_KEY), "10.9.3.1").status_code == 401
    limited = send(keyed_app, "GET", "/openapi.json", right, "10.9.3.1")  # whatever it sends now
    assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1
    assert "Too many wrong access keys" in limited.get_json()["error"]
    page = send(keyed_app, "GET", "/", basic(ACCESS_KEYS[0]), "10.9.3.1")
    assert page.status_code == 429 and "Too many wrong access keys" in page.get_data(as_text=True)
    assert send(keyed_app, "GET", "/openapi.json", right, "10.9.3.2").status_code == 200  # another client
    for _ in range(5):  # a browser's first request carries no credential: it learns it must ask
        assert send(keyed_app, "GET", "/", None, "10.9.3.3").status_code == 401
    assert send(keyed_app, "GET", "/", basic(ACCESS_KEYS[1]), "10.9.3.3").status_code == 200


def test_the_credential_leaves_the_request_once_read(keyed_app):
    """gunicorn's access log prints the user name of a Basic header (`%(u)s`) from the WSGI environ the
    app saw: a person who types the key as the user name must not find it there."""
    from gunicorn.glogging import Logger

    for path in ("/", "/healthz", "/static/style.css"):
        headers = {"Authorization": basic("", user=ACCESS_KEYS[0])}
        with keyed_app.test_request_context(path, headers=headers, environ_base={"REMOTE_ADDR": "10.9.4.1"}):
            environ = request.environ  # the dict gunicorn logs from once the answer is sent
            keyed_app.preprocess_request()
            assert "HTTP_AUTHORIZATION" not in environ and Logger._get_user(None, environ) is None
    assert Logger._get_user(None, {"HTTP_AUTHORIZATION": basic("", user=ACCESS_KEYS[0])}) == ACCESS_KEYS[0]


def test_no_key_reaches_the_log(caplog, tmp_path):
    secret = tmp_path / "keys"
    secret.write_text(ACCESS_KEYS[1] + "\n")
    with caplog.at_level(logging.DEBUG):
        app = bare_app(ACCESS_KEYS=ACCESS_KEYS[0], ACCESS_KEYS_FILE=str(secret), ACCESS_FAILURES_LIMIT="2 per minute")
        client = app.test_client()
        for authorization in (f"Bearer {ACCESS_KEYS[0]}", basic(ACCESS_KEYS[1]), f"Bearer {WRONG_KEY}"):
            client.get("/api/echo", headers={"Authorization": authorization})
        for _ in range(3):
            client.get("/api/echo", headers={"Authorization": basic(WRONG_KEY)})
        client.get("/api/echo?key=" + WRONG_KEY)
    refused = [record for record in caplog.records if record.getMessage().startswith("Access refused")]
    assert len(refused) == 2 and "127.0.0.1" in refused[0].getMessage()  # the log says who, and where
    logged = caplog.text + " ".join(str(record.args) for record in caplog.records)
    for secret_text in (*ACCESS_KEYS, WRONG_KEY, basic(WRONG_KEY).split()[1], basic(ACCESS_KEYS[1]).split()[1]):
        assert secret_text not in logged


def test_a_refused_path_cannot_write_lines_into_the_log(caplog):
    app = bare_app(ACCESS_KEYS=ACCESS_KEYS[0])
    with caplog.at_level(logging.WARNING):
        response = app.test_client().get("/api/x%0AAccess: 2 key(s)", headers={"Authorization": f"Bearer {WRONG_KEY}"})
    assert response.status_code == 401
    [record] = [record for record in caplog.records if record.getMessage().startswith("Access refused")]
    assert "\n" not in record.getMessage() and "\\n" in record.getMessage()
