"""The model as the web app uses it: one upload -> probability, labels and Grad-CAM images.

One upload is a chunk of one through the package's screening pipeline
(`pneumonia.serving.screening`), the same as many uploads and `predict`, in its two steps: `prepare`
(decoding in the sandbox, the gate's pixel checks, the model square), with no model slot, then
`screen` holding one (one explain pass: logit, Grad-CAM and the features the gate scores, calibration
and labels). This module adds the encoded images, and raises NotScreened for what was not screened
(pneumonia/web/answers.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from pneumonia.serving.card import ModelCard
from pneumonia.serving.classifier import ModelLoadError, XrayClassifier
from pneumonia.serving.gate import Verdict
from pneumonia.serving.gradcam import check_map_size, overlay
from pneumonia.serving.outcomes import Outcome
from pneumonia.serving.sandbox import DecodingSandbox
from pneumonia.serving.screening import BatchScreener, Prepared, ScreenedImage, Screening
from pneumonia.web.answers import NotScreened
from pneumonia.web.settings import settings

ENCODE_PARAMS = {
    ".jpg": [cv2.IMWRITE_JPEG_QUALITY, 90],
    # The overlay is noisy, so stronger compression buys little: the SUB filter with Huffman-only
    # coding was the fastest setting measured and nearly the smallest (bench/benchmark_upload.py).
    ".png": [
        cv2.IMWRITE_PNG_COMPRESSION,
        1,
        cv2.IMWRITE_PNG_STRATEGY,
        cv2.IMWRITE_PNG_STRATEGY_HUFFMAN_ONLY,
        cv2.IMWRITE_PNG_FILTER,
        cv2.IMWRITE_PNG_FILTER_SUB,
    ],
}


@dataclass
class UploadResult:
    """One upload's screening (screened: the other outcomes are raised as NotScreened) and its Grad-CAM images."""

    screening: Screening
    gradcam_target: str  # the class whose evidence the heatmap shows
    localised: bool  # False when Grad-CAM found no positive evidence (an all-zero map)
    overlay: bytes | None = None  # encoded, display size
    original: bytes | None = None  # encoded JPEG, display size
    timing_ms: dict[str, float] = field(default_factory=dict)

    @property
    def probability(self) -> float:
        return self.screening.probability

    @property
    def labels(self) -> dict[str, str]:
        return self.screening.labels

    @property
    def ood(self) -> Verdict | None:  # None when the model has no gate
        return self.screening.verdict


class Screener:
    """Loaded once per process. Every call works on its own arrays and the runtime's graphs are
    read-only, so one Screener serves all of a worker's threads."""

    def __init__(
        self,
        model_path: str | Path,
        overlay_alpha: float = 0.5,
        runtime: str | None = None,
        sandbox: DecodingSandbox | None = None,
    ):
        self.classifier = XrayClassifier(model_path, runtime)
        self.gradcam = self.classifier.runtime  # .layer, .map_size
        check_map_size(self.gradcam.layer, self.gradcam.map_size)
        self.batch = BatchScreener(self.classifier, sandbox=sandbox)
        self.overlay_alpha = overlay_alpha

    @property
    def card(self) -> ModelCard:
        return self.classifier.card

    @property
    def report_dir(self) -> Path:
        return self.classifier.keras_path.parent / "report"

    def prepare(self, data: bytes, display_side: int | None) -> Prepared:
        """One upload decoded in the sandbox and through the gate's pixel checks, before any model slot is
        taken; raises NotScreened for unreadable input (or past the sandbox's limits) and for what the pixel
        checks refuse, and DecoderBusy when no decoder is free."""
        [(row, square)] = self.batch.prepare([("the upload", data)], display_side)
        if row.screening is not None:
            raise NotScreened(row.screening)
        return row, square

    def screened_row(self, prepared: Prepared) -> ScreenedImage:
        """The model's part for a prepared upload, with Grad-CAM; raises NotScreened when the gate's feature
        check refuses it. Run holding a model slot."""
        [row] = self.batch.score([prepared], with_gradcam=True)
        if row.outcome != Outcome.SCREENED:
            raise NotScreened(row.screening)
        return row

    def screen(
        self, prepared: Prepared, overlay_format: str | None = None, with_original: bool = False
    ) -> UploadResult:
        """A prepared upload -> UploadResult. `overlay_format` ".jpg" or ".png" renders the overlay over the
        display copy it was prepared with; None skips it. Raises NotScreened for what the gate refuses."""
        row = self.screened_row(prepared)
        result = UploadResult(
            row.screening, row.labels["default"], localised=bool(row.heat.max() > 0), timing_ms=row.timing_ms
        )
        if overlay_format:
            started = time.perf_counter()
            result.overlay = _encode(overlay(row.display, row.heat, self.overlay_alpha), overlay_format)
            if with_original:
                result.original = _encode(row.display, ".jpg")
            result.timing_ms["overlay_encode"] = round((time.perf_counter() - started) * 1000, 2)
        return result

    def batch_images(
        self, row: ScreenedImage, overlay_format: str | None, thumbnail_side: int | None = None
    ) -> tuple[bytes | None, bytes | None]:
        """(overlay, thumbnail) of a row of `self.batch`, encoded from its display copy: the overlay
        when Grad-CAM gave a map, the thumbnail (JPEG, long side <= thumbnail_side) whenever the
        file decoded."""
        if row.display is None:
            return None, None
        encoded = None
        if overlay_format and row.heat is not None:
            encoded = _encode(overlay(row.display, row.heat, self.overlay_alpha), overlay_format)
        if not thumbnail_side:
            return encoded, None
        scale = min(1.0, thumbnail_side / max(row.display.shape))
        size = (max(1, round(row.display.shape[1] * scale)), max(1, round(row.display.shape[0] * scale)))
        return encoded, _encode(cv2.resize(row.display, size, interpolation=cv2.INTER_AREA), ".jpg")


def _encode(image: np.ndarray, extension: str) -> bytes:
    ok, buffer = cv2.imencode(extension, image, ENCODE_PARAMS[extension])
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a {extension} image")
    return buffer.tobytes()


class ModelNotReady(Exception):
    """The model did not load at start-up; `reason` says why (shown as a 503)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def load_screener(app) -> None:
    """At start-up: app.extensions["screener"] is the Screener, or None with the reason in
    app.extensions["model_error"]."""
    path = settings(app).model_path
    screener, error = None, None
    try:
        sandbox = app.extensions["decoding_sandbox"]
        screener = Screener(path, settings(app).overlay_alpha, settings(app).runtime, sandbox)
    except ModelLoadError as err:
        error = str(err)
    except Exception as err:  # a card missing keys, a model without a "logit" layer, ...
        error = f"The model at {path} could not be prepared for serving: {type(err).__name__}: {err}"
    app.extensions["screener"] = screener
    app.extensions["model_error"] = error
    if error:
        app.logger.error("MODEL NOT LOADED, predictions will answer 503: %s", error)
    else:
        app.logger.info(
            "Model %s loaded from %s on the %s runtime; Grad-CAM layer %s (%dx%d)",
            screener.classifier.name,
            path,
            screener.classifier.runtime.name,
            screener.gradcam.layer,
            *screener.gradcam.map_size,
        )


def current_screener() -> Screener:
    from flask import current_app

    screener = current_app.extensions["screener"]
    if screener is None:
        raise ModelNotReady(current_app.extensions["model_error"])
    return screener
