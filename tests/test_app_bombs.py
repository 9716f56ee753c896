"""Small files that decode to a lot, and DICOM headers that lie (issue 33): each answered with a 4xx
that says why, never a 500, and the memory budget (pneumonia/reading/budget.py) checked before the
pixels are allocated. The conversion to 8 bits a strip at a time gives what the whole image would.
Time and memory under a real 512 MiB limit: tests/test_dyno.py (slow) and `python -m bench.bombs`."""

from __future__ import annotations

import io
import socket

import numpy as np
import pydicom
import pytest
import requests
from builders import SHIPPED_MODEL, dicom_bytes, encode_image, gunicorn_serving, upload
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless, generate_uid

from bench.bombs import BOMBS, bad_header_dicom, build, deflated_dicom, oversized_pixel_data
from pneumonia.errors import XrayReadError
from pneumonia.reading.budget import MAX_DECODED_BYTES, STRIP_BYTES, range_to_uint8
from pneumonia.reading.decoding import decode_xray

REFUSED_OR_SCREENED = {400, 413, 415, 422}  # 413 only for a body over MAX_CONTENT_LENGTH


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


def test_a_batch_declaring_too_many_pixels_is_a_413_before_any_decode(fresh_shipped_app, bombs, monkeypatch):
    fresh_shipped_app.config["BATCH_MAX_PIXELS"] = 100_000_000
    sandbox = fresh_shipped_app.extensions["decoding_sandbox"]
    monkeypatch.setattr(sandbox, "prepare", lambda *args, **kwargs: pytest.fail("decoded a file of a refused batch"))
    data = bombs["png 16-bit 7700x7700"][0]
    form = {"file": [(io.BytesIO(data), f"{index}.png") for index in range(2)]}  # 2 x 59.3 Mpx declared
    response = fresh_shipped_app.test_client().post("/api/predict/batch", data=form)
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
