"""Bytes or a file to an upright 8-bit greyscale image: the reading every path shares.

JPEG, PNG, BMP, TIFF (any Pillow mode; 16-bit scaled by its range) and DICOM (`dicom.py`). A
decompression bomb or an oversized image is refused before its pixels are allocated.

A large JPEG is decoded only as large as needed (`decode_xray`'s `model_side`): at the smallest
of libjpeg's DCT scales (1/2, 1/4, 1/8) that leaves both sides at least DRAFT_MARGIN times the
model's square and at least DRAFT_MIN_SIDE. The scale depends on the image and the model only,
never on what else is asked for (a display copy is made from the same decoded image), and the
training cache decodes so too: every path gives the model the same square for the same bytes.
"""

from __future__ import annotations

import io
import math
import warnings
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, JpegImagePlugin, UnidentifiedImageError

from pneumonia.errors import XrayReadError
from pneumonia.reading.budget import check_decoded_bytes, rows_to_uint8, strips
from pneumonia.reading.dicom import declared_pixels as dicom_declared_pixels
from pneumonia.reading.dicom import dicom_to_image, is_dicom
from pneumonia.reading.pixel_stats import PixelStats, grey_spread, mean_chroma

Source = bytes | bytearray | str | Path

# Magic numbers of the accepted types: the web app refuses anything else before decoding, and
# `predict` recognises images in a folder by them.
IMAGE_SIGNATURES = (
    ("JPEG", 0, b"\xff\xd8\xff"),
    ("PNG", 0, b"\x89PNG\r\n\x1a\n"),
    ("BMP", 0, b"BM"),
    ("TIFF", 0, b"II*\x00"),
    ("TIFF", 0, b"MM\x00*"),
    ("DICOM", 128, b"DICM"),
)
SIGNATURE_BYTES = 132  # enough of a file's head for every signature
ACCEPTED_TYPES = "JPEG, PNG, BMP, TIFF or DICOM"

# A 2,900 px X-ray is ~8 Mpx; 60 Mpx leaves headroom for large scanners while refusing
# decompression bombs (a tiny PNG that claims 100k x 100k pixels) before decoding.
MAX_IMAGE_PIXELS = 60_000_000

# A JPEG decoded at a DCT scale keeps at least DRAFT_MARGIN pixels per model pixel along each side,
# so the antialiased resize to the square still averages over several decoded pixels, and at least
# DRAFT_MIN_SIDE on its short side, so the display copy made from the same decoded image stays sharp
# on the result page. `python -m bench.draft_decoding` measures what it changes.
DRAFT_MARGIN = 4
DRAFT_MIN_SIDE = 512


def sniff_format(head: bytes) -> str | None:
    """The accepted type whose magic number the first bytes `head` carry, else None."""
    for name, offset, magic in IMAGE_SIGNATURES:
        if head[offset : offset + len(magic)] == magic:
            return name
    return None


def refusal_at_start(head: bytes, name: str) -> str | None:
    """Why a file cannot be read, when its first bytes `head` already settle it, else None (the rest decides).
    Only a JPEG whose markers break off within them: Pillow's own parser reads the same bytes the same way
    and refuses the whole file there, so the decoding sandbox need not be handed the rest (a 19 MB upload of
    noise behind a JPEG signature is refused on its first 64 kB)."""
    if sniff_format(head) != "JPEG":
        return None
    try:
        JpegImagePlugin.JpegImageFile(io.BytesIO(head)).close()
    except SyntaxError as err:
        if str(err) == "no marker found":  # a byte after 0xFF that no JPEG marker has: final, whatever follows
            return unsupported_message(name)
    except Exception:  # past the end of `head` (a header longer than it): the whole file decides
        return None
    return None


def unsupported_message(name: str) -> str:
    return f"{name} is not a supported image (JPEG, PNG, BMP, TIFF or DICOM)."


def _source_bytes(source: Source, bytes_name: str) -> tuple[bytes, str]:
    """(the bytes, what messages call them): `bytes_name` for bytes, the path for a file."""
    if isinstance(source, (bytes, bytearray)):
        if len(source) == 0:
            raise XrayReadError("The file is empty.")
        return bytes(source), bytes_name
    path = Path(source)
    if not path.is_file():
        raise XrayReadError(f"No such image file: {path}")
    if path.stat().st_size == 0:
        raise XrayReadError(f"{path} is empty.")
    return path.read_bytes(), str(path)


def _open_image(data: bytes, name: str) -> Image.Image:
    """Opens without decoding pixels, so size checks happen before any large allocation."""
    stream = io.BytesIO(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(stream)
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        if isinstance(err, UnidentifiedImageError):
            raise XrayReadError(unsupported_message(name)) from None
        raise XrayReadError(f"{name} declares too many pixels to be an X-ray; refused before decoding.") from None
    except OSError as err:
        raise XrayReadError(f"{name} could not be read as an image: {err}") from None
    except ValueError:  # Pillow's MAX_TEXT_CHUNK: a PNG text or ICC profile chunk that inflates past 1 MB
        raise XrayReadError(
            f"{name[:1].upper()}{name[1:]} carries a text or colour-profile chunk that inflates too far to be "
            "read; refused before decoding."
        ) from None
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        image.close()
        raise XrayReadError(
            f"{name} is {width}x{height} pixels, more than the {MAX_IMAGE_PIXELS:,} allowed; refused before decoding."
        )
    if width < 8 or height < 8:
        image.close()
        raise XrayReadError(f"{name} is only {width}x{height} pixels: too small to be an X-ray.")
    return image


# Bytes Pillow allocates per pixel of a decoded image: 1 for "1", "L" and "P", 2 for 16-bit greyscale,
# 4 for every other mode (it stores RGB in 32 bits a pixel).
STORED_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}
RANGE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")  # scaled by their range to 8 bits, not clipped
# EXIF orientation -> the transposition that makes the image upright (as ImageOps.exif_transpose).
ORIENTATIONS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _strip_to_grey(strip: Image.Image) -> Image.Image:
    """A colour strip to "L", as the whole image would be converted: each pixel on its own."""
    if strip.mode in ("RGBA", "LA", "PA") or (strip.mode == "P" and "transparency" in strip.info):
        # Transparent pixels become black, the background of an X-ray.
        rgba = strip.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("L")
    if strip.mode == "RGB":
        return strip.convert("L")
    return strip.convert("RGB").convert("L")  # CMYK, YCbCr, palette, 1-bit: via RGB


def _to_greyscale(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit "L"; 16-bit and float data are scaled by their range, not clipped. A
    strip of rows at a time (budget.py): besides the decoded image, only the "L" result is full size."""
    if image.mode == "L":
        image.load()
        return image
    width, height = image.size
    if image.mode in RANGE_MODES:
        pixels = rows_to_uint8(lambda top, bottom: np.asarray(image.crop((0, top, width, bottom))), height, width)
        return Image.fromarray(pixels, mode="L")
    grey = Image.new("L", image.size)
    for top, bottom in strips(height, width):
        grey.paste(_strip_to_grey(image.crop((0, top, width, bottom))), (0, top))
    return grey


def _upright(grey: Image.Image, orientation: int | None) -> Image.Image:
    """The greyscale image turned as its EXIF orientation says; the same as turning the stored image,
    at a quarter of the memory for colour."""
    method = ORIENTATIONS.get(orientation)
    return grey if method is None else grey.transpose(method)


def _draft(image: Image.Image, model_side: int | None) -> None:
    """A JPEG not yet decoded: ask libjpeg for the smallest DCT scale that leaves both sides at least
    DRAFT_MARGIN x model_side and DRAFT_MIN_SIDE (none when model_side is None)."""
    if image.format != "JPEG" or model_side is None:
        return
    width, height = image.size
    least = max(DRAFT_MARGIN * model_side, DRAFT_MIN_SIDE)
    for scale in (8, 4, 2):
        if min(width, height) // scale >= least:
            image.draft(image.mode, (width // scale, height // scale))
            return


# A progressive JPEG may carry any number of scans, each costing a pass over the whole image (one scan
# repeated 10,000 times took 24 to 56 s to decode: issue 39). Encoders write about ten (libjpeg's
# default script: 10 for colour, 6 for grey); libjpeg-turbo's own tools cap untrusted input at 500.
MAX_JPEG_SCANS = 100


def check_decoder_buffers(image: Image.Image, data: bytes) -> None:
    """XrayReadError for what a decoder would allocate beyond the decoded image, read from the headers:
    a progressive JPEG's whole-image coefficient buffer (kept at full size whatever the DCT scale) and
    its number of scans, a TIFF's tile buffer (allocated whole, however small the image)."""
    if image.format == "JPEG" and image.info.get("progressive"):
        scans = data.count(b"\xff\xda")  # entropy-coded data never holds FF DA (an FF there is followed by 00 or RST)
        if scans > MAX_JPEG_SCANS:
            raise XrayReadError(
                f"The JPEG has {scans:,} scans; an X-ray has about ten and at most {MAX_JPEG_SCANS} are decoded. "
                "Refused before decoding."
            )
        check_decoded_bytes("The progressive JPEG's coefficient buffer", *image.size, _coefficient_bytes(image))
    tile = getattr(image, "tag_v2", {}).get(322), getattr(image, "tag_v2", {}).get(323)  # TileWidth, TileLength
    if image.format == "TIFF" and all(tile):
        check_decoded_bytes("One tile of the TIFF", int(tile[0]), int(tile[1]), STORED_BYTES.get(image.mode, 4))


def _coefficient_bytes(image: Image.Image) -> int:
    """Bytes per pixel of a JPEG's coefficient buffer, rounded up: 2 bytes a coefficient for each
    component, scaled by its sampling factors (4:2:0 colour: 3 bytes a pixel; 4:4:4: 6)."""
    layers = image.layer or [("", 1, 1, 0)]  # (component id, h, v, quantisation table)
    h_max, v_max = max(h for _, h, _, _ in layers), max(v for _, _, v, _ in layers)
    return math.ceil(sum(2 * h * v / (h_max * v_max) for _, h, v, _ in layers))


def decode_xray(
    source: Source, model_side: int | None = None, bytes_name: str = "the upload"
) -> tuple[Image.Image, PixelStats]:
    """Decodes bytes or a file (JPEG, PNG, BMP, TIFF or DICOM) into an upright 8-bit greyscale image,
    and what the gate's pixel checks measure: the size as stored, the colour before the greyscale
    conversion and the grey-level spread after it. With `model_side`, a large JPEG is decoded at a
    reduced DCT scale (`_draft`); otherwise at its own size. Messages call bytes `bytes_name`, a file its path."""
    data, name = _source_bytes(source, bytes_name)
    if is_dicom(data):
        image, chroma = dicom_to_image(data, MAX_IMAGE_PIXELS), 0.0
        stored_size = image.size
    else:
        opened = _open_image(data, name)
        stored_size = opened.size
        try:
            check_decoder_buffers(opened, data)  # at the stored size: a DCT scale leaves the coefficients whole
            _draft(opened, model_side)
            check_decoded_bytes("The image", *opened.size, STORED_BYTES.get(opened.mode, 4))
            orientation = opened.getexif().get(ExifTags.Base.Orientation)
            chroma = mean_chroma(opened)
            grey = _to_greyscale(opened)
            if grey is not opened:
                opened.close()  # the decoded pixels: only the greyscale copy is needed now
            image = _upright(grey, orientation)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            opened.close()  # Pillow leaves the file open when decoding fails
            if isinstance(err, XrayReadError):
                raise
            raise XrayReadError(f"The image is corrupt or truncated ({err}).") from None
    # The pixel checks read the pixel count and the aspect ratio: the same whichever way up.
    return image, PixelStats(*stored_size, chroma, grey_spread(image))


def declared_pixels(data: bytes) -> int:
    """The pixels an upload's header declares, read without decoding anything (what a batch adds up
    before it screens: pneumonia/web/batch.py); 0 when its header cannot be read (decoding refuses it)."""
    if is_dicom(data):
        return dicom_declared_pixels(data, MAX_IMAGE_PIXELS)
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.width * image.height
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return 0


def load_xray(source: Source, model_side: int | None = None) -> Image.Image:
    """The upright 8-bit greyscale image of `decode_xray`."""
    return decode_xray(source, model_side)[0]
