"""Every accepted input type, DICOM included, and every kind of bad input, through both the
result page and the JSON API."""

from __future__ import annotations

import base64

import cv2
import numpy as np
import pytest
from builders import PATIENT_ID, dicom_bytes, encode_image, png_bomb, probability_of, synthetic_xray, upload, xray_jpeg
from PIL import Image

from pneumonia.serving.classifier import XrayClassifier


def reference_xray() -> np.ndarray:
    """uint8 (128, 160) spanning exactly 0..255, with a black and a white corner block, so
    every reasonable 16-bit or windowed decoding of the DICOMs below gives back these pixels."""
    image = np.asarray(synthetic_xray(1, np.random.default_rng(2), 128).resize((160, 128)), np.float64)
    pixels = np.round((image - image.min()) * 255 / (image.max() - image.min())).astype(np.uint8)
    pixels[:8, :8], pixels[:8, -8:] = 0, 255
    return pixels


def gradcam_image(body: dict) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(base64.b64decode(body["gradcam_jpeg"]), np.uint8), cv2.IMREAD_COLOR)


def _greyscale_rgb(image: Image.Image) -> Image.Image:
    return image.convert("RGB")


def _sixteen_bit(image: Image.Image) -> Image.Image:
    return Image.fromarray(np.asarray(image, np.uint16) * 257)


def _rgba(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    rgba.putalpha(255)
    return rgba


FORMATS = {
    "JPEG greyscale": lambda im: encode_image(im, "JPEG", quality=90),
    "JPEG colour": lambda im: encode_image(_greyscale_rgb(im), "JPEG", quality=90),
    "PNG 8-bit": lambda im: encode_image(im, "PNG"),
    "PNG 16-bit": lambda im: encode_image(_sixteen_bit(im), "PNG"),
    "PNG RGBA": lambda im: encode_image(_rgba(im), "PNG"),
    "PNG palette": lambda im: encode_image(im.convert("P"), "PNG"),
    "BMP": lambda im: encode_image(im, "BMP"),
    "TIFF": lambda im: encode_image(im, "TIFF"),
    "TIFF 16-bit LZW": lambda im: encode_image(_sixteen_bit(im), "TIFF", compression="tiff_lzw"),
}


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_image_format_goes_through_the_package_path(client, ungated_model_dir, fmt):
    data = FORMATS[fmt](Image.fromarray(reference_xray()))
    api = client.post("/api/predict", data=upload(data, f"x.{fmt.split()[0].lower()}"))
    assert api.status_code == 200, api.get_json()
    expected = probability_of(XrayClassifier(ungated_model_dir), data)
    assert api.get_json()["probability"] == pytest.approx(expected, abs=1e-6)
    assert gradcam_image(api.get_json()).shape == (128, 160, 3)
    assert client.post("/predict", data=upload(data)).status_code == 200


def test_sixteen_bit_png_uses_its_full_range(client):
    reference = reference_xray()
    eight = client.post("/api/predict", data=upload(encode_image(Image.fromarray(reference), "PNG"))).get_json()
    sixteen = client.post("/api/predict", data=upload(FORMATS["PNG 16-bit"](Image.fromarray(reference)))).get_json()
    assert sixteen["probability"] == pytest.approx(eight["probability"], abs=1e-6)
    assert np.abs(gradcam_image(sixteen).astype(int) - gradcam_image(eight)).mean() < 1


def test_the_file_name_and_declared_type_do_not_matter(client):
    png = encode_image(Image.fromarray(reference_xray()), "PNG")
    assert client.post("/api/predict", data=upload(png, "scan.jpg", "image/jpeg")).status_code == 200
    assert client.post("/api/predict", data=upload(b"just text", "scan.png", "image/png")).status_code == 415


# DICOM ----------------------------------------------------------------------------------

DICOMS = {
    # 16-bit, full range: decoded back to the reference.
    "MONOCHROME2 16-bit": lambda ref: dicom_bytes(ref.astype(np.uint16) * 257),
    # MONOCHROME1 stores white as 0: inverted, it is the reference again.
    "MONOCHROME1 16-bit": lambda ref: dicom_bytes(65535 - ref.astype(np.uint16) * 257, "MONOCHROME1"),
    # 12 bits stored, body in 1000..2000, corners at 0 and 4095: only the VOI window
    # (linear, centre 1500.5, width 1001 maps 1000..2000 onto 0..255) gives the reference back.
    "VOI window 12-bit": lambda ref: dicom_bytes(_windowed(ref), bits_stored=12, window=(1500.5, 1001)),
    # RLE Lossless, decoded by pylibjpeg-rle (reading/dicom.py): lossless, so the reference again.
    "RLE Lossless 16-bit": lambda ref: _rle(ref.astype(np.uint16) * 257),
}


def _rle(pixels: np.ndarray) -> bytes:
    from pydicom.encaps import encapsulate
    from pydicom.pixels.encoders import RLELosslessEncoder
    from pydicom.uid import RLELossless

    frame = RLELosslessEncoder.encode(
        pixels,
        rows=pixels.shape[0],
        columns=pixels.shape[1],
        samples_per_pixel=1,
        bits_allocated=16,
        bits_stored=16,
        pixel_representation=0,
        photometric_interpretation="MONOCHROME2",
        number_of_frames=1,
        encoding_plugin="pydicom",
    )
    return dicom_bytes(pixels, transfer_syntax=RLELossless, encapsulated=encapsulate([frame]))


def _windowed(reference: np.ndarray) -> np.ndarray:
    stored = 1000 + np.round(reference.astype(np.float64) * 1000 / 255)
    stored[:8, :8], stored[:8, -8:] = 0, 4095
    return stored.astype(np.uint16)


@pytest.mark.parametrize("kind", DICOMS)
def test_dicom_is_decoded_like_the_equivalent_png(client, kind, caplog, capfd):
    reference = reference_xray()
    expected = client.post("/api/predict", data=upload(encode_image(Image.fromarray(reference), "PNG"))).get_json()
    data = DICOMS[kind](reference)
    with caplog.at_level("DEBUG"):
        api = client.post("/api/predict", data=upload(data, "IM0001", "application/dicom"))
        page = client.post("/predict", data=upload(data, "IM0001"))
    assert api.status_code == 200, api.get_json()
    assert page.status_code == 200
    body = api.get_json()
    assert body["probability"] == pytest.approx(expected["probability"], abs=1e-3)
    assert np.abs(gradcam_image(body).astype(int) - gradcam_image(expected)).mean() < 3
    _assert_no_patient_tags(api.get_data(as_text=True) + page.get_data(as_text=True), caplog, capfd)


UNSUPPORTED_DICOMS = {
    "no pixel data": lambda: dicom_bytes(None),
    "JPEG 2000 with corrupt fragments": lambda: _jpeg2000_junk(),
    "declares 50000 x 50000 pixels": lambda: dicom_bytes(np.zeros((8, 8), np.uint16), rows_cols=(50000, 50000)),
    "file meta element of the wrong length": lambda: _odd_group_length(),
    "window centre that is not a number": lambda: dicom_bytes(
        np.full((16, 16), 5, np.uint16), window=(30000, 40000)
    ).replace(b"30000", b"3a0b0", 1),
}


def _odd_group_length() -> bytes:
    """(0002,0000) UL declared 3 bytes long: pydicom raises BytesLengthException."""
    data = bytearray(dicom_bytes(np.full((16, 16), 5, np.uint16)))
    assert data[132:138] == b"\x02\x00\x00\x00UL"
    data[138:140] = (3).to_bytes(2, "little")
    return bytes(data)


def _jpeg2000_junk() -> bytes:
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless

    fragment = encapsulate([b"\xff\x4f\xff\x51 not really JPEG 2000"])
    return dicom_bytes(np.zeros((64, 64), np.uint16), transfer_syntax=JPEG2000Lossless, encapsulated=fragment)


@pytest.mark.parametrize("kind", UNSUPPORTED_DICOMS)
def test_unsupported_dicom_is_refused_with_a_message(client, kind, caplog, capfd):
    data = UNSUPPORTED_DICOMS[kind]()
    with caplog.at_level("DEBUG"):
        api = client.post("/api/predict", data=upload(data, "IM0002"))
        page = client.post("/predict", data=upload(data, "IM0002"))
    assert api.status_code in (400, 415) and page.status_code == api.status_code
    assert api.get_json()["error"] and 'id="error-message"' in page.get_data(as_text=True)
    _assert_no_patient_tags(api.get_data(as_text=True) + page.get_data(as_text=True), caplog, capfd)


def _assert_no_patient_tags(responses: str, caplog, capfd) -> None:
    captured = capfd.readouterr()
    logged = "\n".join(r.getMessage() for r in caplog.records) + captured.out + captured.err
    for secret in ("Testpatient", "Secretname", PATIENT_ID):
        assert secret not in responses and secret not in logged


# Bad input ------------------------------------------------------------------------------


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _corrupt_png() -> bytes:
    data = bytearray(encode_image(Image.fromarray(reference_xray()), "PNG"))
    start = data.index(b"IDAT") + 40
    data[start : start + 200] = bytes(200)
    return bytes(data)


def _gif() -> bytes:
    return encode_image(Image.fromarray(reference_xray()), "GIF")


BAD_INPUTS = {
    # name: (multipart form, status, part of the message)
    "no file field": (lambda: {}, 400, "No file was uploaded"),
    "no file chosen": (lambda: upload(b"", ""), 400, "No file was chosen"),
    "empty file": (lambda: upload(b"", "x.png"), 400, "empty"),
    "plain text": (lambda: upload(b"patient notes, not an image", "x.png"), 415, "not a supported image type"),
    "PDF": (lambda: upload(b"%PDF-1.7\n" + bytes(500), "x.jpg"), 415, "not a supported image type"),
    "GIF": (lambda: upload(_gif(), "x.gif"), 415, "JPEG, PNG, BMP, TIFF or DICOM"),
    "truncated JPEG": (lambda: upload(_truncated(xray_jpeg())), 400, "corrupt or truncated"),
    "truncated PNG": (lambda: upload(_truncated(encode_image(Image.fromarray(reference_xray()), "PNG"))), 400, ""),
    "corrupt PNG data": (lambda: upload(_corrupt_png()), 400, ""),
    "JPEG header then noise": (lambda: upload(b"\xff\xd8\xff\xe0" + np.random.default_rng(0).bytes(3000)), 400, ""),
    "4x4 pixels": (lambda: upload(encode_image(Image.new("L", (4, 4)), "PNG")), 400, "too small"),
    "PNG bomb 100000 x 100000": (lambda: upload(png_bomb(100_000, 100_000)), 400, "refused before decoding"),
    "PNG bomb 8000 x 8000": (lambda: upload(png_bomb(8000, 8000)), 400, "refused before decoding"),
}


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_gets_a_human_message_in_json_and_in_the_page(client, monkeypatch, name):
    form, status, message = BAD_INPUTS[name]

    def must_not_decode(self, *args, **kwargs):
        raise AssertionError("a decompression bomb reached the decoder")

    if "bomb" in name:
        monkeypatch.setattr("PIL.ImageFile.ImageFile.load", must_not_decode)
    api = client.post("/api/predict", data=form())
    page = client.post("/predict", data=form())
    assert api.status_code == status and page.status_code == status
    body = api.get_json()
    assert body["status"] == status and message in body["error"] and len(body["error"]) > 10
    html = page.get_data(as_text=True)
    assert f'id="error-message">{message}' in html or (message in html and 'id="error-message"' in html)
    assert "Traceback" not in html and "not a medical device" in html


def test_over_the_size_limit_is_413(fresh_app):
    fresh_app.config["MAX_CONTENT_LENGTH"] = 1024 * 1024
    client = fresh_app.test_client()
    big = b"\xff\xd8\xff" + bytes(1_500_000)
    api = client.post("/api/predict", data=upload(big))
    page = client.post("/predict", data=upload(big))
    assert api.status_code == page.status_code == 413
    assert api.get_json()["error"] == "The upload is too large: the limit is 1 MB."
    assert "the limit is 1 MB" in page.get_data(as_text=True)
    assert api.headers["Connection"] == page.headers["Connection"] == "close"  # the body was left unread


def test_the_default_limit_is_20_mb(client):
    assert client.application.config["MAX_CONTENT_LENGTH"] == 20 * 1024 * 1024
    response = client.post("/api/predict", data=upload(b"\xff\xd8\xff" + bytes(20 * 1024 * 1024)))
    assert response.status_code == 413 and "20 MB" in response.get_json()["error"]
