"""Small files that decode to a lot (issue 33), built in memory without ever holding their pixels:
the inputs `load.py --bomb-share`, tests/test_app_bombs.py and tests/test_dyno.py send.

    python -m bench.bombs            each bomb decoded alone in the decoding sandbox: answer, seconds, peaks
    python -m bench.bombs --decoder  the same for the files that go past the decoders' own buffers (issue 39)
    python -m bench.bombs --limit    the same for the largest inputs the budget lets through
    python -m bench.bombs --batch    ten 16-bit PNG bombs in one batch request (Flask test client)

Every one must be refused (or, for the one-frame-at-a-time RLE series, screened) within the
memory budget of pneumonia/reading/budget.py; docs/uploads.md has the figures.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import resource
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

SIDE = 7_700  # 59.3 Mpx: just under the 60 Mpx pixel limit, as an attacker would choose
CHUNK_ROWS = 256


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_of_zeros(side: int = SIDE, bit_depth: int = 16, colour_type: int = 0) -> bytes:
    """A PNG of side x side zero pixels (colour type 0 grey, 6 RGBA), deflated a few rows at a time."""
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[colour_type]
    row = b"\x00" * (1 + side * channels * bit_depth // 8)  # filter byte "None", then the samples
    deflate = zlib.compressobj(9)
    rows = [deflate.compress(row * min(CHUNK_ROWS, side - top)) for top in range(0, side, CHUNK_ROWS)]
    header = struct.pack(">IIBBBBB", side, side, bit_depth, colour_type, 0, 0, 0)
    idat = b"".join(rows) + deflate.flush()
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _dataset(rows: int, columns: int, frames: int, **tags):
    """A DX header of 16-bit grey pixels, with `tags` set last."""
    from pydicom.dataset import Dataset
    from pydicom.uid import generate_uid

    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
    ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality = "Bomb^Test", "BOMB-1", "DX"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, columns, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    if frames > 1:
        ds.NumberOfFrames = frames
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    return ds


def _part10(ds, syntax: str, body: bytes) -> bytes:
    """Preamble, file meta for `syntax`, then `body` (the dataset, encoded as the syntax says)."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    meta.TransferSyntaxUID = syntax
    buffer = DicomBytesIO()
    buffer.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buffer, meta, enforce_standard=True)
    return buffer.getvalue() + body


def _explicit_le(ds) -> bytes:
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    return buffer.getvalue()


def deflated_dicom(rows: int = SIDE, columns: int = SIDE, frames: int = 1, size: int | None = None, **tags) -> bytes:
    """A Deflated Explicit VR Little Endian DICOM of zero pixels: its pixel data inflates to `size`
    bytes, by default rows x columns x 2 x frames (what its header declares)."""
    ds = _dataset(rows, columns, frames, **tags)
    size = rows * columns * 2 * frames if size is None else size
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [deflate.compress(_explicit_le(ds) + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, size))]
    piece = b"\x00" * (1 << 20)
    parts += [deflate.compress(piece[: min(len(piece), size - done)]) for done in range(0, size, len(piece))]
    return _part10(ds, "1.2.840.10008.1.2.1.99", b"".join(parts) + deflate.flush())


def rle_dicom(rows: int, columns: int, frames: int) -> bytes:
    """An RLE Lossless DICOM of `frames` zero 16-bit frames (PS3.5 G: two byte segments of runs of
    at most 128 bytes; the runs cross rows, which decoders accept, to keep the file small)."""
    ds = _dataset(rows, columns, frames)
    size = rows * columns
    segment = b"\x81\x00" * (size // 128) + (bytes([257 - size % 128, 0]) if size % 128 else b"")
    header = struct.pack("<16I", 2, 64, 64 + len(segment), *[0] * 13)
    frame = header + segment * 2
    items = b"".join(struct.pack("<HHI", 0xFFFE, 0xE000, len(frame)) + frame for _ in range(frames))
    pixel_data = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF) + struct.pack("<HHI", 0xFFFE, 0xE000, 0)
    pixel_data += items + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    return _part10(ds, "1.2.840.10008.1.2.5", _explicit_le(ds) + pixel_data)


def _jpeg(image, **options) -> bytes:
    from PIL import Image  # noqa: F401  (the caller's image is a PIL image)

    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **options)
    return buffer.getvalue()


def jpeg_segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, start, end) of each segment of a JPEG, an SOS segment running to the end of its
    entropy-coded data (to the next marker that is neither a stuffed 0xFF00 nor a restart marker)."""
    segments, position = [], 2
    while position + 2 <= len(data):
        marker = data[position + 1]
        if marker == 0xD9:  # EOI
            segments.append((marker, position, position + 2))
            break
        end = position + 2 + struct.unpack(">H", data[position + 2 : position + 4])[0]
        if marker == 0xDA:
            while True:
                end = data.index(b"\xff", end)
                if data[end + 1] not in (0x00, *range(0xD0, 0xD8)):
                    break
                end += 2
        segments.append((marker, position, end))
        position = end
    return segments


def jpeg_declaring(data: bytes, width: int, height: int) -> bytes:
    """The JPEG `data` with its SOF segment declaring `width` x `height`: the scans stay those of the
    real, small image, so the file is as small as before (the 795-byte coefficient-buffer bomb)."""
    for marker, start, _ in jpeg_segments(data):
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return data[: start + 5] + struct.pack(">HH", height, width) + data[start + 9 :]
    raise ValueError("no SOF segment")


def progressive_jpeg_declaring(side: int = SIDE) -> bytes:
    """A 64 x 64 progressive 4:4:4 colour JPEG whose SOF declares side x side: libjpeg allocates the
    coefficient buffer of the whole declared image before it reads a scan."""
    from PIL import Image

    small = Image.new("RGB", (64, 64), (120, 60, 200))
    return jpeg_declaring(_jpeg(small, progressive=True, subsampling=0, quality=50), side, side)


def large_progressive_jpeg(side: int = 7_000) -> bytes:
    """A real side x side progressive RGB JPEG (a smooth gradient, so it stays under a megabyte): drafted
    to an eighth it still needs its full-size coefficient buffer."""
    import numpy as np
    from PIL import Image

    ramp = np.linspace(0, 255, side, dtype=np.float32)
    grey = ((ramp[:, None] + ramp[None, :]) / 2).astype(np.uint8)  # (side, side)
    image = Image.fromarray(np.stack([grey, grey[::-1], grey.T], axis=-1), "RGB")
    return _jpeg(image, progressive=True, quality=30)


def repeated_scan_jpeg(scans: int = 10_000, side: int = 2_048) -> bytes:
    """A side x side progressive greyscale JPEG whose last scan is repeated `scans` times: each
    repetition is a few bytes, each costs the decoder a pass over the whole image."""
    from PIL import Image

    image = Image.linear_gradient("L").resize((side, side))
    data = _jpeg(image, progressive=True, quality=50)
    *_, (_, start, end), (_, eoi, _) = jpeg_segments(data)
    return data[:end] + data[start:end] * (scans - 1) + data[eoi:]


def tiff_with_one_tile(side: int = 4_096, tile: int = 16_384) -> bytes:
    """A 16-bit greyscale LZW TIFF of side x side pixels stored as one tile x tile tile: about a kilobyte,
    and the tile's buffer is what the decoder allocates (512 MiB at 16,384 px)."""
    entries = [  # (tag, type, value): type 3 SHORT, 4 LONG
        (256, 4, side), (257, 4, side), (258, 3, 16), (259, 3, 5), (262, 3, 1), (277, 3, 1),
        (322, 4, tile), (323, 4, tile), (324, 4, 0), (325, 4, 0),
    ]  # fmt: skip
    data_offset = 8 + 2 + 12 * len(entries) + 4
    strip = b"\x80\x00" + b"\x00" * 1000  # an LZW clear code, then little else: decoding runs out of data
    ifd = struct.pack("<H", len(entries))
    for tag, kind, value in entries:
        value = {324: data_offset, 325: len(strip)}.get(tag, value)
        packed = struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value)
        ifd += struct.pack("<HHI", tag, kind, 1) + packed
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + strip


def png_with_chunk(kind: bytes = b"zTXt", inflated: int = 2 * 1024 * 1024) -> bytes:
    """A small valid greyscale PNG carrying an ancillary `kind` chunk (zTXt, iTXt or iCCP) whose
    compressed text or profile inflates to `inflated` bytes."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (64, 64), 100).save(buffer, "PNG")
    plain = buffer.getvalue()
    packed = zlib.compress(b"\x00" * inflated, 9)
    payload = {
        b"zTXt": b"Comment\x00\x00" + packed,
        b"iTXt": b"Comment\x00\x01\x00\x00\x00" + packed,
        b"iCCP": b"profile\x00\x00" + packed,
    }[kind]
    ihdr_end = 8 + 25  # signature, then IHDR (length, type, 13 bytes, CRC)
    return plain[:ihdr_end] + _png_chunk(kind, payload) + plain[ihdr_end:]


# name -> (builder, query string): what `load.py` and the tests send.
BOMBS = {
    "png 16-bit 7700x7700": (lambda: png_of_zeros(), ""),
    "png RGBA 7700x7700": (lambda: png_of_zeros(bit_depth=8, colour_type=6), ""),
    "dicom deflated 7700x7700": (lambda: deflated_dicom(), ""),
    "dicom deflated 300 MB sr": (lambda: deflated_dicom(6_000, 6_250, 4), "result=dicom-sr"),
    "dicom deflated 4 frames": (lambda: deflated_dicom(4_000, 4_000, 4), ""),
    "dicom rle 20 frames": (lambda: rle_dicom(4_000, 4_000, 20), ""),
    "dicom rle 5900x5900": (lambda: rle_dicom(5_900, 5_900, 2), ""),
}

# What the decoders' own buffers and loops take, past any header check (issue 39): what the decoding
# sandbox must bound (pneumonia/serving/sandbox.py).
DECODER_BOMBS = {
    "jpeg progressive declaring 7700x7700": (lambda: progressive_jpeg_declaring(), ""),
    "tiff 16-bit one 16384 px tile": (lambda: tiff_with_one_tile(), ""),
    "jpeg progressive 7000x7000": (lambda: large_progressive_jpeg(), ""),
    "jpeg one scan 10000 times": (lambda: repeated_scan_jpeg(), ""),
    "png zTXt inflating to 2 MB": (lambda: png_with_chunk(b"zTXt"), ""),
    "png iTXt inflating to 2 MB": (lambda: png_with_chunk(b"iTXt"), ""),
    "png iCCP inflating to 2 MB": (lambda: png_with_chunk(b"iCCP"), ""),
}

# The largest inputs the budget lets through, each the worst of its kind for memory: what a decode
# at the limit costs (`python -m bench.bombs --limit`).
AT_THE_LIMIT = {
    "png 16-bit 5000x5000": (lambda: png_of_zeros(5_000), ""),
    "png RGBA 3500x3500": (lambda: png_of_zeros(3_500, bit_depth=8, colour_type=6), ""),
    "png grey 7000x7000": (lambda: png_of_zeros(7_000, bit_depth=8), ""),
    "dicom deflated 3500x3500": (lambda: deflated_dicom(3_500, 3_500), ""),
    "dicom rle 4000x4000": (lambda: rle_dicom(4_000, 4_000, 1), ""),
}


def build(name: str) -> tuple[bytes, str]:
    """(the file, the query string to send it with)."""
    builder, query = {**BOMBS, **AT_THE_LIMIT, **DECODER_BOMBS}[name]
    return builder(), query


def _decode_one(name: str) -> dict:
    """`name` decoded as every path decodes it, in the decoding sandbox (pneumonia/serving/sandbox.py) with
    its default limits: the answer, the seconds (a fresh child's start included), the address space the
    child took over its start, and this process's peak RSS while it waited (decoding no longer moves it)."""
    from pneumonia.errors import XrayReadError
    from pneumonia.serving.sandbox import DecodingSandbox

    data, _ = build(name)
    sandbox = DecodingSandbox(workers=1)
    # Resets this process's peak RSS (VmHWM): building the file is not decoding.
    Path("/proc/self/clear_refs").write_text("5")
    started = time.perf_counter()
    peak = None
    try:
        prepared = sandbox.prepare(data, 224)
        answer, peak = f"decoded {prepared.stats.width}x{prepared.stats.height}", prepared.peak_mib
    except XrayReadError as err:
        answer = f"refused: {err}"
    seconds = time.perf_counter() - started
    sandbox.close()
    return {
        "bomb": name,
        "bytes": len(data),
        "seconds": round(seconds, 3),
        "child_peak_mib": peak,
        "serving_peak_rss_mib": _peak_rss_mib(),
        "answer": answer,
    }


def _peak_rss_mib() -> float:
    """This process's peak resident memory since its last reset (VmHWM)."""
    status = Path("/proc/self/status").read_text()
    return round(int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.M).group(1)) / 1024, 1)


def _batch_of_ten() -> dict:
    """Ten 16-bit PNG bombs in one POST /api/predict/batch, through Flask's test client on the shipped model."""

    from pneumonia.web import create_app

    app = create_app({"MODEL_PATH": str(Path(__file__).resolve().parent.parent / "model"), "TESTING": True})
    data, _ = build("png 16-bit 7700x7700")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.perf_counter()
    form = {"file": [(io.BytesIO(data), f"{index}.png") for index in range(10)]}
    response = app.test_client().post("/api/predict/batch", data=form)
    return {
        "status": response.status_code,
        "files": [entry["status"] for entry in response.get_json()],
        "seconds": round(time.perf_counter() - started, 3),
        "peak_rss_mib": {
            "before": round(before),
            "after": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--limit", action="store_true", help="the largest inputs the budget lets through, not the bombs")
    mode.add_argument("--decoder", action="store_true", help="the files that go past the decoders' own buffers")
    mode.add_argument("--batch", action="store_true", help="ten 16-bit PNG bombs in one batch request")
    mode.add_argument("--one", metavar="NAME", help="decode the input NAME in this process (what each child runs)")
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(_decode_one(args.one)))
        return 0
    if args.batch:
        print(json.dumps(_batch_of_ten()))
        return 0
    for name in AT_THE_LIMIT if args.limit else DECODER_BOMBS if args.decoder else BOMBS:  # a fresh process each
        result = subprocess.run([sys.executable, "-m", "bench.bombs", "--one", name], capture_output=True, text=True)
        print(result.stdout.strip() or result.stderr.strip()[-500:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
