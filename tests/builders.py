"""What the tests build: synthetic X-rays and Kaggle-layout data sets, encoded images, uploads,
DICOM files, PNG decompression bombs, tiny model folders, and the app and the command line in
fresh interpreters.

Nothing here reads ../shared/: the images are drawn so that PNEUMONIA has a learnable
difference (a bright opacity in the lower right lung field) from NORMAL.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import requests
from PIL import Image

from pneumonia.serving.card import (
    Calibration,
    DataRecord,
    Gradcam,
    Metrics,
    ModelCard,
    Normalization,
    Preprocessing,
    Run,
    Thresholds,
    TrainConfig,
    Training,
    write_card,
)

REPO = Path(__file__).resolve().parent.parent
SHIPPED_MODEL = REPO / "model"
REAL_XRAYS = sorted((REPO / "tests" / "data").glob("*.jpeg"))
SHARED_SAMPLES = REPO.parent / "shared" / "samples"
# Two access keys (pneumonia/web/access.py), as a PaaS config var would hold them: both valid at once.
ACCESS_KEYS = ("first-key-4f9c2a7e1b8d", "second-key-93d1e6b0c5a2")

CENTRED_NORMALIZATION = Normalization(1 / 255, [0.45] * 3, [0.2] * 3)

# A large, bright opacity, so that the custom CNN (dropout 0.7, seven BatchNormalization layers)
# learns it within one epoch of ~150 steps: the default blob barely moves its training loss in that
# many steps and needs more epochs than a test can afford.
LEARNABLE = {"opacity": 160, "spread": 0.2}

PATIENT_NAME, PATIENT_ID = "Testpatient^Secretname", "PID-731-SECRET"


# --- A reference for the screening pipeline ------------------------------------------------------


def probability_of(classifier, source) -> float:
    """One image's calibrated probability, the gate aside: the model pass the screening pipeline makes
    (`features_and_logits`) on the one preprocessing path."""
    from pneumonia.serving.preprocessing import preprocess

    inputs = preprocess(source, classifier.preprocessing)[None]
    return float(classifier.calibrated(classifier.features_and_logits(inputs)[1])[0])


def screen_one(classifier, source) -> tuple[float | None, object | None]:
    """One image through the package's primitives, step by step, written apart from
    `pneumonia.serving.screening` so that tests can compare the pipeline with it:
    (calibrated probability or None when refused, the gate's verdict or None without a gate)."""
    from pneumonia.reading.decoding import decode_xray
    from pneumonia.serving.preprocessing import model_input, resize_xray

    xray, stats = decode_xray(source, classifier.image_size)
    gate = classifier.gate
    if gate is not None and (refused := gate.check_pixels(stats)) is not None:
        return None, refused
    inputs = model_input(resize_xray(xray, classifier.image_size), classifier.preprocessing)[None]
    features, logits = classifier.features_and_logits(inputs)
    verdict = gate.check_features(features[0]) if gate is not None else None
    if verdict is not None and not verdict.accepted:
        return None, verdict
    return float(classifier.calibrated(logits)[0]), verdict


# --- Synthetic X-rays and data sets -----------------------------------------------------------


def write_xray_folder(folder: Path) -> Path:
    """The two real X-rays, three copies of them and a truncated JPEG in `folder`: an archive's images."""
    for path in REAL_XRAYS:
        shutil.copy(path, folder / path.name)
    for index in range(3):
        shutil.copy(REAL_XRAYS[index % 2], folder / f"copy-{index}.jpeg")
    (folder / "truncated.jpeg").write_bytes(REAL_XRAYS[0].read_bytes()[:3000])
    return folder


def synthetic_xray(
    label: int, rng: np.random.Generator, size: int = 64, opacity: float = 110, spread: float = 0.1
) -> Image.Image:
    """A dark chest-like field; label 1 adds a bright blob (`opacity` grey levels, Gaussian
    radius `spread` of the side) centred at rows/cols 60-80 % of the image."""
    y, x = np.mgrid[0:size, 0:size] / size
    body = 90 + 60 * np.exp(-(((x - 0.5) / 0.35) ** 2 + ((y - 0.5) / 0.45) ** 2))
    image = body + rng.normal(0, 12, (size, size))
    if label:
        cy, cx = rng.uniform(0.6, 0.8, 2)
        image += opacity * np.exp(-(((x - cx) / spread) ** 2 + ((y - cy) / spread) ** 2))
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8), mode="L")


def write_synthetic_dataset(root, per_class: int = 24, splits=("train",), seed: int = 0, size: int = 64, **style):
    """ROOT/<split>/{NORMAL,PNEUMONIA}/ with Kaggle-style names; two images per patient.
    `style` goes to `synthetic_xray` (opacity, spread)."""
    rng = np.random.default_rng(seed)
    for split in splits:
        for label, class_name in enumerate(("NORMAL", "PNEUMONIA")):
            folder = root / split / class_name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                patient = i // 2 + 1000 * (split != "train")
                name = f"person{patient}_bacteria_{i}.jpeg" if label else f"IM-{patient:04d}-{i % 2 + 1:04d}.jpeg"
                synthetic_xray(label, rng, size, **style).convert("RGB").save(folder / name, quality=92)
    return root


# --- Encoded images and uploads ---------------------------------------------------------------


def encode_image(image: Image.Image, fmt: str, **params) -> bytes:
    """`image` saved in format `fmt` (with Pillow's `params`), as bytes."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def xray_jpeg(width: int = 320, height: int = 256, seed: int = 0, label: int = 1) -> bytes:
    """A synthetic X-ray, stretched to width x height, as JPEG bytes."""
    image = synthetic_xray(label, np.random.default_rng(seed), size=128).resize((width, height))
    return encode_image(image, "JPEG", quality=90)


def sample_photo(name: str = "flower.jpg") -> bytes:
    """A colour photograph that scikit-learn ships ("flower.jpg" or "china.jpg"), as JPEG bytes."""
    from sklearn.datasets import load_sample_image

    return encode_image(Image.fromarray(load_sample_image(name)), "JPEG", quality=90)


def noise_png(seed: int = 0) -> bytes:
    """300 x 300 uniform grey-level noise, as PNG bytes."""
    values = np.random.default_rng(seed).uniform(0, 255, (300, 300))
    return encode_image(Image.fromarray(values.astype(np.uint8)), "PNG")


def app_on(model_dir, **config):
    """The web app on `model_dir`, in testing mode, with `config` on top."""
    from pneumonia.web import create_app

    return create_app({"MODEL_PATH": str(model_dir), "TESTING": True, **config})


def upload(data: bytes, name: str = "xray.jpg", content_type: str | None = None) -> dict:
    """The form of a one-file upload, for the Flask test client."""
    return {"file": (io.BytesIO(data), name, content_type)}


def dicom_bytes(
    pixels: np.ndarray | None,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 16,
    window: tuple[float, float] | None = None,
    transfer_syntax=None,
    rows_cols=None,
    encapsulated: bytes | None = None,
    **tags,
) -> bytes:
    """A DX image in DICOM Part 10 format, built in memory, with patient tags that must never be logged;
    `tags` (keyword=value, e.g. PatientBirthDate="99999999") are set on its header last."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    sop_class = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax or ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.Modality = PATIENT_NAME, PATIENT_ID, "DX"
    if pixels is not None:
        ds.Rows, ds.Columns = rows_cols or pixels.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = pixels.dtype.itemsize * 8, bits_stored, bits_stored - 1
        ds.PixelRepresentation = 0
        if window:
            ds.WindowCenter, ds.WindowWidth = window
        ds.PixelData = pixels.tobytes() if encapsulated is None else encapsulated
        if encapsulated is not None:
            ds["PixelData"].VR, ds["PixelData"].is_undefined_length = "OB", True
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_bomb(width: int, height: int) -> bytes:
    """A PNG of under 100 bytes whose header declares width x height 8-bit grey pixels: a decompression bomb."""
    header = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + _png_chunk(b"IDAT", zlib.compress(bytes(1000))) + _png_chunk(b"IEND", b"")


# --- Model folders ----------------------------------------------------------------------------


def build_gap_cnn(image_size: int, name: str = "gap_cnn"):
    """Three convolutions, global average pooling, Dense(1) "logit", sigmoid: the layout
    Grad-CAM was designed for, so the map follows the evidence closely."""
    import keras
    from keras import layers

    inputs = keras.Input((image_size, image_size, 3), name="xray")
    x = layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    x = layers.MaxPooling2D()(x)
    x = layers.Conv2D(16, 3, padding="same", activation="relu")(x)
    x = layers.MaxPooling2D()(x)
    x = layers.Conv2D(16, 3, padding="same", activation="relu", name="features")(x)  # (S/4, S/4, 16)
    x = layers.GlobalAveragePooling2D()(x)
    logit = layers.Dense(1, name="logit")(x)
    return keras.Model(inputs, layers.Activation("sigmoid", name="probability")(logit), name=name)


def minimal_card(name: str, file: str, image_size: int, gradcam: tuple[str, list[int]], normalization) -> ModelCard:
    """A valid card for a model these tests built by hand: identity calibration, thresholds 0.5 / 0.3,
    and records that say no training run made it."""
    return ModelCard(
        name=name,
        architecture=name,
        file=file,
        input_size=image_size,
        class_names=["NORMAL", "PNEUMONIA"],
        preprocessing=Preprocessing(image_size, normalization),
        calibration=Calibration(1.0, 0.0, 0.0, 0.0),
        thresholds=Thresholds(0.5, 0.3, 0.98),
        validation=Metrics("built by tests/builders.py", "none", {"NORMAL": 0, "PNEUMONIA": 0}, 0.5, 0.5, 0.0, {}, {}),
        data=DataRecord("built by tests/builders.py", {}, {}, 0.1, "none", "none"),
        training=Training(TrainConfig("none"), 0, None, "tests/builders.py", 0.0, "none", "none", "as built"),
        lineage=[Run("random initialisation", "tests/builders.py", "none", 0, None, 0.0)],
        gradcam=Gradcam(gradcam[0], list(gradcam[1])),
        versions={},
    )


def save_model_dir(model, out, image_size: int, gradcam_layer: str, normalization=CENTRED_NORMALIZATION):
    """A .keras file and a minimal valid card: enough for the web app."""
    out.mkdir(parents=True, exist_ok=True)
    model.save(out / "model.keras")
    map_size = list(model.get_layer(gradcam_layer).output.shape[1:3])
    write_card(out, minimal_card(model.name, "model.keras", image_size, (gradcam_layer, map_size), normalization))
    return out


# --- The command line and the server in fresh interpreters ------------------------------------


def run_cli(*args, cwd, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m pneumonia ARGS` in a fresh interpreter, as a user runs it."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run(
        [sys.executable, "-m", "pneumonia", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def gunicorn_serving(model_dir, **settings: str):
    """`gunicorn app:app` with gunicorn.conf.py, as the Procfile starts it, on loopback: one worker
    serving `model_dir`, with `settings` added to its environment (threads as shipped unless they
    say). Yields (process, url) once /healthz answers 200, and stops the server on leaving."""
    port = free_port()
    env = {key: value for key, value in os.environ.items() if key != "GUNICORN_THREADS"}
    env.update(
        PORT=str(port), WEB_CONCURRENCY="1", PNEUMONIA_MODEL_PATH=str(model_dir), TF_CPP_MIN_LOG_LEVEL="2", **settings
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "app:app"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                assert process.poll() is None, process.stderr.read().decode()
            assert time.time() < deadline, "gunicorn did not become ready"
            time.sleep(0.3)
        yield process, url
    finally:
        process.terminate()
        process.wait(30)


def sr_content(sr) -> dict[str, object]:
    """A Structured Report's concept name -> numeric value or code meaning, over its whole content tree."""
    found: dict[str, object] = {}

    def walk(items):
        for item in items:
            name = item.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in item else None
            if "MeasuredValueSequence" in item:
                found[name] = float(item.MeasuredValueSequence[0].NumericValue)
            elif "ConceptCodeSequence" in item:
                found[name] = item.ConceptCodeSequence[0].CodeMeaning
            walk(item.get("ContentSequence", []))

    walk(sr.ContentSequence)
    return found


@contextmanager
def local_ray_session():
    """A local Ray limited to the machine's 2 CPUs, its workers importing this checkout; no progress bars."""
    import ray

    ray.init(
        num_cpus=2,
        include_dashboard=False,
        logging_level="WARNING",
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}},
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield
    finally:
        ray.shutdown()
