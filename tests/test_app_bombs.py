"""Small files that decode to a lot, and DICOM headers that lie (issue 33): each answered with a 4xx
that says why, never a 500, and the memory budget (pneumonia/reading/budget.py) checked before the
pixels are allocated. The conversion to 8 bits a strip at a time gives what the whole image would.
Time and memory under a real 512 MiB limit: tests/test_dyno.py (slow) and `python -m bench.bombs`."""

from __future__ import annotations

import csv
import io
import socket
import struct
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
from builders import REAL_XRAYS, SHIPPED_MODEL, app_on, dicom_bytes, encode_image, gunicorn_serving, run_cli, upload
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless, generate_uid

from bench.bombs import BOMBS, DECODER_BOMBS, build, deflated_dicom, jpeg_segments
from pneumonia.errors import XrayReadError
from pneumonia.reading.budget import MAX_DECODED_BYTES, STRIP_BYTES, rows_to_uint8
from pneumonia.reading.decoding import decode_xray

REFUSED_OR_SCREENED = {400, 413, 415, 422}  # 413 only for a body over MAX_CONTENT_LENGTH


def oversized_pixel_data() -> bytes:
    """100 x 100 8-bit pixels declared, three times the Pixel Data they need."""
    return dicom_bytes(np.full((300, 100), 0x10, np.uint8), bits_stored=8, rows_cols=(100, 100))


def bad_header_dicom(**tags) -> bytes:
    """A small valid image whose header carries `tags` (e.g. PatientBirthDate="99999999"), and the study
    and series a DICOM result references."""
    uids = {"StudyInstanceUID": generate_uid(), "SeriesInstanceUID": generate_uid()}
    return dicom_bytes(np.tile(np.arange(64, dtype=np.uint8), (64, 1)), bits_stored=8, **(uids | tags))


def range_to_uint8(values: np.ndarray) -> np.ndarray:
    """The strip conversion over a whole array in memory: its min at 0 and its max at 255."""
    return rows_to_uint8(lambda top, bottom: values[top:bottom], *values.shape)


@pytest.fixture(scope="module")
def bombs() -> dict[str, tuple[bytes, str]]:
    return {name: build(name) for name in BOMBS}


@pytest.mark.parametrize("name", list(BOMBS))
def test_every_bomb_is_a_4xx_that_says_why(shipped_app, bombs, name):
    data, query = bombs[name]
    response = shipped_app.test_client().post(f"/api/predict?{query}", data=upload(data, "bomb"))
    assert response.status_code in {400, 422}, response.get_json()
    if response.status_code == 400:
        assert "refused before" in response.get_json()["error"]


def test_a_bomb_is_refused_before_its_pixels_are_decoded(monkeypatch, bombs):
    """The 16-bit PNG bomb never reaches Pillow's decoder (the budget is checked on its header)."""
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded a bomb"))
    with pytest.raises(XrayReadError, match="MiB one image may take"):
        decode_xray(bombs["png 16-bit 7700x7700"][0], 224)


def test_of_many_frames_only_the_first_is_decoded(bombs):
    """20 RLE frames of 32 MB each: together 20 times the budget, one at a time within it."""
    image, stats = decode_xray(bombs["dicom rle 20 frames"][0], 224)
    assert image.size == (4000, 4000) and stats.pixels == 16_000_000
    assert 20 * 4000 * 4000 * 2 > 9 * MAX_DECODED_BYTES


def test_a_deflated_dicom_that_lies_about_its_size_is_refused_once_it_inflates_past_the_cap():
    """Its header declares 64 x 64 pixels; its Pixel Data inflates to 200 MB: inflated in pieces, and
    refused at the cap (25 MiB) before pydicom would inflate the whole."""
    with pytest.raises(XrayReadError, match="inflates to more than 25 MiB"):
        decode_xray(deflated_dicom(64, 64, size=200_000_000))
    assert decode_xray(deflated_dicom(64, 64))[0].size == (64, 64)  # one that says the truth is decoded


@pytest.mark.parametrize(
    ("data", "query", "message"),
    [
        (lambda: oversized_pixel_data(), "", None),  # pydicom read the extra bytes as frames: a 500
        (lambda: bad_header_dicom(PatientBirthDate="99999999"), "result=dicom-sr", "PatientBirthDate"),
        (lambda: bad_header_dicom(StudyInstanceUID="1.2.x.3"), "result=dicom", "StudyInstanceUID"),
        (lambda: bad_header_dicom(StudyTime="256199"), "result=dicom-sr", "StudyTime"),
    ],
)
def test_dicom_headers_that_were_500s_are_4xx(shipped_app, data, query, message):
    response = shipped_app.test_client().post(f"/api/predict?{query}", data=upload(data(), "x.dcm"))
    assert response.status_code in {400, 422}, response.get_data(as_text=True)[:300]
    if message:
        error = response.get_json()["error"]
        assert response.status_code == 400 and message in error and "not a valid DICOM value" in error


def test_the_value_of_an_invalid_tag_is_not_quoted(shipped_app):
    data = bad_header_dicom(PatientBirthDate="19999999")
    response = shipped_app.test_client().post("/api/predict?result=dicom-sr", data=upload(data, "x.dcm"))
    assert response.status_code == 400 and "19999999" not in response.get_data(as_text=True)


def compressed_dicom(side: int, syntax, declared: int) -> bytes:
    """A `side` x `side` 16-bit image compressed as `syntax` by pydicom, in a DICOM that declares
    `declared` x `declared` pixels."""
    pixels = np.random.default_rng(2).integers(0, 4000, (side, side)).astype(np.uint16)
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(pixels, bits_stored=12)))
    ds.compress(syntax)
    ds.Rows = ds.Columns = declared
    buffer = io.BytesIO()
    ds.save_as(buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("syntax", [JPEG2000Lossless, JPEGLSLossless, RLELossless])
def test_a_compressed_frame_larger_than_its_header_says_is_refused_undecoded(syntax):
    assert decode_xray(compressed_dicom(96, syntax, 96))[0].size == (96, 96)  # as declared: decoded
    if syntax != RLELossless:  # RLE is decoded to the declared size whatever its segments hold
        with pytest.raises(XrayReadError, match="does not declare the 64x64 pixels"):
            decode_xray(compressed_dicom(96, syntax, 64))


def test_too_many_file_parts_is_a_413_about_parts_not_size(shipped_app):
    image = encode_image(Image.new("L", (64, 64)), "PNG")
    form = {"file": [(io.BytesIO(image), f"{index}.png") for index in range(200)]}
    response = shipped_app.test_client().post("/api/predict", data=form)
    assert response.status_code == 413 and "too many parts" in response.get_json()["error"]


@pytest.mark.parametrize(("path", "method", "heading"), [("/nowhere", "get", "Page not found"), ("/", "put", "Not")])
def test_404_and_405_pages_do_not_speak_of_an_upload(shipped_app, path, method, heading):
    page = getattr(shipped_app.test_client(), method)(path).get_data(as_text=True)
    assert heading in page and "That upload could not be screened" not in page


def test_the_strip_conversion_gives_what_the_whole_array_gives():
    """Two passes over strips of STRIP_BYTES: the same uint8 as one float64 pass over the whole."""
    rng = np.random.default_rng(0)
    values = rng.integers(100, 40_000, (3 * STRIP_BYTES // (8 * 700) + 5, 700)).astype(np.uint16)
    whole = values.astype(np.float64)
    expected = np.round((whole - whole.min()) * (255.0 / (whole.max() - whole.min()))).astype(np.uint8)
    assert np.array_equal(range_to_uint8(values), expected)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "CMYK", "I;16"])
def test_greyscale_by_strips_equals_pillows_whole_image_conversion(mode):
    rng = np.random.default_rng(1)
    rgba = Image.fromarray(rng.integers(0, 256, (900, 2600, 4), dtype=np.uint8), "RGBA")  # several strips
    image = (
        rgba.convert(mode if mode != "P" else "RGB").convert(mode)
        if mode != "I;16"
        else Image.fromarray(rng.integers(0, 60_000, (900, 2600), np.uint16))
    )
    if mode in ("RGBA", "LA"):
        expected = Image.alpha_composite(Image.new("RGBA", image.size, (0, 0, 0, 255)), image.convert("RGBA"))
    else:
        expected = image.convert("RGB") if mode != "I;16" else None
    grey, _ = decode_xray(encode_image(image, "TIFF" if mode in ("CMYK", "I;16") else "PNG"))
    if expected is None:
        expected = Image.fromarray(range_to_uint8(np.asarray(image)), "L")
    assert np.array_equal(np.asarray(grey), np.asarray(expected.convert("L")))


def test_a_batch_declaring_too_many_pixels_is_a_413_before_any_decode(bombs, monkeypatch):
    app = app_on(SHIPPED_MODEL, BATCH_MAX_PIXELS=100_000_000)
    sandbox = app.extensions["decoding_sandbox"]
    monkeypatch.setattr(sandbox, "prepare", lambda *args, **kwargs: pytest.fail("decoded a file of a refused batch"))
    data = bombs["png 16-bit 7700x7700"][0]
    form = {"file": [(io.BytesIO(data), f"{index}.png") for index in range(2)]}  # 2 x 59.3 Mpx declared
    response = app.test_client().post("/api/predict/batch", data=form)
    assert response.status_code == 413 and "119 megapixels" in response.get_json()["error"]


# --- DICOM headers, fuzzed ---------------------------------------------------------------------

SYNTAXES = [
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated
    "1.2.840.10008.1.2.5",  # RLE Lossless
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
]
SIZES = st.sampled_from([0, 1, 7, 64, 300, 5_000, 65_535])


def fuzzed_dicom(header: dict, syntax: str, pixel_bytes: int) -> bytes:
    """A DICOM whose header says `header` and whose Pixel Data is `pixel_bytes` bytes (native) or a
    100 x 80 JPEG whatever the header says (encapsulated)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.1.1", generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta, ds.SOPClassUID, ds.SOPInstanceUID = (
        meta,
        meta.MediaStorageSOPClassUID,
        meta.MediaStorageSOPInstanceUID,
    )
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality, ds.PatientName = generate_uid(), generate_uid(), "DX", "A^B"
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, "MONOCHROME2", 0
    for keyword, value in header.items():
        setattr(ds, keyword, value)
    if pydicom.uid.UID(syntax).is_compressed:
        ds.PixelData = encapsulate([encode_image(Image.new("L", (100, 80), 90), "JPEG")])
        ds["PixelData"].VR, ds["PixelData"].is_undefined_length = "OB", True
    else:
        ds.PixelData = bytes(pixel_bytes)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


HEADERS = st.fixed_dictionaries(
    {
        "Rows": SIZES,
        "Columns": SIZES,
        "BitsAllocated": st.sampled_from([1, 8, 12, 16, 32, 64]),
        "BitsStored": st.sampled_from([1, 8, 12, 16, 40]),
        "HighBit": st.sampled_from([0, 7, 15]),
        "NumberOfFrames": st.sampled_from([1, 2, 1000, 2**31 - 1]),
        "PatientBirthDate": st.sampled_from(["", "19700101", "99999999", "1970"]),
        "StudyDate": st.sampled_from(["20240229", "20230229", "x"]),
    }
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    header=HEADERS,
    syntax=st.sampled_from(SYNTAXES),
    pixel_bytes=st.sampled_from([0, 1, 4096, 8192, 100_000]),
    result=st.sampled_from(["json", "dicom-sr", "dicom"]),
)
def test_fuzzed_dicom_headers_are_never_a_5xx(shipped_app, header, syntax, pixel_bytes, result):
    data = fuzzed_dicom(header, syntax, pixel_bytes)
    response = shipped_app.test_client().post(f"/api/predict?result={result}", data=upload(data, "x.dcm"))
    assert response.status_code == 200 or response.status_code in REFUSED_OR_SCREENED, (
        response.status_code,
        response.get_data(as_text=True)[:300],
    )


# --- what gunicorn answers itself --------------------------------------------------------------


def raw_answer(url: str, request: bytes) -> bytes:
    """The bytes gunicorn answers `request` with, sent as they are on a fresh connection, up to its
    closing it (each of these answers closes it; a timeout fails the test)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


BAD_CHUNK = (
    b"POST /api/predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
    b"Content-Type: multipart/form-data; boundary=b\r\n\r\nzz\r\n--b\r\n0\r\n\r\n"
)
HUGE_HEADER = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n"
MANY_HEADERS = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(120)) + b"\r\n"


@pytest.mark.slow
def test_http_errors_are_4xx_with_the_apps_security_headers():
    """A bad chunk size (was a 500 logged as "Unexpected InvalidChunkSize") and headers over gunicorn's
    limits: a 4xx that carries the Content-Security-Policy every answer of the app carries."""
    with gunicorn_serving(SHIPPED_MODEL) as (_, url):
        answers = {
            name: raw_answer(url, request)
            for name, request in [
                ("bad chunk", BAD_CHUNK),
                ("huge header", HUGE_HEADER),
                ("many headers", MANY_HEADERS),
            ]
        }
        healthy = requests.get(f"{url}/healthz", timeout=10).status_code
    for name, answer in answers.items():
        status_line, _, rest = answer.partition(b"\r\n")
        assert status_line.split()[1] in (b"400", b"431"), (name, answer[:300])
        assert b"Content-Security-Policy: default-src 'none'" in rest, (name, answer[:600])
    assert healthy == 200


# --- What the decoders' own buffers and loops take (issue 39) ------------------------------------


@pytest.fixture(scope="module")
def decoder_bombs() -> dict[str, bytes]:
    return {name: build(name)[0] for name in DECODER_BOMBS}


@pytest.mark.parametrize("name", list(DECODER_BOMBS))
def test_every_decoder_bomb_is_a_400_that_says_why(shipped_app, decoder_bombs, name):
    response = shipped_app.test_client().post("/api/predict", data=upload(decoder_bombs[name], "bomb"))
    assert response.status_code == 400, response.get_json()
    assert any(why in response.get_json()["error"] for why in ("Refused before decoding", "refused before", "inflate"))


def test_a_batch_of_decoder_bombs_answers_each_and_screens_the_x_ray_among_them(shipped_app, decoder_bombs):
    xray = REAL_XRAYS[0].read_bytes()
    form = {"file": [(io.BytesIO(data), f"{name}.bin") for name, data in decoder_bombs.items()]}
    form["file"].insert(2, (io.BytesIO(xray), "xray.jpeg"))
    entries = shipped_app.test_client().post("/api/predict/batch", data=form).get_json()
    assert [entry["status"] for entry in entries] == [400, 400, 200] + [400] * (len(decoder_bombs) - 2)
    assert entries[2]["probability"] is not None


def test_predict_reports_each_decoder_bomb_and_screens_the_rest(decoder_bombs, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for index, data in enumerate(decoder_bombs.values()):
        (
            folder / f"bomb{index}.{'tif' if data.startswith(b'II') else 'png' if data[1:4] == b'PNG' else 'jpg'}"
        ).write_bytes(data)
    (folder / "xray.jpeg").write_bytes(REAL_XRAYS[0].read_bytes())
    result = run_cli("predict", folder, "--csv", tmp_path / "out.csv", cwd=tmp_path)
    assert result.returncode == 1, result.stderr  # some files could not be read
    rows = list(csv.DictReader((tmp_path / "out.csv").open()))
    by_name = {Path(row["path"]).name: row for row in rows}
    assert len(rows) == len(decoder_bombs) + 1 and by_name["xray.jpeg"]["probability"]
    assert all(row["error"] for name, row in by_name.items() if name.startswith("bomb"))


def _mutated(data: bytes, offset: int, value: bytes) -> bytes:
    return data[:offset] + value + data[offset + len(value) :]


def header_mutations(seed: int = 0, count: int = 12) -> list[tuple[str, bytes]]:
    """Real X-rays (JPEG, PNG, TIFF) with their declared sizes, tile sizes, scan counts and chunk lengths
    changed, drawn from a fixed seed."""
    rng = np.random.default_rng(seed)
    xray = Image.open(REAL_XRAYS[0]).convert("L")
    jpeg = encode_image(xray, "JPEG", progressive=True)
    png = encode_image(xray, "PNG")
    tiff = encode_image(xray, "TIFF", tiffinfo={322: 64, 323: 64})  # tiled
    sof = next(start for marker, start, _ in jpeg_segments(jpeg) if marker == 0xC2)
    cases = []
    for _ in range(count):
        side = struct.pack(">H", int(rng.integers(8, 65_535)))
        cases.append(("jpeg SOF height", _mutated(jpeg, sof + 5, side)))
        cases.append(("jpeg SOF width", _mutated(jpeg, sof + 7, side)))
        cases.append(("png IHDR size", _mutated(png, 16, struct.pack(">II", *rng.integers(1, 1 << 20, 2)))))
        cases.append(("png IDAT length", _mutated(png, 33, struct.pack(">I", int(rng.integers(0, 1 << 31))))))
        cases.append(
            (
                "tiff tile size",
                tiff.replace(
                    struct.pack("<HHII", 322, 3, 1, 64),
                    struct.pack("<HHIHH", 322, 3, 1, int(rng.integers(1, 65_535)), 0),
                ),
            )
        )
    scan = next((start, end) for marker, start, end in jpeg_segments(jpeg) if marker == 0xDA)
    cases.append(("jpeg 101 scans", jpeg[: scan[1]] + jpeg[scan[0] : scan[1]] * 100 + jpeg[scan[1] :]))
    return cases


def test_header_mutations_of_real_x_rays_are_answered_never_500(shipped_app):
    client = shipped_app.test_client()
    for what, data in header_mutations():
        response = client.post("/api/predict", data=upload(data, "mutated"))
        assert response.status_code in {200, 400, 422}, (what, response.get_json())
    assert client.post("/api/predict", data=upload(REAL_XRAYS[0].read_bytes())).status_code in {200, 422}
