"""The in-browser screener's modules (pneumonia/web/static/device/) run in node, without the page, on
images these tests build, against the Python they port: the fingerprints against hashlib, the header
checks against decoding, the pixels (greyscale, resize, equalisation, normalisation) against Pillow,
OpenCV and serving/preprocessing.py, the pixel statistics and the gate against serving/gate.py, and the
whole pure pipeline against `prepare_xray`, the large JPEGs the server drafts included."""

from __future__ import annotations

import copy
import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
from builders import SHIPPED_MODEL, encode_image, synthetic_xray
from PIL import Image

from pneumonia.serving.outcomes import GateVerdict, Outcome
from pneumonia.web.device_site import WEB, build_site

MODULES = WEB / "static" / "device"
HARNESS = Path(__file__).parent / "js" / "call_device_module.mjs"
NODE = shutil.which("node")
needs_node = pytest.mark.skipif(NODE is None, reason="the module tests run the JavaScript in node: install nodejs")


def run_js(*calls: dict) -> list:
    """Each call ({module, name, args, pick}) run in one node process: its value; a thrown error as a dict."""
    answer = subprocess.run([NODE, str(HARNESS)], input=json.dumps(calls), capture_output=True, text=True, timeout=120)
    assert answer.returncode == 0, answer.stderr
    return [item.get("value", {"error": item.get("error")}) for item in json.loads(answer.stdout)]


def js(module: str, name: str, *args, pick: list[str] | None = None):
    return run_js({"module": module, "name": name, "args": list(args), "pick": pick})[0]


def as_file(tmp_path: Path, data: bytes, name: str) -> dict:
    path = tmp_path / name
    path.write_bytes(data)
    return {"$file": str(path)}


@pytest.fixture(scope="module")
def params() -> dict:
    return json.loads(build_site(SHIPPED_MODEL).content("model/screener.json"))


def large_xray(width: int, height: int, seed: int) -> Image.Image:
    """A synthetic X-ray at a scanner's size, with fine texture: grey-level noise over the chest field."""
    rng = np.random.default_rng(seed)
    field = np.asarray(synthetic_xray(1, rng, 256).resize((width, height), Image.Resampling.BICUBIC), dtype=float)
    noisy = field + rng.normal(0, 6, field.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def test_no_module_is_longer_than_a_reader_can_hold():
    lengths = {path.name: len(path.read_text().splitlines()) for path in MODULES.glob("*.js")}
    assert lengths and max(lengths.values()) <= 300, lengths


def test_every_relative_import_names_a_file_the_site_carries():
    site = build_site(SHIPPED_MODEL)
    for path in MODULES.glob("*.js"):
        for target in re.findall(r'^import .* from "(\./[^"]+)";$', path.read_text(), re.MULTILINE):
            assert f"static/device/{target[2:]}" in site.files, (path.name, target)
    assert "static/device/page.js" in site.files and 'type="module" src="static/device/page.js"' in (
        site.content("index.html").decode()
    )


@needs_node
def test_the_vocabulary_is_the_python_enums():
    outcome, verdict = run_js(
        {"module": "vocabulary.js", "name": "Outcome"}, {"module": "vocabulary.js", "name": "GateVerdict"}
    )
    assert outcome == {member.name: member.value for member in Outcome}
    assert verdict == {member.name: member.value for member in GateVerdict}


@needs_node
def test_the_fingerprint_is_hashlibs_sha256(tmp_path):
    rng = np.random.default_rng(3)
    for size in (0, 55, 64, 1000, 70_001):
        data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        assert js("hashing.js", "sha256Hex", as_file(tmp_path, data, "data")) == hashlib.sha256(data).hexdigest()
