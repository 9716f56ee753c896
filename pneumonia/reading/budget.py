"""The memory one decode may take, checked before its pixels are allocated, and the conversion to
8 bits done a strip of rows at a time, so that no decode holds much more than its own pixels.

A 115 kB PNG can hold 7,700 x 7,700 16-bit pixels (118 MB decoded) and a 300 kB deflated DICOM
300 MB of pixel data: the file's size says nothing about what it costs (issue 33). What bounds a
decode is its decoded size, width x height x samples x bytes per sample (of the one frame decoded;
a deflated DICOM's whole inflated dataset), against MAX_DECODED_BYTES. docs/uploads.md says how
the limit was chosen: with the app's model slots all decoding at the limit, a worker stays inside a
512 MiB dyno.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from pneumonia.errors import XrayReadError

MAX_DECODED_BYTES = 48 * 1024 * 1024
# The float64 work of one strip of the 8-bit conversion (a 7,700-pixel row is 62 kB of float64).
STRIP_BYTES = 4 * 1024 * 1024
MIB = 1024 * 1024
LUT_VALUES = 1 << 16  # integer images with at most this many levels are scaled by a lookup table


def check_decoded_bytes(name: str, width: int, height: int, bytes_per_pixel: int) -> None:
    """XrayReadError unless `width` x `height` pixels of `bytes_per_pixel` fit MAX_DECODED_BYTES."""
    needed = int(width) * int(height) * int(bytes_per_pixel)
    if needed > MAX_DECODED_BYTES:
        raise XrayReadError(
            f"{name} is {width}x{height} pixels of {bytes_per_pixel} bytes: {needed / MIB:,.0f} MiB decoded, "
            f"more than the {MAX_DECODED_BYTES // MIB} MiB one image may take; refused before decoding."
        )


def strips(height: int, width: int) -> list[tuple[int, int]]:
    """(top, bottom) row ranges covering `height` rows, each at most STRIP_BYTES of float64."""
    step = max(1, STRIP_BYTES // (8 * max(1, width)))
    return [(top, min(top + step, height)) for top in range(0, height, step)]


def rows_to_uint8(rows: Callable[[int, int], np.ndarray], height: int, width: int) -> np.ndarray:
    """uint8 (height, width) with the values' own min at 0 and max at 255 (scaled, not clipped), where
    `rows(top, bottom)` gives those rows' values. Two passes over strips in float64 (the range, then
    the scaling): the same numbers as converting the whole array at once, without its float64 copy."""
    bands = strips(height, width)
    extremes = np.array([_extremes(rows(top, bottom)) for top, bottom in bands])
    low, high = float(np.min(extremes[:, 0])), float(np.max(extremes[:, 1]))
    span = high - low if high > low else 1.0
    out = np.empty((height, width), np.uint8)
    lut = _integer_lut(rows(0, min(1, height)), low, high, span)
    for top, bottom in bands:
        values = np.asarray(rows(top, bottom))
        if lut is not None:  # each integer's value, computed once, as the float64 line below computes it
            out[top:bottom] = lut[values.astype(np.intp) - int(low)]
        else:
            out[top:bottom] = np.round((np.asarray(values, np.float64) - low) * (255.0 / span))
    return out


def _integer_lut(sample: np.ndarray, low: float, high: float, span: float) -> np.ndarray | None:
    """For integer values of at most LUT_VALUES levels, uint8 of every level from `low` to `high`: a 16-bit
    image is scaled by looking its levels up, the same numbers as the float64 arithmetic in less processor
    time, so that the 16-bit PNG at the limit decodes within the sandbox's (docs/uploads.md)."""
    if not np.issubdtype(np.asarray(sample).dtype, np.integer) or high - low >= LUT_VALUES:
        return None
    return np.round((np.arange(low, high + 1, dtype=np.float64) - low) * (255.0 / span)).astype(np.uint8)


def _extremes(values: np.ndarray) -> tuple[float, float]:
    values = np.asarray(values)
    return float(values.min()), float(values.max())
