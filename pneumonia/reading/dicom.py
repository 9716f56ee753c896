"""DICOM to an 8-bit greyscale image, for `decoding.decode_xray`.

Modality LUT (rescale slope/intercept), then the VOI LUT or window the file carries, then
MONOCHROME1 inverted so bone is bright as in the JPEG training images. Patient tags are
never read into messages or logs.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from pneumonia.errors import XrayReadError

DICOM_MAGIC_OFFSET = 128


def is_dicom(data: bytes) -> bool:
    return data[DICOM_MAGIC_OFFSET : DICOM_MAGIC_OFFSET + 4] == b"DICM"


def range_to_uint8(values: np.ndarray) -> np.ndarray:
    """Any numeric array -> uint8 with its own min at 0 and max at 255 (scaled, not clipped)."""
    values = np.asarray(values, dtype=np.float64)
    low, high = float(values.min()), float(values.max())
    span = high - low if high > low else 1.0
    return np.round((values - low) * (255.0 / span)).astype(np.uint8)


def dicom_to_image(data: bytes, max_pixels: int) -> Image.Image:
    """DICOM bytes -> PIL "L". Raises XrayReadError for what cannot or should not be decoded."""
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except Exception as err:  # pydicom raises many types on damaged files
        raise XrayReadError(f"The DICOM file could not be parsed ({type(err).__name__}).") from None
    if "PixelData" not in ds:
        raise XrayReadError("The DICOM file holds no image (no Pixel Data).")
    try:
        rows, columns = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    except Exception:
        raise XrayReadError("The DICOM file has an unreadable image size.") from None
    if rows * columns > max_pixels:
        raise XrayReadError(f"The DICOM image is {columns}x{rows} pixels, more than the {max_pixels:,} allowed.")
    try:
        pixels = ds.pixel_array
    except Exception as err:  # pydicom raises many types: missing decoder, bad lengths, ...
        syntax = ds.file_meta.get("TransferSyntaxUID", None) if hasattr(ds, "file_meta") else None
        name = getattr(syntax, "name", str(syntax)) if syntax is not None else "unknown"
        raise XrayReadError(
            f"The DICOM pixel data could not be decoded (transfer syntax: {name}). "
            "Export the image uncompressed or as PNG/JPEG. "
            f"({type(err).__name__})"
        ) from None
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        pixels = pixels[0]  # a radiograph series: the first frame
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if pixels.ndim == 3:  # colour DICOM (RGB / YBR already converted by pydicom)
        return Image.fromarray(pixels.astype(np.uint8)).convert("L")
    try:
        values = apply_modality_lut(pixels, ds).astype(np.float64)
        if "VOILUTSequence" in ds or "WindowCenter" in ds:
            values = apply_voi_lut(values, ds, index=0)
    except Exception as err:  # e.g. a WindowCenter that is not a number
        raise XrayReadError(f"The DICOM rescale or window values are invalid ({type(err).__name__}).") from None
    image = range_to_uint8(values)
    if photometric == "MONOCHROME1":
        image = 255 - image
    return Image.fromarray(image, mode="L")
