"""The in-browser screener's modules (pneumonia/web/static/device/) run in node, without the page, on
images these tests build, against the Python they port: the fingerprints against hashlib, the header
checks against decoding, the pixels (greyscale, resize, equalisation, normalisation) against Pillow,
OpenCV and serving/preprocessing.py, the pixel statistics and the gate against serving/gate.py, and the
whole pure pipeline against `prepare_xray`, the large JPEGs the server drafts included."""

from __future__ import annotations

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
def site():
    return build_site(SHIPPED_MODEL)


@pytest.fixture(scope="module")
def params(site) -> dict:
    return json.loads(site.content("model/screener.json"))


def large_xray(width: int, height: int, seed: int) -> Image.Image:
    """A synthetic X-ray at a scanner's size, with fine texture: grey-level noise over the chest field."""
    rng = np.random.default_rng(seed)
    field = np.asarray(synthetic_xray(1, rng, 256).resize((width, height), Image.Resampling.BICUBIC), dtype=float)
    noisy = field + rng.normal(0, 6, field.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def test_no_module_is_longer_than_a_reader_can_hold():
    lengths = {path.name: len(path.read_text().splitlines()) for path in MODULES.glob("*.js")}
    assert lengths and max(lengths.values()) <= 300, lengths


def test_every_relative_import_names_a_file_the_site_carries(site):
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


@needs_node
def test_the_header_checks_answer_as_decoding_does(tmp_path, params):
    grey = synthetic_xray(1, np.random.default_rng(1), 300).resize((320, 240))
    cases = {
        "grey.jpeg": encode_image(grey, "JPEG"),
        "colour.jpeg": encode_image(grey.convert("RGB"), "JPEG"),
        "grey.png": encode_image(grey, "PNG"),
        "truncated.jpeg": encode_image(grey, "JPEG")[:2000],
        "tiny.png": encode_image(Image.new("L", (6, 6)), "PNG"),
        "image.bmp": encode_image(grey, "BMP"),
        "empty.png": b"",
    }
    calls = [
        {"module": "headers.js", "name": "readHeader", "args": [as_file(tmp_path, data, name), params["reading"]]}
        for name, data in cases.items()
    ]
    answers = dict(zip(cases, run_js(*calls)))
    assert answers["grey.jpeg"] == {"format": "JPEG", "width": 320, "height": 240, "colour": False, "complete": True}
    assert answers["colour.jpeg"]["colour"] is True and answers["grey.png"]["colour"] is False
    assert answers["truncated.jpeg"]["error"]["message"].startswith("The image is corrupt or truncated")
    assert answers["tiny.png"]["error"]["message"] == "the upload is only 6x6 pixels: too small to be an X-ray."
    assert "a BMP file can be screened by the server mode" in answers["image.bmp"]["error"]["message"]
    assert answers["empty.png"]["error"] == {"name": "ReadError", "message": "The uploaded file is empty."}


@needs_node
def test_greyscale_resize_and_equalisation_are_pillows_and_opencvs(tmp_path):
    from pneumonia.reading.decoding import _to_greyscale

    rng = np.random.default_rng(5)
    rgba = rng.integers(0, 256, (37, 53, 4), dtype=np.uint8)
    rgba[::3, :, 3] = 255
    grey = np.asarray(_to_greyscale(Image.fromarray(rgba, "RGBA")))
    square = np.asarray(Image.fromarray(grey).resize((16, 16), Image.Resampling.BILINEAR))
    js_grey, js_square, js_equalized = run_js(
        {"module": "pixels.js", "name": "greyscale", "args": [as_file(tmp_path, rgba.tobytes(), "rgba")]},
        {"module": "pixels.js", "name": "resize", "args": [as_file(tmp_path, grey.tobytes(), "grey"), 53, 37, 16]},
        {"module": "pixels.js", "name": "equalize", "args": [as_file(tmp_path, square.tobytes(), "square")]},
    )
    assert np.array_equal(np.reshape(js_grey, grey.shape), grey)
    assert np.array_equal(np.reshape(js_square, (16, 16)), square)
    assert np.array_equal(np.reshape(js_equalized, (16, 16)), cv2.equalizeHist(square))


@needs_node
@pytest.mark.parametrize("contrast", ["none", "equalize"])
def test_the_model_input_is_preprocessings(tmp_path, params, contrast):
    from pneumonia.serving.card import Normalization
    from pneumonia.serving.preprocessing import model_input, preprocessing_spec

    square = np.asarray(synthetic_xray(0, np.random.default_rng(9), 32))
    preprocessing = {**params["preprocessing"], "contrast": contrast}
    spec = preprocessing_spec(32, Normalization(**preprocessing["normalization"]), contrast)
    expected = model_input(square, spec)
    answer = js("pixels.js", "modelInput", as_file(tmp_path, square.tobytes(), "square"), preprocessing)
    assert np.array_equal(np.asarray(answer, dtype=np.float32).reshape(expected.shape), expected)


PIPELINE_CASES = {  # name -> (width, height, format): what the server decodes in full or drafts
    "plain.png": (900, 700, "PNG"),
    "colour.jpeg": (800, 640, "JPEG-RGB"),
    "drafted-half.jpeg": (1400, 1100, "JPEG"),  # 1,100 // 2 >= 512: DCT scale 1/2
    "drafted-quarter.jpeg": (2300, 2100, "JPEG"),  # 2,100 // 4 >= 512: DCT scale 1/4
}


@needs_node
@pytest.mark.parametrize("name", list(PIPELINE_CASES))
def test_the_pure_pipeline_prepares_what_the_server_does(tmp_path, params, name):
    """`prepare` on the pixels a browser decodes (libjpeg-turbo's, as Pillow's: docs/browser.md) against
    prepare_xray on the same bytes. A drafted JPEG's square may differ by rounding, never by a bias: the
    mean of the rounded pixels rounded half up brightened it by 1/8 of a grey level, and moved a
    probability by 0.006."""
    from pneumonia.serving.preprocessing import prepare_xray

    width, height, fmt = PIPELINE_CASES[name]
    image = large_xray(width, height, seed=len(name))
    data = encode_image(
        image.convert("RGB") if fmt == "JPEG-RGB" else image, fmt[:4], **({"quality": 90} if fmt != "PNG" else {})
    )
    size = params["preprocessing"]["image_size"]
    expected = prepare_xray(data, size)
    decoded = Image.open(as_file(tmp_path, data, name)["$file"]).convert("RGBA")
    pixels = {"width": width, "height": height, "rgba": as_file(tmp_path, decoded.tobytes(), "rgba")}
    frame = js("headers.js", "readHeader", as_file(tmp_path, data, name), params["reading"])
    answer = js("screening.js", "prepare", frame, pixels, {**params, "gate": None}, pick=["stats", "square"])
    stats = answer["stats"]
    assert (stats["pixels"], stats["aspect"]) == (expected.stats.pixels, expected.stats.aspect)
    assert stats["chroma"] == pytest.approx(expected.stats.chroma, abs=0.5)
    assert abs(stats["spread"] - expected.stats.spread) <= 1
    difference = np.reshape(answer["square"], (size, size)).astype(float) - expected.square
    if not name.startswith("drafted"):
        assert not difference.any()
    assert np.abs(difference).max() <= 1 and abs(difference.mean()) < 0.03


@needs_node
def test_the_gate_answers_as_serving_gate(tmp_path, params):
    from pneumonia.reading.pixel_stats import PixelStats
    from pneumonia.serving.gate import OodGate, pixel_verdict

    gate = OodGate.load(SHIPPED_MODEL / "ood.npz")
    cases = [
        PixelStats(1000, 800, 0.0, 180.0),
        PixelStats(1000, 150, 0.0, 180.0),
        PixelStats(900, 800, 40.0, 180.0),
        PixelStats(900, 800, 0.0, 2.0),
        PixelStats(40, 40, 0.0, 180.0),
    ]
    stats = [{"pixels": s.pixels, "aspect": s.aspect, "chroma": s.chroma, "spread": s.spread} for s in cases]
    features = np.random.default_rng(2).normal(0, 1, (3, gate.density.means.shape[1])).astype(np.float32)
    features[0] = gate.density.means[1]
    calls = [{"module": "ood_checks.js", "name": "pixelVerdict", "args": [s, params["gate"]["bounds"]]} for s in stats]
    density = {"means": gate.density.means.tolist(), "precision": gate.density.precision.ravel().tolist()}
    calls += [{"module": "ood_checks.js", "name": "mahalanobis", "args": [f.tolist(), density]} for f in features]
    answers = run_js(*calls)
    for case, answer in zip(cases, answers):
        verdict = pixel_verdict(case, gate.bounds)
        assert (answer and (answer["verdict"], answer["reason"])) == (verdict and (verdict.verdict, verdict.reason))
    distances = answers[len(cases) :]
    assert distances == pytest.approx(gate.density.distance(features).tolist(), rel=1e-4)
    verdicts = run_js(
        *({"module": "ood_checks.js", "name": "featureVerdict", "args": [d, gate.thresholds]} for d in distances)
    )
    assert [v["verdict"] for v in verdicts] == [gate.check_score(d).verdict for d in distances]
