"""The one path from an image to model input.

Training, evaluation, the CLI, the web app and every batch path go through `xray_pixels` and
`model_input` (`preprocess` is the two together), so what the model sees at serving time is what it
saw in training.

    bytes | path ──load_xray (reading/decoding.py)──> PIL "L" image ──resize──> uint8 (S, S)
        ──model_input: normalize_contrast, normalize──> float32 (S, S, 3)

The training cache stores the uint8 (S, S) arrays of `xray_pixels`; training applies the card's
contrast normalisation to them, augments, then `normalize`s.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import cv2
import numpy as np
from PIL import Image
from pydantic import ValidationError

from pneumonia.reading.decoding import Source, decode_xray, load_xray
from pneumonia.reading.pixel_stats import PixelStats
from pneumonia.serving.card import CONTRASTS, Normalization, Preprocessing
from pneumonia.serving.gradcam import display_image
from pneumonia.serving.records import CardFieldError, field_error

# keras.applications.densenet.preprocess_input ("torch" mode): what ImageNet weights expect.
IMAGENET_NORMALIZATION = Normalization(1 / 255, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
UNIT_NORMALIZATION = Normalization(1 / 255, [0.0, 0.0, 0.0], [1.0, 1.0, 1.0])


def preprocessing_spec(image_size: int, normalization: Normalization, contrast: str = "none") -> Preprocessing:
    """The preprocessing section of a model card; CardFieldError naming a value it cannot hold."""
    try:
        return Preprocessing(image_size=int(image_size), normalization=normalization, contrast=contrast)
    except ValidationError as err:
        raise CardFieldError(field_error(err.errors()[0], "preprocessing")) from None


def resize_xray(image: Image.Image, image_size: int) -> np.ndarray:
    """uint8 (image_size, image_size): the square the model sees."""
    resized = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.uint8)


def xray_pixels(source: Source, image_size: int) -> np.ndarray:
    """bytes or path -> uint8 (image_size, image_size). What the training cache stores."""
    return resize_xray(load_xray(source, image_size), image_size)


@dataclass
class PreparedXray:
    """What the screening pipeline needs of one file, and nothing of its decoder: what the gate's pixel
    checks measure, the model's square and, when asked, the display copy for overlays and thumbnails."""

    stats: PixelStats
    square: np.ndarray  # uint8 (S, S): resize_xray of the decoded image
    display: np.ndarray | None = None  # uint8 (H, W), long side <= the display side asked for
    timing_ms: dict[str, float] = field(default_factory=dict)  # decode, preprocess
    peak_mib: float | None = None  # in the sandbox: the most address space its child took over its start


def prepare_xray(
    source: Source, image_size: int, display_side: int | None = None, bytes_name: str = "the upload"
) -> PreparedXray:
    """bytes or path -> PreparedXray: decode_xray, then the square and the display copy from the same
    decoded image. What a decoding child runs (pneumonia/serving/sandbox.py); the full-size image does
    not outlive this call."""
    started = time.perf_counter()
    xray, stats = decode_xray(source, image_size, bytes_name)
    decoded = time.perf_counter()
    display = display_image(xray, display_side) if display_side else None
    square = resize_xray(xray, image_size)
    timing = {"decode": _ms(decoded - started), "preprocess": _ms(time.perf_counter() - decoded)}
    return PreparedXray(stats, square, display, timing)


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def normalize_contrast(pixels: np.ndarray, contrast: str) -> np.ndarray:
    """uint8 (S, S) or (N, S, S) -> the same, each square contrast-normalised as `contrast` says."""
    if contrast == "none":
        return pixels
    if contrast not in CONTRASTS:
        raise ValueError(f"unknown contrast normalisation {contrast!r}; choose from {', '.join(CONTRASTS)}")
    if pixels.ndim == 3:
        return np.stack([normalize_contrast(square, contrast) for square in pixels]) if len(pixels) else pixels
    return cv2.equalizeHist(np.ascontiguousarray(pixels, dtype=np.uint8))


def model_input(pixels: np.ndarray, spec: Preprocessing) -> np.ndarray:
    """uint8 (S, S) or (N, S, S) from `xray_pixels` -> float32 (..., S, S, 3), as a card's preprocessing says."""
    return normalize(normalize_contrast(pixels, spec.contrast), spec.normalization)


def normalize(pixels, normalization: Normalization):
    """uint8 or float pixels (..., H, W) in 0..255 -> float32 (..., H, W, 3).

    Plain arithmetic, so the same function serves NumPy arrays here and TensorFlow tensors
    inside the training input pipeline.
    """
    mean = np.asarray(normalization.mean, dtype=np.float32)
    std = np.asarray(normalization.std, dtype=np.float32)
    scale = np.float32(normalization.scale)
    if isinstance(pixels, np.ndarray):
        channels = np.repeat(pixels.astype(np.float32)[..., None], 3, axis=-1)
    else:  # a tf.Tensor; imported lazily so the web app's import stays light
        import tensorflow as tf

        channels = tf.repeat(tf.cast(pixels, tf.float32)[..., None], 3, axis=-1)
    return (channels * scale - mean) / std


def preprocess(source: Source, spec: Preprocessing) -> np.ndarray:
    """bytes or path -> float32 (H, W, 3) model input, following a model card's preprocessing."""
    return model_input(xray_pixels(source, spec.image_size), spec)
