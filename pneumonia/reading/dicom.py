"""DICOM to an 8-bit greyscale image, for `decoding.decode_xray`.

Modality LUT (rescale slope/intercept), then the VOI LUT or window the file carries, then
MONOCHROME1 inverted so bone is bright as in the JPEG training images. Patient tags are
never read into messages or logs.

Memory (budget.py): a deflated dataset is inflated once in pieces to count its size before pydicom
inflates it whole; only the first frame is decoded, after its decoded size is checked against the
budget, and the LUTs and the scaling to 8 bits run a strip of rows at a time.
"""

from __future__ import annotations

import io
import math
import zlib

import numpy as np
from PIL import Image

from pneumonia.errors import XrayReadError
from pneumonia.reading.budget import MAX_DECODED_BYTES, MIB, check_decoded_bytes, rows_to_uint8, strips

DICOM_MAGIC_OFFSET = 128
DEFLATED = "1.2.840.10008.1.2.1.99"  # Deflated Explicit VR Little Endian: the whole dataset is one deflate stream
# A deflated dataset may inflate to half the budget, plus this much of header. Half: pydicom holds the
# inflated dataset, the Pixel Data it copies out of it and the decoded frame at once (a 62 MiB
# deflated image peaked at 226 MiB over the process's baseline: `python -m bench.bombs --limit`).
INFLATED_CAP = MAX_DECODED_BYTES // 2 + MIB
INFLATE_PIECE = MIB


def is_dicom(data: bytes) -> bool:
    return data[DICOM_MAGIC_OFFSET : DICOM_MAGIC_OFFSET + 4] == b"DICM"


def read_dicom(data: bytes, stop_before_pixels: bool = False):
    """The pydicom dataset of DICOM bytes; XrayReadError when it cannot be parsed, or when it is deflated
    and inflates to more than the budget (checked in pieces, before pydicom inflates it whole)."""
    import pydicom

    _check_inflated_size(data)
    try:
        return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=stop_before_pixels)
    except Exception as err:  # pydicom raises many types on damaged files
        raise XrayReadError(f"The DICOM file could not be parsed ({type(err).__name__}).") from None


def _dataset_offset(data: bytes) -> tuple[str, int] | None:
    """(transfer syntax UID, where the dataset after the file meta starts), or None when the meta is unreadable."""
    from pydicom.filereader import _read_file_meta_info, read_preamble

    stream = io.BytesIO(data)
    try:
        read_preamble(stream, False)
        meta = _read_file_meta_info(stream)
    except Exception:  # dcmread says what is wrong with it
        return None
    return str(meta.get("TransferSyntaxUID", "")), stream.tell()


def _check_inflated_size(data: bytes) -> None:
    found = _dataset_offset(data)
    if found is None or found[0] != DEFLATED:
        return
    cap = INFLATED_CAP
    inflater, pending, size = zlib.decompressobj(-zlib.MAX_WBITS), memoryview(data)[found[1] :], 0
    try:
        while pending and size <= cap:
            size += len(inflater.decompress(pending, INFLATE_PIECE))
            pending = inflater.unconsumed_tail
    except zlib.error:
        return  # dcmread says the file is damaged
    if size > cap:
        raise XrayReadError(
            f"The deflated DICOM file inflates to more than {cap // MIB} MiB, more than a deflated image may "
            "take; refused before inflating it."
        )


def declared_pixels(data: bytes, max_pixels: int) -> int:
    """Rows x Columns as the header says (nothing inflated or decoded); `max_pixels` for a deflated
    file, whose header is inside its deflated stream; 0 when the header cannot be read (decoding refuses it)."""
    import pydicom

    found = _dataset_offset(data)
    if found is None:
        return 0
    if found[0] == DEFLATED:
        return max_pixels
    try:
        header = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        return max(0, int(header.get("Rows", 0) or 0)) * max(0, int(header.get("Columns", 0) or 0))
    except Exception:  # pydicom raises many types on damaged files
        return 0


def dicom_to_image(data: bytes, max_pixels: int) -> Image.Image:
    """DICOM bytes -> PIL "L". Raises XrayReadError for what cannot or should not be decoded."""
    ds = read_dicom(data)
    if "PixelData" not in ds:
        raise XrayReadError("The DICOM file holds no image (no Pixel Data).")
    rows, columns, samples = _checked_size(ds, max_pixels)
    pixels = _first_frame(ds)
    if pixels.shape[:2] != (rows, columns) or pixels.ndim != (2 if samples == 1 else 3):
        raise XrayReadError(
            f"The DICOM pixel data does not hold {columns}x{rows} pixels of {samples} sample(s) as its header says."
        )
    if samples != 1:  # colour DICOM (RGB / YBR already converted by pydicom)
        return Image.fromarray(_colour_to_grey(pixels), mode="L")
    image = rows_to_uint8(lambda top, bottom: _apply_luts(pixels[top:bottom], ds), rows, columns)
    if str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper() == "MONOCHROME1":
        np.subtract(255, image, out=image)
    return Image.fromarray(image, mode="L")


def _checked_size(ds, max_pixels: int) -> tuple[int, int, int]:
    """(rows, columns, samples per pixel) when one frame fits the pixel limit and the memory budget."""
    try:
        rows, columns = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        bits = int(ds.get("BitsAllocated", 8) or 8)
    except Exception:
        raise XrayReadError("The DICOM file has an unreadable image size.") from None
    if rows * columns > max_pixels:
        raise XrayReadError(f"The DICOM image is {columns}x{rows} pixels, more than the {max_pixels:,} allowed.")
    if rows < 1 or columns < 1 or samples not in (1, 3):
        raise XrayReadError(f"The DICOM image declares {columns}x{rows} pixels of {samples} samples: not an X-ray.")
    check_decoded_bytes("The DICOM image", columns, rows, samples * max(1, math.ceil(bits / 8)))
    return rows, columns, samples


def _first_frame(ds) -> np.ndarray:
    """The first frame (a radiograph series: the first image) only, whatever the number of frames."""
    try:
        ds.pixel_array_options(index=0)
        return ds.pixel_array
    except Exception as err:  # pydicom raises many types: missing decoder, bad lengths, ...
        syntax = ds.file_meta.get("TransferSyntaxUID", None) if hasattr(ds, "file_meta") else None
        name = getattr(syntax, "name", str(syntax)) if syntax is not None else "unknown"
        raise XrayReadError(
            f"The DICOM pixel data could not be decoded (transfer syntax: {name}). "
            "Export the image uncompressed or as PNG/JPEG. "
            f"({type(err).__name__})"
        ) from None


def _apply_luts(pixels: np.ndarray, ds) -> np.ndarray:
    """Rows of stored values -> float64 after the modality LUT and the VOI LUT or window; both act
    on each value alone, so rows give what the whole image would."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        values = apply_modality_lut(pixels, ds).astype(np.float64)
        if "VOILUTSequence" in ds or "WindowCenter" in ds:
            values = apply_voi_lut(values, ds, index=0)
    except Exception as err:  # e.g. a WindowCenter that is not a number
        raise XrayReadError(f"The DICOM rescale or window values are invalid ({type(err).__name__}).") from None
    return values


def _colour_to_grey(pixels: np.ndarray) -> np.ndarray:
    """uint8 (H, W) from (H, W, 3) samples, Pillow's RGB -> L a strip at a time (no full-size RGB copy)."""
    out = np.empty(pixels.shape[:2], np.uint8)
    for top, bottom in strips(*pixels.shape[:2]):
        strip = np.ascontiguousarray(pixels[top:bottom], dtype=np.uint8)  # as astype(np.uint8) would
        out[top:bottom] = np.asarray(Image.fromarray(strip).convert("L"))
    return out
