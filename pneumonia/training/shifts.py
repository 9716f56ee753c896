"""Acquisition-like shifts of an X-ray: what changes between machines and sites (exposure, contrast,
sharpness, noise, compression, positioning, framing, resampling), applied to the decoded greyscale
image at its own size, *before* the one preprocessing path:

    file ──load_xray──> PIL "L" ──SHIFT──> PIL "L" ──resize_xray──> uint8 ──model_input──> model

Training chooses its thresholds across a set of them (operating_points.py) and records what the
others expect at a new site; the lever study (studies/robustness.py) scores models under all of them.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from pneumonia.reading.decoding import load_xray
from pneumonia.serving.preprocessing import resize_xray


def _gamma(value: float) -> Callable:
    table = [int(round(255 * (i / 255) ** value)) for i in range(256)]
    return lambda image, rng: image.point(table)


def _contrast(factor: float) -> Callable:
    # Pillow's Contrast pivots on the image's mean grey: out = mean + factor * (in - mean).
    return lambda image, rng: ImageEnhance.Contrast(image).enhance(factor)


def _filter(make) -> Callable:
    return lambda image, rng: image.filter(make())


def _noise(sigma: float) -> Callable:
    def apply(image, rng):
        pixels = np.asarray(image, dtype=np.float64) + rng.normal(0.0, sigma, (image.height, image.width))
        return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode="L")

    return apply


def _jpeg(quality: int) -> Callable:
    def apply(image, rng):
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=quality)
        return load_xray(buffer.getvalue())  # decoded by the package, as an upload would be

    return apply


def _rotate(degrees: float) -> Callable:
    # Same size; the uncovered corners are black, the background of an X-ray.
    return lambda image, rng: image.rotate(degrees, resample=Image.Resampling.BILINEAR, fillcolor=0)


def _centre_crop(fraction: float) -> Callable:
    def apply(image, rng):
        width, height = max(1, round(image.width * fraction)), max(1, round(image.height * fraction))
        left, top = (image.width - width) // 2, (image.height - height) // 2
        return image.crop((left, top, left + width, top + height))

    return apply


def _down_up(factor: int, resample: Image.Resampling) -> Callable:
    def apply(image, rng):
        small = image.resize((max(1, image.width // factor), max(1, image.height // factor)), resample)
        return small.resize(image.size, resample)

    return apply


@dataclass(frozen=True)
class Shift:
    name: str
    description: str
    apply: Callable  # (PIL "L" image, numpy Generator) -> PIL "L" image


SHIFTS: tuple[Shift, ...] = (
    Shift("gamma_0.8", "gamma 0.8 (255·(x/255)^0.8: brighter mid-tones)", _gamma(0.8)),
    Shift("gamma_1.25", "gamma 1.25 (darker mid-tones)", _gamma(1.25)),
    Shift("contrast_0.8", "contrast × 0.8 about the mean grey", _contrast(0.8)),
    Shift("contrast_1.2", "contrast × 1.2 about the mean grey", _contrast(1.2)),
    Shift("blur_r1", "Gaussian blur, radius 1", _filter(lambda: ImageFilter.GaussianBlur(1))),
    Shift("blur_r2", "Gaussian blur, radius 2", _filter(lambda: ImageFilter.GaussianBlur(2))),
    Shift(
        "unsharp",
        "unsharp mask (radius 2, 100 %, threshold 2)",
        _filter(lambda: ImageFilter.UnsharpMask(radius=2, percent=100, threshold=2)),
    ),
    Shift("noise_s5", "Gaussian noise, σ 5 grey levels", _noise(5.0)),
    Shift("jpeg_q30", "JPEG re-encoded at quality 30", _jpeg(30)),
    Shift("rotate_+5", "rotated 5° anticlockwise (black corners)", _rotate(5.0)),
    Shift("rotate_-5", "rotated 5° clockwise (black corners)", _rotate(-5.0)),
    Shift("crop_90", "centre crop of 90 % of width and height instead of the full image", _centre_crop(0.9)),
    # A chest framed more tightly, as the Kaggle val/ NORMAL images are against train/'s.
    Shift("crop_80", "centre crop of 80 % of width and height", _centre_crop(0.8)),
    Shift("crop_70", "centre crop of 70 % of width and height", _centre_crop(0.7)),
    Shift("resample_nearest", "nearest-neighbour downscale by 2, then upscale", _down_up(2, Image.Resampling.NEAREST)),
    Shift("resample_bicubic", "bicubic downscale by 2, then upscale", _down_up(2, Image.Resampling.BICUBIC)),
)
SHIFTS_BY_NAME = {shift.name: shift for shift in SHIFTS}
BASELINE = "none"


def shift_seed(path: str | Path) -> int:
    """A per-file seed (from its name), so noise does not depend on which other files are scored."""
    return zlib.crc32(Path(path).name.encode())


def apply_shift(name: str, image: Image.Image, seed: int = 0) -> Image.Image:
    """A decoded greyscale image at its own size -> the shifted greyscale image ("L")."""
    if image.mode != "L":
        raise ValueError(f"expected a greyscale 'L' image from load_xray, got mode {image.mode}")
    if name == BASELINE:
        return image
    shifted = SHIFTS_BY_NAME[name].apply(image, np.random.default_rng(seed))
    return shifted if shifted.mode == "L" else shifted.convert("L")


def model_pixels(image: Image.Image, image_size: int) -> np.ndarray:
    """The package's resize (the one path): uint8 (S, S), for `probabilities_from_pixels`."""
    return resize_xray(image, image_size)
