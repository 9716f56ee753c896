"""The in-browser screener ("Screen on this device"): every file a browser needs to screen an X-ray
without sending it anywhere, generated from the model folder.

    model folder ──build_site──> DeviceSite: index.html, static/ (style, device/*.js, onnxruntime-web),
                                 model/ (the ONNX export, screener.json, gate.bin)

The web app serves a DeviceSite under /device/ (pneumonia/web/device.py); `python -m pneumonia
export-web DIR` writes one to a folder, a static site for any host. Every link in it is relative, so
the same files work at both places. What the browser computes (static/device/, ES modules) follows the Python
pipeline step by step; the numbers it needs are read here from the card, the gate and the code's own
constants, never retyped in JavaScript: tests/test_device.py checks it against `predict`.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
from jinja2 import Environment, FileSystemLoader, select_autoescape
from PIL import Image

from pneumonia.errors import ModelLoadError
from pneumonia.reading import decoding
from pneumonia.serving.card import ModelCard
from pneumonia.serving.classifier import find_card
from pneumonia.serving.gate import EXPECTED, MESSAGES, UNUSUAL_WARNING, OodGate, load_gate_for
from pneumonia.serving.gradcam import EPSILON
from pneumonia.serving.runtime import export_problem

WEB = Path(__file__).resolve().parent
PAGE = "index.html"
PARAMETERS = "model/screener.json"
GATE_BINARY = "model/gate.bin"
# Static files the page loads, under static/ in the package and in the site.
STATIC = (
    "style.css",
    "favicon.svg",
    *(f"device/{path.name}" for path in sorted((WEB / "static" / "device").glob("*.js"))),
    "vendor/ort.wasm.min.js",
    "vendor/ort-wasm-simd-threaded.mjs",
    "vendor/ort-wasm-simd-threaded.wasm",
    "vendor/onnxruntime-web.LICENSE",
)
# The page's own promise, kept by the browser wherever the site is hosted (a <meta> in the page, and the
# app's header on /device/): it may fetch only from where it came from (connect-src 'self'), so no
# script on it can send an X-ray elsewhere; 'wasm-unsafe-eval' lets ONNX Runtime compile its
# WebAssembly, and nothing else is evaluated.
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self' 'wasm-unsafe-eval'",
        "connect-src 'self'",
        "worker-src 'self'",
        "style-src 'self'",
        "img-src 'self' data: blob:",
        "form-action 'none'",
        "base-uri 'none'",
    ]
)


@dataclass(frozen=True)
class Overlay:
    """How the page shows the X-ray and its heatmap: the app's OVERLAY_ALPHA and PAGE_IMAGE_MAX_SIDE when
    it serves the page (pneumonia/web/device.py); these defaults (the app's own) for `export-web`."""

    alpha: float = 0.5
    display_max_side: int = 1024


@dataclass
class DeviceSite:
    """The site's files: name (relative path) -> a file to copy or the bytes to write."""

    card: ModelCard
    files: dict[str, Path | bytes]

    def content(self, name: str) -> bytes | None:
        found = self.files.get(name)
        return found.read_bytes() if isinstance(found, Path) else found


def build_site(model_path: str | Path, server_url: str | None = None, overlay: Overlay = Overlay()) -> DeviceSite:
    """The site for the model at `model_path`; ModelLoadError when its export cannot be served.
    `server_url`: where the page sends a reader whose browser cannot screen (None: no link)."""
    keras_path, card = find_card(model_path)
    keras_sha256 = card.export.keras_sha256 if card.export else ""
    # The browser runs the export alone: its files must be the card's; the .keras file itself is not needed.
    problem = export_problem(keras_path, card, keras_sha256)
    if problem:
        raise ModelLoadError(f"The in-browser screener needs the model's ONNX export: {problem}.")
    gate, _ = load_gate_for(keras_path, keras_sha256)
    folder = keras_path.parent
    files: dict[str, Path | bytes] = {f"static/{name}": WEB / "static" / name for name in STATIC}
    for name in ("explain", "weights"):
        files[f"model/{card.export.files[name].file}"] = folder / card.export.files[name].file
    if gate is not None:
        files[GATE_BINARY] = gate_binary(gate)
    parameters = screener_parameters(card, gate, files.get(GATE_BINARY), overlay)
    files[PARAMETERS] = json.dumps(parameters, indent=1).encode()
    files[PAGE] = render_page(card, server_url).encode()
    return DeviceSite(card, files)


def gate_binary(gate: OodGate) -> bytes:
    """The class means (2, d) then the precision (d, d), float32 little-endian: what the browser's
    Mahalanobis distance reads (the server's `FeatureDensity` keeps them float32 too)."""
    density = gate.density
    return np.concatenate([density.means.ravel(), density.precision.ravel()]).astype("<f4").tobytes()


def screener_parameters(card: ModelCard, gate: OodGate | None, gate_bytes: bytes | None, overlay: Overlay) -> dict:
    """What the page's modules (static/device/) read: the card's preprocessing, calibration and thresholds,
    the gate, the reading limits and messages, the overlay; and the sha256 the downloaded files must have."""
    export = card.export
    return {
        "name": card.name,
        "files": {name: asdict(export.files[name]) for name in ("explain", "weights")},
        "preprocessing": asdict(card.preprocessing),
        "calibration": {"slope": card.calibration.slope, "intercept": card.calibration.intercept},
        "thresholds": card.thresholds.as_dict(),
        "probability_floor": card.probability_floor,
        "gradcam": {"layer": card.gradcam.layer, "map_size": card.gradcam.map_size, "epsilon": EPSILON},
        "gate": gate_parameters(gate, gate_bytes),
        "reading": reading_parameters(),
        "overlay": {**asdict(overlay), "jet": jet_colours()},
    }


def gate_parameters(gate: OodGate | None, gate_bytes: bytes | None) -> dict | None:
    if gate is None:
        return None
    dim = int(gate.density.means.shape[1])
    return {
        "file": Path(GATE_BINARY).name,
        "sha256": _sha256(gate_bytes),
        "feature_dim": dim,
        "bounds": {k: v for k, v in asdict(gate.bounds).items() if k != "derivation"},
        "thresholds": gate.thresholds,
        "messages": MESSAGES,
        "expected": EXPECTED,
        "unusual_warning": UNUSUAL_WARNING,
    }


def reading_parameters() -> dict:
    """pneumonia/reading/decoding.py's limits, and the `_draft` rule the browser imitates."""
    return {
        "accepted_types": decoding.ACCEPTED_TYPES,
        "max_image_pixels": decoding.MAX_IMAGE_PIXELS,
        # Pillow refuses more than this before our own limit is reached (a DecompressionBombWarning)
        "pillow_max_image_pixels": Image.MAX_IMAGE_PIXELS,
        "min_side": 8,  # decoding._open_image: "too small to be an X-ray"
        "draft_margin": decoding.DRAFT_MARGIN,
        "draft_min_side": decoding.DRAFT_MIN_SIDE,
        "draft_scales": [8, 4, 2],
        "stats_sample_side": 256,  # reading/pixel_stats.py: _sample
    }


def jet_colours() -> list[list[int]]:
    """OpenCV's COLORMAP_JET as 256 [r, g, b]: the server's overlay colours (serving/gradcam.py)."""
    bgr = cv2.applyColorMap(np.arange(256, dtype=np.uint8)[:, None], cv2.COLORMAP_JET)[:, 0]
    return bgr[:, ::-1].tolist()


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def render_page(card: ModelCard, server_url: str | None) -> str:
    """index.html from templates/device.html, with jinja2 alone (no Flask app needed for export-web)."""
    environment = Environment(loader=FileSystemLoader(WEB / "templates"), autoescape=select_autoescape(["html"]))
    template = environment.get_template("device.html")
    return template.render(
        card=card, server_url=server_url, expected=EXPECTED, accepted="JPEG or PNG", policy=CONTENT_SECURITY_POLICY
    )


def write_site(site: DeviceSite, folder: str | Path) -> list[Path]:
    """Writes every file of `site` under `folder` (created); the paths written."""
    folder = Path(folder)
    written = []
    for name, source in sorted(site.files.items()):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(source, Path):
            shutil.copyfile(source, path)
        else:
            path.write_bytes(source)
        written.append(path)
    return written
