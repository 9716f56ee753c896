"""The decoding sandbox in the web app (pneumonia/web/decoders.py): a decode past the memory or the
processor-time limit is that upload's 400 saying which limit, while an X-ray sent at the same time is
screened; no free decoder within the wait is a 503 with Retry-After; no decode holds a model slot."""

from __future__ import annotations

import threading

import pytest
from builders import app_on, upload, xray_jpeg

from bench.bombs import png_of_zeros
from pneumonia.serving.sandbox import DecodeLimits, shared_sandbox


def _at_once(app, hostile: bytes) -> tuple:
    """(the hostile upload's answer, a real one's sent while it decodes), each from its own client."""
    answers = {}

    def send(name: str, data: bytes) -> None:
        answers[name] = app.test_client().post("/api/predict?gradcam=0", data=upload(data, f"{name}.png"))

    threads = [threading.Thread(target=send, args=("hostile", hostile))]
    threads.append(threading.Thread(target=send, args=("xray", xray_jpeg())))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return answers["hostile"], answers["xray"]


@pytest.mark.parametrize(
    ("settings", "hostile", "message"),
    [
        ({"DECODE_MEMORY_MIB": 24}, lambda: png_of_zeros(6_000, bit_depth=8), "within 24 MiB of memory"),
        # 0.24 to 0.29 s of processor time (tests/test_sandbox.py: SLOW_SIDE), over twice the limit
        ({"DECODE_SECONDS": 0.1}, lambda: png_of_zeros(5_000), "within 0.1 s of processor time"),
    ],
)
def test_a_decode_past_a_limit_is_a_400_while_an_x_ray_beside_it_is_screened(
    ungated_model_dir, settings, hostile, message
):
    app = app_on(ungated_model_dir, **settings)
    refused, screened = _at_once(app, hostile())
    assert refused.status_code == 400 and message in refused.get_json()["error"]
    assert screened.status_code == 200 and screened.get_json()["probability"] is not None
    assert app.extensions["model_capacity"].running == 0  # no slot was left taken


def test_no_decoder_free_within_the_wait_is_a_503_with_retry_after(ungated_model_dir):
    app = app_on(ungated_model_dir, DECODERS=1, DECODE_QUEUE_SECONDS=0.2, DECODE_SECONDS=30)
    slow = threading.Thread(
        target=app.test_client().post, args=("/api/predict",), kwargs={"data": upload(png_of_zeros(5_000))}
    )
    slow.start()
    sandbox = app.extensions["decoding_sandbox"]
    while sandbox._idle.qsize():  # until the slow upload holds the one decoder
        threading.Event().wait(0.01)
    busy = app.test_client().post("/api/predict", data=upload(xray_jpeg()))
    slow.join(60)
    assert busy.status_code == 503 and busy.headers["Retry-After"] == "30" and "decoding" in busy.get_json()["error"]


def test_a_slow_decode_does_not_hold_a_model_slot(ungated_model_dir):
    """With one model slot, an upload decoding for a while leaves the slot free for another."""
    app = app_on(ungated_model_dir, MODEL_SLOTS=1, DECODE_SECONDS=30)
    capacity = app.extensions["model_capacity"]
    seen = []
    sandbox = app.extensions["decoding_sandbox"]
    prepare = sandbox.prepare

    def watched(source, *args, **kwargs):
        seen.append(capacity.running)
        return prepare(source, *args, **kwargs)

    sandbox.prepare = watched
    try:
        assert app.test_client().post("/api/predict", data=upload(xray_jpeg())).status_code == 200
    finally:
        del sandbox.prepare
    assert seen == [0]


def test_the_apps_of_one_process_share_a_sandbox_per_setting(ungated_model_dir):
    first, second = app_on(ungated_model_dir), app_on(ungated_model_dir)
    assert first.extensions["decoding_sandbox"] is second.extensions["decoding_sandbox"]
    assert first.extensions["decoding_sandbox"] is shared_sandbox(DecodeLimits(128, 2.0), 2, 5.0)
