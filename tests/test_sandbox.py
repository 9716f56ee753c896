"""The decoding sandbox (pneumonia/serving/sandbox.py): what comes back is what `prepare_xray` gives in
this process; a decode past the memory or processor-time limit, or a child that dies, is that file's
4xx-worthy error and the next file is decoded by a fresh child; what a child answers is checked."""

from __future__ import annotations

import io
import os
import signal
import threading
import time

import numpy as np
import pytest
from builders import REAL_XRAYS, xray_jpeg

from bench.bombs import png_of_zeros
from pneumonia.errors import XrayReadError
from pneumonia.reading.decoding import refusal_at_start
from pneumonia.serving.preprocessing import prepare_xray
from pneumonia.serving.sandbox import (
    START_BYTES,
    START_CHECK_FROM,
    DecodeJob,
    DecodeLimitExceeded,
    DecodeLimits,
    DecoderBusy,
    DecodingSandbox,
    _prepared,
)

# A 6,000 x 6,000 greyscale PNG: 34 MiB decoded, within the header checks' 48 MiB, past a 24 MiB sandbox.
BIG_GREY = 6_000
# A 5,000 x 5,000 16-bit PNG: 0.24 to 0.29 s of processor time to decode and scale (measured in process), over
# twice the 0.1 s limit; a small X-ray in a fresh child takes a few ms (the zygote has imported what it runs).
SLOW_SIDE = 5_000


@pytest.fixture(scope="module")
def sandbox():
    sandbox = DecodingSandbox(DecodeLimits(), workers=2)
    yield sandbox
    sandbox.close()


@pytest.mark.parametrize("display_side", [None, 300])
def test_the_sandbox_gives_what_prepare_xray_gives_here(sandbox, display_side):
    for source in (REAL_XRAYS[0].read_bytes(), REAL_XRAYS[1]):  # bytes, and a path the child reads itself
        here = prepare_xray(source, 224, display_side)
        there = sandbox.prepare(source, 224, display_side)
        assert np.array_equal(there.square, here.square) and there.square.shape == (224, 224)
        assert there.stats == here.stats
        assert (there.display is None) == (display_side is None)
        if display_side:
            assert np.array_equal(there.display, here.display) and max(there.display.shape) <= display_side


def test_an_unreadable_file_is_an_xray_read_error_and_the_child_goes_on(sandbox):
    replaced = sandbox.replaced
    with pytest.raises(XrayReadError, match="not a supported image"):
        sandbox.prepare(b"\xff\xd8\xff" + b"junk" * 100, 224)
    assert sandbox.prepare(xray_jpeg(), 224).square.shape == (224, 224)
    assert sandbox.replaced == replaced  # a plain refusal costs no child


def test_a_decode_past_the_memory_limit_is_refused_and_the_next_file_decodes():
    sandbox = DecodingSandbox(DecodeLimits(memory_mib=24), workers=1)
    try:
        with pytest.raises(DecodeLimitExceeded, match="within 24 MiB") as refused:
            sandbox.prepare(png_of_zeros(BIG_GREY, bit_depth=8), 224)
        assert refused.value.limit == "memory" and sandbox.replaced == 1  # the killed child, replaced
        # (the next child may retire too: its peak can pass half of so small a limit, which is not this test's)
        assert sandbox.prepare(xray_jpeg(), 224).square.shape == (224, 224)
    finally:
        sandbox.close()


def test_a_decode_past_the_time_limit_is_killed_and_the_next_file_decodes():
    sandbox = DecodingSandbox(DecodeLimits(seconds=0.1), workers=1)
    try:
        started = time.monotonic()
        with pytest.raises(DecodeLimitExceeded, match="within 0.1 s of processor time") as refused:
            sandbox.prepare(png_of_zeros(SLOW_SIDE), 224)
        assert refused.value.limit == "time" and time.monotonic() - started < 5
        assert sandbox.replaced == 1  # the killed child, replaced
        assert sandbox.prepare(xray_jpeg(), 224).square.shape == (224, 224)
    finally:
        sandbox.close()


def test_a_child_lost_mid_decode_is_replaced_and_the_file_tried_once_more():
    sandbox = DecodingSandbox(DecodeLimits(seconds=30), workers=1)
    try:
        sandbox.prepare(xray_jpeg(), 224)  # the child is up
        [child] = list(sandbox._idle.queue)
        killer = threading.Timer(0.1, os.kill, (child.pid, signal.SIGSEGV))
        killer.start()
        assert sandbox.prepare(png_of_zeros(SLOW_SIDE), 224).square.shape == (224, 224)  # in a fresh child
        assert sandbox.replaced == 2  # the lost child, and the fresh one, retired after so large a decode
    finally:
        sandbox.close()


def test_a_file_that_loses_two_children_is_that_files_error_only():
    sandbox = DecodingSandbox(DecodeLimits(seconds=30), workers=1)
    sandbox.prepare(xray_jpeg(), 224)  # the zygote is up
    zygote = sandbox._zygote.process.pid
    done = threading.Event()

    def kill_every_child() -> None:  # each child the file goes to dies within 20 ms, long before it decodes
        while not done.wait(0.02):
            for pid in open(f"/proc/{zygote}/task/{zygote}/children").read().split():
                os.kill(int(pid), signal.SIGSEGV)

    killer = threading.Thread(target=kill_every_child)
    killer.start()
    try:
        with pytest.raises(DecodeLimitExceeded, match="The decoder stopped on the upload") as refused:
            sandbox.prepare(png_of_zeros(SLOW_SIDE), 224)
        assert refused.value.limit == "crash"
    finally:
        done.set()
        killer.join()
    try:
        assert sandbox.prepare(xray_jpeg(), 224).square.shape == (224, 224)  # the next file: a fresh child
    finally:
        sandbox.close()


def test_no_free_child_within_the_wait_is_decoder_busy():
    sandbox = DecodingSandbox(DecodeLimits(seconds=30), workers=1, wait_s=0.2)
    try:
        slow = threading.Thread(target=sandbox.prepare, args=(png_of_zeros(SLOW_SIDE), 224))
        slow.start()
        time.sleep(0.1)  # the one child is taken
        with pytest.raises(DecoderBusy):
            sandbox.prepare(xray_jpeg(), 224)
        slow.join()
        assert sandbox.prepare(xray_jpeg(), 224).square.shape == (224, 224)
    finally:
        sandbox.close()


def test_dicom_header_values_come_back_as_text(sandbox):
    from builders import PATIENT_NAME, dicom_bytes

    values = sandbox.dicom_header(dicom_bytes(np.zeros((64, 64), np.uint16)), ["PatientName", "Rows", "Modality"])
    assert values["PatientName"] == PATIENT_NAME and values["Rows"] == "64"
    with pytest.raises(XrayReadError):
        sandbox.dicom_header(xray_jpeg(), ["PatientName"])


GOOD = {"stats": [10, 10, 0.0, 5.0], "square": [4, 4], "display": None, "timing_ms": {}, "peak_mib": 1.0}


@pytest.mark.parametrize(
    ("header", "buffers", "display_side"),
    [
        ({**GOOD, "square": [5, 5]}, [b"\0" * 25], None),  # not the square asked for
        (GOOD, [b"\0" * 15], None),  # a buffer of the wrong length
        ({**GOOD, "display": [8, 9]}, [b"\0" * 16, b"\0" * 72], None),  # a display copy not asked for
        ({**GOOD, "display": [8, 9]}, [b"\0" * 16, b"\0" * 72], 8),  # larger than asked
    ],
)
def test_what_a_child_answers_is_checked(header, buffers, display_side):
    with pytest.raises(RuntimeError, match="a decoding child answered"):
        _prepared(header, buffers, DecodeJob("x", 4, display_side))


def test_a_childs_arrays_are_the_buffers_it_sent():
    square = np.arange(16, dtype=np.uint8).reshape(4, 4)
    prepared = _prepared({**GOOD, "display": [2, 3]}, [square.tobytes(), bytes(6)], DecodeJob("x", 4, 3))
    assert np.array_equal(prepared.square, square) and prepared.display.shape == (2, 3)


def test_warming_starts_every_child_before_the_first_file():
    sandbox = DecodingSandbox(DecodeLimits(), workers=2)
    try:
        sandbox.warm()
        children = list(sandbox._idle.queue)
        assert len(children) == 2 and all(child is not None and child.usable for child in children)
        assert sandbox.prepare(xray_jpeg(), 224).square.shape == (224, 224)
        assert sandbox.replaced == 0  # the warm children served it
    finally:
        sandbox.close()


def noise_behind_a_jpeg_signature(size: int, seed: int = 0) -> bytes:
    """What the flood's junk is (bench/load.py): a JPEG's first bytes, then noise."""
    return b"\xff\xd8\xff\xe0" + np.random.default_rng(seed).bytes(size - 4)


def large_jpeg() -> bytes:
    """A real JPEG over START_CHECK_FROM (noise compresses badly): sent in two parts."""
    from PIL import Image

    pixels = np.random.default_rng(1).integers(0, 256, (1400, 1200), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def test_a_file_refused_on_its_start_is_never_sent_whole(sandbox, monkeypatch):
    import pneumonia.serving.sandbox as sandbox_module

    sent = []
    real_send_all = sandbox_module.send_all
    monkeypatch.setattr(sandbox_module, "send_all", lambda fd, data: sent.append(len(data)) or real_send_all(fd, data))
    replaced = sandbox.replaced
    junk = noise_behind_a_jpeg_signature(4 * START_CHECK_FROM)
    with pytest.raises(XrayReadError, match="not a supported image"):
        sandbox.prepare(junk, 224)
    assert sent == [START_BYTES] and sandbox.replaced == replaced  # the child read its start, and stays
    sent.clear()
    assert sandbox.declared_pixels(junk) == 0 and sent == [START_BYTES]  # every job on bytes: a batch's too
    sent.clear()
    data = large_jpeg()
    assert len(data) > START_CHECK_FROM
    assert np.array_equal(sandbox.prepare(data, 224).square, prepare_xray(data, 224).square)
    assert sent == [START_BYTES, len(data) - START_BYTES]  # its start, then the rest: decoded whole


def test_the_start_refuses_only_what_the_whole_file_would_be_refused_for():
    junk = noise_behind_a_jpeg_signature(START_BYTES)
    assert (
        refusal_at_start(junk, "the upload") == "the upload is not a supported image (JPEG, PNG, BMP, TIFF or DICOM)."
    )
    with pytest.raises(XrayReadError, match="not a supported image"):
        prepare_xray(noise_behind_a_jpeg_signature(2 * START_BYTES), 224)  # the same file, whole
    data = large_jpeg()
    for cut in (3, 100, 5000, START_BYTES):  # a real JPEG's start, however short: the rest decides
        assert refusal_at_start(data[:cut], "the upload") is None
    assert refusal_at_start(png_of_zeros(64)[:START_BYTES], "the upload") is None  # only JPEG is judged early


def test_the_pixels_a_header_declares_are_read_in_a_child(sandbox):
    from builders import dicom_bytes

    assert sandbox.declared_pixels(png_of_zeros(300, bit_depth=8)) == 300 * 300
    assert sandbox.declared_pixels(dicom_bytes(np.zeros((40, 30), np.uint16))) == 40 * 30
    assert sandbox.declared_pixels(b"\xff\xd8\xff" + b"junk" * 100) == 0  # unreadable: decoding refuses it
