"""What the gate's pixel checks measure on a decoded image: its stored size, its colour before the
greyscale conversion and its grey-level spread after it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass
class PixelStats:
    """What the pixel checks look at, measured on the decoded upload."""

    width: int
    height: int
    chroma: float  # mean over pixels of (max - min) over R, G, B, in grey levels; 0 for greyscale
    spread: float  # 99th minus 1st percentile of the greyscale levels

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def aspect(self) -> float:
        return max(self.width, self.height) / max(1, min(self.width, self.height))


def _sample(image: Image.Image, side: int = 256) -> Image.Image:
    """Every k-th pixel, at most ~`side` a side: the statistics below need no more, and a
    nearest-neighbour sample of a 2-megapixel image costs well under a millisecond."""
    factor = max(1, max(image.size) // side)
    if factor == 1:
        return image
    return image.resize((max(1, image.width // factor), max(1, image.height // factor)), Image.Resampling.NEAREST)


def mean_chroma(image: Image.Image) -> float:
    """Mean (max - min) over the colour channels, in grey levels; 0 for a greyscale mode."""
    if image.mode in ("L", "LA", "1", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return 0.0
    # Sampled before any conversion, which acts on each pixel alone: no full-size RGB copy of a palette
    # or CMYK image (the same pixels are picked either way).
    sample = _sample(image)
    red, green, blue = (np.asarray(band, dtype=np.int16) for band in sample.convert("RGB").split())  # (h, w) each
    return float((np.maximum(np.maximum(red, green), blue) - np.minimum(np.minimum(red, green), blue)).mean())


def grey_spread(grey: Image.Image) -> float:
    """99th minus 1st percentile of an "L" image's grey levels, from its histogram."""
    cumulative = np.cumsum(_sample(grey).histogram()[:256])
    total = cumulative[-1]
    low = int(np.searchsorted(cumulative, 0.01 * total))
    high = int(np.searchsorted(cumulative, 0.99 * total))
    return float(high - low)
