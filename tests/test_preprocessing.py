"""The one path from bytes or a file to model input: colour modes, bit depths, EXIF,
formats, bad inputs, decompression bombs, and train/serve agreement."""

from __future__ import annotations

import io

import numpy as np
import pytest
from builders import encode_image, png_bomb
from PIL import Image

from pneumonia.errors import XrayReadError
from pneumonia.reading import decoding
from pneumonia.reading.decoding import load_xray
from pneumonia.serving.preprocessing import (
    IMAGENET_NORMALIZATION,
    UNIT_NORMALIZATION,
    normalize,
    preprocess,
    preprocessing_spec,
    xray_pixels,
)
from pneumonia.training import dataset

SIZE = 48


@pytest.fixture(scope="module")
def grey() -> np.ndarray:
    """A 48x48 greyscale pattern: a horizontal ramp, a bright square and a dark bar."""
    ramp = np.tile(np.linspace(20, 235, SIZE), (SIZE, 1))
    ramp[8:20, 28:40] = 250
    ramp[30:36, :] = 5
    return np.round(ramp).astype(np.uint8)


def _half_transparent(image: Image.Image, mode: str) -> Image.Image:
    """`mode` ("RGBA" or "LA") with the left half fully transparent."""
    alpha = np.full((SIZE, SIZE), 255, np.uint8)
    alpha[:, : SIZE // 2] = 0
    out = image.convert(mode)
    out.putalpha(Image.fromarray(alpha, "L"))
    return out


# mode -> (how to make it from the greyscale pattern, format, largest allowed |difference|)
LOSSLESS_MODES = {
    "L": (lambda g: g, "PNG", 0),
    "RGB": (lambda g: g.convert("RGB"), "PNG", 1),
    "P": (lambda g: g.convert("P"), "PNG", 1),
    "CMYK": (lambda g: g.convert("RGB").convert("CMYK"), "TIFF", 1),
    "RGB-JPEG": (lambda g: g.convert("RGB"), "JPEG", 12),
    "CMYK-JPEG": (lambda g: g.convert("RGB").convert("CMYK"), "JPEG", 12),
}


@pytest.mark.parametrize("mode", sorted(LOSSLESS_MODES))
def test_colour_modes_become_the_same_greyscale(grey, mode):
    make, fmt, tolerance = LOSSLESS_MODES[mode]
    image = make(Image.fromarray(grey, "L"))
    data = encode_image(image, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    assert Image.open(io.BytesIO(data)).mode == mode.split("-")[0]

    pixels = xray_pixels(data, SIZE)
    assert pixels.dtype == np.uint8 and pixels.shape == (SIZE, SIZE)
    difference = np.abs(pixels.astype(int) - grey)
    if fmt == "JPEG":
        assert difference.mean() <= 3 and difference.max() <= tolerance
    else:
        assert difference.max() <= tolerance

    model_input = preprocess(data, preprocessing_spec(32, UNIT_NORMALIZATION))
    assert model_input.dtype == np.float32 and model_input.shape == (32, 32, 3)
    assert np.array_equal(model_input[..., 0], model_input[..., 2])  # grey replicated to 3 channels
    assert 0.0 <= model_input.min() and model_input.max() <= 1.0


def _every_mode(grey: np.ndarray) -> dict[str, bytes]:
    base = Image.fromarray(grey, "L")
    palette = base.convert("P")
    return {
        "L": encode_image(base, "PNG"),
        "RGB": encode_image(base.convert("RGB"), "JPEG"),
        "RGBA": encode_image(_half_transparent(base, "RGBA"), "PNG"),
        "LA": encode_image(_half_transparent(base, "LA"), "PNG"),
        "P": encode_image(palette, "PNG"),
        "P+transparency": encode_image(palette, "PNG", transparency=0),
        "CMYK": encode_image(base.convert("RGB").convert("CMYK"), "JPEG"),
        "1": encode_image(base.convert("1"), "BMP"),
        "I;16 PNG": encode_image(Image.fromarray(_twelve_bit_ramp()), "PNG"),
        "I;16 TIFF": encode_image(Image.fromarray(_twelve_bit_ramp()), "TIFF"),
    }


def test_every_mode_gives_the_shapes_and_types_the_model_takes(grey):
    spec = preprocessing_spec(24, IMAGENET_NORMALIZATION)
    for mode, data in _every_mode(grey).items():
        pixels = xray_pixels(data, 24)
        assert pixels.dtype == np.uint8 and pixels.shape == (24, 24), mode
        assert pixels.std() > 10, mode  # the picture survived
        model_input = preprocess(data, spec)
        assert model_input.dtype == np.float32 and model_input.shape == (24, 24, 3), mode
        np.testing.assert_allclose(model_input, normalize(pixels, IMAGENET_NORMALIZATION), atol=0)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_transparent_pixels_become_black_and_opaque_keep_their_value(grey, mode):
    data = encode_image(_half_transparent(Image.fromarray(grey, "L"), mode), "PNG")
    assert Image.open(io.BytesIO(data)).mode == mode
    pixels = xray_pixels(data, SIZE)
    assert pixels.dtype == np.uint8 and pixels.shape == (SIZE, SIZE)
    assert (pixels[:, : SIZE // 2] == 0).all()
    assert np.abs(pixels[:, SIZE // 2 :].astype(int) - grey[:, SIZE // 2 :]).max() <= 1


def test_palette_with_a_transparent_index(grey):
    image = Image.fromarray(grey, "L").convert("P")
    transparent_index = int(np.asarray(image)[0, 0])  # the ramp's darkest column
    data = encode_image(image, "PNG", transparency=transparent_index)
    reopened = Image.open(io.BytesIO(data))
    assert reopened.mode == "P" and "transparency" in reopened.info
    pixels = xray_pixels(data, SIZE)
    is_transparent = np.asarray(image) == transparent_index
    assert is_transparent.any() and (~is_transparent).any()
    assert (pixels[is_transparent] == 0).all()
    assert np.abs(pixels[~is_transparent].astype(int) - grey[~is_transparent]).max() <= 1


def test_one_bit_image(grey):
    binary = Image.fromarray(np.where(grey > 128, 255, 0).astype(np.uint8), "L").convert("1")
    for fmt in ("PNG", "BMP", "TIFF"):
        data = encode_image(binary, fmt)
        assert Image.open(io.BytesIO(data)).mode == "1"
        pixels = xray_pixels(data, SIZE)
        assert pixels.dtype == np.uint8 and pixels.shape == (SIZE, SIZE)
        assert np.array_equal(pixels, np.where(grey > 128, 255, 0))


def _twelve_bit_ramp() -> np.ndarray:
    """16-bit container, 12-bit data: columns run 0 .. 4095, as many detectors store it."""
    return np.tile(np.round(np.linspace(0, 4095, 64)).astype(np.uint16), (64, 1))


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_sixteen_bit_images_are_scaled_by_their_range_not_clipped(fmt):
    values = _twelve_bit_ramp()
    data = encode_image(Image.fromarray(values), fmt)
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")

    pixels = xray_pixels(data, 64)
    assert pixels.dtype == np.uint8 and pixels.shape == (64, 64)
    assert pixels.max() == 255 and pixels.min() == 0  # clipping would make most of it 255
    middle = int(np.argmin(np.abs(values[0].astype(int) - 2048)))
    assert abs(int(pixels[0, middle]) - 128) <= 2
    assert (np.diff(pixels[0].astype(int)) >= 0).all()  # contrast and order kept
    assert len(np.unique(pixels)) > 50
    assert preprocess(data, preprocessing_spec(32, IMAGENET_NORMALIZATION)).shape == (32, 32, 3)


def test_float_tiff_is_scaled_by_its_range():
    values = _twelve_bit_ramp().astype(np.float32) / 10.0
    data = encode_image(Image.fromarray(values), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "F"
    pixels = xray_pixels(data, 64)
    assert pixels.min() == 0 and pixels.max() == 255 and (np.diff(pixels[0].astype(int)) >= 0).all()


@pytest.mark.parametrize(
    "orientation, transpose",
    [
        (6, Image.Transpose.ROTATE_270),  # stored lying on its side: rotate 90 degrees clockwise to view
        (8, Image.Transpose.ROTATE_90),
        (3, Image.Transpose.ROTATE_180),
    ],
)
def test_exif_orientation_is_applied(orientation, transpose):
    stored = np.zeros((40, 64), np.uint8)  # wide, with a bright block in the top-left corner
    stored[:10, :16] = 255
    stored[20:, 40:] = 120
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode_image(Image.fromarray(stored, "L"), "JPEG", quality=95, exif=exif)

    upright = np.asarray(load_xray(data))
    expected = np.asarray(Image.fromarray(stored, "L").transpose(transpose))
    assert upright.shape == expected.shape == ((64, 40) if orientation in (6, 8) else (40, 64))
    assert np.abs(upright.astype(int) - expected).mean() < 3
    if orientation == 3:  # same shape as stored, so check it was not left as stored
        assert np.abs(upright.astype(int) - stored).mean() > 30


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "BMP", "TIFF"])
def test_every_supported_format_reads_the_same_picture(grey, fmt, tmp_path):
    data = encode_image(Image.fromarray(grey, "L"), fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    path = tmp_path / f"xray.{fmt.lower()}"
    path.write_bytes(data)
    from_bytes, from_path = xray_pixels(data, SIZE), xray_pixels(path, SIZE)
    assert np.array_equal(from_bytes, from_path)
    assert np.abs(from_bytes.astype(int) - grey).mean() <= (3 if fmt == "JPEG" else 0)
    spec = preprocessing_spec(32, IMAGENET_NORMALIZATION)
    assert np.array_equal(preprocess(data, spec), preprocess(str(path), spec))


def _truncated_jpeg(grey) -> bytes:
    data = encode_image(Image.fromarray(grey, "L").resize((256, 256)), "JPEG", quality=95)
    return data[: len(data) // 2]


BAD_INPUTS = {
    "empty": (lambda g: b"", "empty"),
    "random bytes": (
        lambda g: np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes(),
        "not a supported image",
    ),
    "text": (lambda g: b"patient: anonymous\nfindings: none\n" * 20, "not a supported image"),
    "png header then garbage": (lambda g: b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 50, "image"),
    "truncated jpeg": (_truncated_jpeg, "truncated"),
    "jpeg with corrupt body": (lambda g: encode_image(Image.fromarray(g, "L"), "JPEG")[:300] + b"\xff\xd9", "image"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_raises_a_readable_error(grey, case, tmp_path):
    make, words = BAD_INPUTS[case]
    data = make(grey)
    path = tmp_path / "upload.jpeg"
    path.write_bytes(data)
    for source in (data, path):
        with pytest.raises(XrayReadError) as caught:
            xray_pixels(source, SIZE)
        message = str(caught.value)
        assert words in message.lower(), message
        assert "Traceback" not in message and len(message) < 300


def test_text_file_and_missing_file_name_the_path(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not an x-ray\n" * 10)
    with pytest.raises(XrayReadError, match="notes.txt"):
        preprocess(notes, preprocessing_spec(32, UNIT_NORMALIZATION))
    with pytest.raises(XrayReadError, match="No such image file"):
        xray_pixels(tmp_path / "absent.png", 32)


def test_tiny_image_is_refused():
    with pytest.raises(XrayReadError, match="too small"):
        xray_pixels(encode_image(Image.new("L", (4, 100)), "PNG"), 32)


@pytest.mark.parametrize("width, height", [(100_000, 100_000), (9_000, 9_000), (60_000, 1_001)])
def test_decompression_bomb_is_refused_before_decoding(width, height, monkeypatch):
    """100k x 100k trips Pillow's own bomb check; 9k x 9k and 60k x 1k (81 and 60 Mpx) are
    under Pillow's limit but over the module's 60 Mpx."""

    def no_decoding(self, *args, **kwargs):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(Image.Image, "load", no_decoding)
    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", no_decoding)
    data = png_bomb(width, height)
    assert len(data) < 200
    with pytest.raises(XrayReadError, match="pixels"):
        xray_pixels(data, 32)


def test_image_over_the_pixel_limit_is_refused(grey, monkeypatch, tmp_path):
    data = encode_image(Image.fromarray(grey, "L"), "PNG")
    assert xray_pixels(data, 32).shape == (32, 32)
    monkeypatch.setattr(decoding, "MAX_IMAGE_PIXELS", SIZE * SIZE - 1)
    path = tmp_path / "big.png"
    path.write_bytes(data)
    for source in (data, path):
        with pytest.raises(XrayReadError, match="more than the 2,303 allowed"):
            xray_pixels(source, 32)


@pytest.mark.parametrize("normalization", [UNIT_NORMALIZATION, IMAGENET_NORMALIZATION])
def test_normalize_is_the_same_on_numpy_and_tensorflow(normalization):
    import tensorflow as tf

    pixels = np.random.default_rng(0).integers(0, 256, (3, 16, 16), dtype=np.uint8)
    on_numpy = normalize(pixels, normalization)
    on_tensor = normalize(tf.constant(pixels), normalization).numpy()
    assert on_numpy.dtype == on_tensor.dtype == np.float32
    assert on_numpy.shape == on_tensor.shape == (3, 16, 16, 3)
    np.testing.assert_allclose(on_numpy, on_tensor, rtol=0, atol=1e-6)
    # the formula itself, per channel
    expected = (pixels[..., None] / 255.0 - np.array(normalization.mean)) / np.array(normalization.std)
    np.testing.assert_allclose(on_numpy, expected, atol=1e-5)


def test_training_pipeline_feeds_the_model_exactly_what_serving_does(grey, tmp_path):
    """Train/serve skew: path -> dataset.load_pixels -> training.make_dataset (no augmentation)
    gives, image for image, what `preprocess` (the classifier's and the web app's path) gives."""
    from pneumonia.training.augmentation import make_dataset

    base = Image.fromarray(grey, "L")
    exif = Image.Exif()
    exif[0x0112] = 6
    files = {
        ("NORMAL", "IM-0001-0001.jpeg"): encode_image(base.convert("RGB").resize((70, 50)), "JPEG", quality=90),
        ("NORMAL", "IM-0002-0001.png"): encode_image(Image.fromarray(_twelve_bit_ramp()), "PNG"),
        ("NORMAL", "IM-0003-0001.bmp"): encode_image(base.rotate(30), "BMP"),
        ("PNEUMONIA", "person1_bacteria_1.jpeg"): encode_image(base.resize((90, 60)), "JPEG", exif=exif),
        ("PNEUMONIA", "person2_virus_2.png"): encode_image(_half_transparent(base, "RGBA"), "PNG"),
        ("PNEUMONIA", "person3_bacteria_3.tif"): encode_image(base.convert("RGB").convert("CMYK"), "TIFF"),
    }
    for (class_name, name), data in files.items():
        (tmp_path / "train" / class_name).mkdir(parents=True, exist_ok=True)
        (tmp_path / "train" / class_name / name).write_bytes(data)

    split = dataset.scan_split(tmp_path, "train")
    for normalization in (UNIT_NORMALIZATION, IMAGENET_NORMALIZATION):
        spec = preprocessing_spec(40, normalization)
        pixels, labels, kept = dataset.load_pixels(split, 40, log=lambda *_: None)
        batches = list(make_dataset(pixels, labels, normalization, batch_size=4, seed=0))
        trained_on = np.concatenate([x.numpy() for x, _ in batches])
        trained_labels = np.concatenate([y.numpy() for _, y in batches])
        served = np.stack([preprocess(path, spec) for path in kept.paths])
        assert len(kept.paths) == len(files) and trained_on.shape == served.shape == (len(files), 40, 40, 3)
        np.testing.assert_allclose(trained_on, served, rtol=0, atol=1e-6)
        assert trained_labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_files_are_closed_after_reading(grey, tmp_path):
    """The web app and training read thousands of files: none may be left open, including
    after an error."""
    import gc
    import warnings

    paths = []
    for fmt in ("JPEG", "PNG", "TIFF", "BMP"):
        paths.append(tmp_path / f"x.{fmt.lower()}")
        paths[-1].write_bytes(encode_image(Image.fromarray(grey, "L"), fmt))
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "cut.jpeg").write_bytes(_truncated_jpeg(grey))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for path in paths:
            xray_pixels(path, 16)
        for bad in ("notes.txt", "cut.jpeg"):
            with pytest.raises(XrayReadError):
                xray_pixels(tmp_path / bad, 16)
        gc.collect()
    # Only this test's files: the collection may also find another test's socket left to the collector.
    assert not [w for w in caught if issubclass(w.category, ResourceWarning) and str(tmp_path) in str(w.message)]


def test_contrast_normalisation_undoes_a_flatter_exposure():
    """Why the option exists: a flatter or darker acquisition of the same X-ray comes out
    of the normalisation much closer to the original than it went in."""
    contrast, kept_share = "equalize", 0.35
    from pneumonia.serving.preprocessing import normalize_contrast

    rng = np.random.default_rng(3)
    square = np.clip(np.tile(np.linspace(30, 220, 64), (64, 1)) + rng.normal(0, 12, (64, 64)), 0, 255)
    original = square.astype(np.uint8)
    flatter = np.round(128 + 0.7 * (original.astype(float) - 128) - 10).astype(np.uint8)
    before = np.abs(flatter.astype(int) - original).mean()
    after = np.abs(normalize_contrast(flatter, contrast).astype(int) - normalize_contrast(original, contrast)).mean()
    assert after < kept_share * before, (before, after)
    assert normalize_contrast(original, contrast).dtype == np.uint8
    # a batch is each square on its own
    batch = np.stack([original, flatter])
    np.testing.assert_array_equal(normalize_contrast(batch, contrast)[1], normalize_contrast(flatter, contrast))


def test_the_cards_contrast_is_part_of_the_one_path(grey):
    """preprocess (CLI, evaluation) and model_input on cached pixels (training, the web app)
    apply the card's contrast normalisation the same way; "none" leaves the pixels alone."""
    from pneumonia.serving.preprocessing import model_input, normalize_contrast

    data = encode_image(Image.fromarray(grey), "PNG")
    spec = preprocessing_spec(SIZE, UNIT_NORMALIZATION, contrast="equalize")
    pixels = xray_pixels(data, SIZE)
    served = preprocess(data, spec)
    np.testing.assert_array_equal(served, model_input(pixels, spec))
    np.testing.assert_array_equal(served, normalize(normalize_contrast(pixels, "equalize"), UNIT_NORMALIZATION))
    assert np.abs(served - preprocess(data, preprocessing_spec(SIZE, UNIT_NORMALIZATION))).max() > 0.05
    np.testing.assert_array_equal(
        preprocess(data, preprocessing_spec(SIZE, UNIT_NORMALIZATION)), normalize(pixels, UNIT_NORMALIZATION)
    )
    with pytest.raises(ValueError, match="contrast 'gamma' is not one of 'none' or 'equalize'"):
        preprocessing_spec(SIZE, UNIT_NORMALIZATION, contrast="gamma")
