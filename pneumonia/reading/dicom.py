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
import struct
import zlib

import numpy as np
from PIL import Image

from pneumonia.errors import XrayReadError
from pneumonia.reading.budget import MAX_DECODED_BYTES, MIB, check_decoded_bytes, rows_to_uint8, strips

DICOM_MAGIC_OFFSET = 128
RLE_LOSSLESS = "1.2.840.10008.1.2.5"
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


def header_values(data: bytes, keywords) -> dict[str, str | list[str]]:
    """The values of `keywords` in the header of DICOM bytes, as text (a multi-valued one as a list of
    text), read without the pixels: what a result must reference, handed out of the decoding sandbox as
    plain values rather than a dataset."""
    from pydicom.multival import MultiValue

    ds = read_dicom(data, stop_before_pixels=True)
    values: dict[str, str | list[str]] = {}
    for keyword in keywords:
        try:
            value = ds[keyword].value if keyword in ds else None
        except Exception:  # pydicom raises many types on damaged elements
            raise XrayReadError(f"The DICOM file's {keyword} could not be read.") from None
        if value is None or value == "":
            continue
        values[keyword] = [str(item) for item in value] if isinstance(value, (MultiValue, list)) else str(value)
    return values


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
    inflater, pending = zlib.decompressobj(-zlib.MAX_WBITS), memoryview(data)[found[1] :]
    try:
        head = inflater.decompress(pending, INFLATE_PIECE)
        # What the header declares: most bombs are refused on it at once, without inflating the rest.
        declared, inflated = _declared_pixel_bytes(head), len(head)
        pending = inflater.unconsumed_tail
        while pending and max(declared, inflated) <= cap:
            inflated += len(inflater.decompress(pending, INFLATE_PIECE))
            pending = inflater.unconsumed_tail
    except zlib.error:
        return  # dcmread says the file is damaged
    if max(declared, inflated) > cap:
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


def _declared_pixel_bytes(head: bytes) -> int:
    """Rows x Columns x samples x bytes per sample x frames as the dataset at the start of `head` (Explicit
    VR Little Endian, read up to its Pixel Data) declares them; 0 when they cannot be read from it."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import read_dataset

    def at_pixel_data(tag, vr, length) -> bool:
        return tag in (0x7FE00008, 0x7FE00009, 0x7FE00010)  # Float, Double Float or Pixel Data

    try:
        ds = read_dataset(DicomBytesIO(head), False, True, stop_when=at_pixel_data)
        keywords = ("Rows", "Columns", "SamplesPerPixel", "NumberOfFrames")
        declared = [max(1, int(ds.get(keyword, 1) or 1)) for keyword in keywords]
        return math.prod(declared) * max(1, math.ceil(int(ds.get("BitsAllocated", 8) or 8) / 8))
    except Exception:  # pydicom raises many types on damaged files: the inflated size decides
        return 0


def dicom_to_image(data: bytes, max_pixels: int) -> Image.Image:
    """DICOM bytes -> PIL "L". Raises XrayReadError for what cannot or should not be decoded."""
    ds = read_dicom(data)
    if "PixelData" not in ds:
        raise XrayReadError("The DICOM file holds no image (no Pixel Data).")
    rows, columns, samples = _checked_size(ds, max_pixels)
    _check_codestream(ds, rows, columns, samples)
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


def _codestream_size(frame: bytes) -> tuple[int, int, int] | None:
    """(width, height, components) a JPEG, JPEG-LS or JPEG 2000 codestream's header declares, else None."""
    from pydicom.pixels.utils import _get_jpg_parameters

    if frame.startswith(b"\xff\xd8"):  # JPEG or JPEG-LS: its SOF segment
        found = _get_jpg_parameters(frame)
        return (found["width"], found["height"], found["components"]) if "width" in found else None
    start = frame.find(b"\xff\x4f\xff\x51", 0, 4096)  # JPEG 2000: SOC then SIZ (inside a JP2 box or not)
    if start < 0 or len(frame) < start + 42:
        return None
    # SIZ (ISO/IEC 15444-1 A.5.1) after SOC: Lsiz, Rsiz, Xsiz, Ysiz, XOsiz, YOsiz, 4 tile sizes, Csiz.
    xsiz, ysiz, xosiz, yosiz = struct.unpack(">4I", frame[start + 8 : start + 24])
    return xsiz - xosiz, ysiz - yosiz, struct.unpack(">H", frame[start + 40 : start + 42])[0]


def _check_codestream(ds, rows: int, columns: int, samples: int) -> None:
    """A JPEG-family frame is decoded at the size its own header declares, which may not be the
    dataset's (a 9,000 x 9,000 JPEG in a 64 x 64 DICOM took 313 MiB before pydicom refused the result):
    refuse one that declares more, or whose header cannot be read, before decoding it."""
    from pydicom.encaps import generate_frames

    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if syntax is None or not syntax.is_encapsulated or syntax == RLE_LOSSLESS:  # RLE: decoded as declared
        return
    try:
        frames = max(1, int(ds.get("NumberOfFrames", 1) or 1))
        size = _codestream_size(next(generate_frames(ds.PixelData, number_of_frames=frames)))
    except Exception:  # pydicom raises many types on damaged encapsulation
        size = None
    if size is None or size[0] * size[1] * size[2] > columns * rows * samples:
        raise XrayReadError(
            f"The DICOM image's compressed data does not declare the {columns}x{rows} pixels its header says; "
            "refused before decoding."
        )


def _first_frame(ds) -> np.ndarray:
    """The first frame (a radiograph series: the first image) only, whatever the number of frames.
    RLE is decoded by pylibjpeg-rle: pydicom's own RLE decoder peaks at three times the frame (94 MiB
    for a 4,000 x 4,000 16-bit one, under tracemalloc), pylibjpeg-rle at twice (62 MiB); both are lossless."""
    syntax = ds.file_meta.get("TransferSyntaxUID", None) if hasattr(ds, "file_meta") else None
    try:
        ds.pixel_array_options(index=0, decoding_plugin="pylibjpeg" if syntax == RLE_LOSSLESS else "")
        return ds.pixel_array
    except Exception as err:  # pydicom raises many types: missing decoder, bad lengths, ...
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
