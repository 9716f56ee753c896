"""Static files (pneumonia/web/static_files.py): content-hashed URLs cached for a year, others revalidated
by ETag; the vendored WebAssembly only under /device/; large bodies bounded per worker."""

from __future__ import annotations

import re

from builders import SHIPPED_MODEL, app_on


def test_a_hashed_static_url_is_immutable_and_any_other_revalidates(web_app):
    client = web_app.test_client()
    page = client.get("/").get_data(as_text=True)
    [url] = re.findall(r'href="(/static/style\.css\?v=[0-9a-f]{16})"', page)
    fresh = client.get(url)
    assert fresh.status_code == 200 and fresh.headers["Cache-Control"] == "public, max-age=31536000, immutable"
    for stale in ("/static/style.css", "/static/style.css?v=0000000000000000"):
        answer = client.get(stale)
        assert answer.status_code == 200 and answer.headers["Cache-Control"] == "no-cache" and answer.headers["ETag"]
        assert client.get(stale, headers={"If-None-Match": answer.headers["ETag"]}).status_code == 304


def test_the_vendored_runtime_is_served_under_device_only(shipped_app):
    client = shipped_app.test_client()
    assert client.get("/static/vendor/ort-wasm-simd-threaded.wasm").status_code == 404
    wasm = client.get("/device/static/vendor/ort-wasm-simd-threaded.wasm")
    assert wasm.status_code == 200 and wasm.headers["ETag"] and wasm.content_length > 10_000_000
    wasm.close()


def test_large_bodies_beyond_the_transfer_slots_are_503_until_one_is_sent():
    app = app_on(SHIPPED_MODEL, STATIC_TRANSFERS=1)
    client = app.test_client()
    path = "/device/static/vendor/ort-wasm-simd-threaded.wasm"
    sending = client.get(path, buffered=False)  # its body not yet sent: it holds the slot
    refused = client.get(path)
    assert sending.status_code == 200 and refused.status_code == 503 and refused.headers["Retry-After"] == "1"
    assert client.get("/device/static/style.css").status_code == 200  # a small file needs no slot
    sending.close()
    again = client.get(path)
    assert again.status_code == 200
    again.close()
