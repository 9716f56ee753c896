"""Shared fixtures: a tiny synthetic data set in the Kaggle layout and a tiny trained model.

Nothing here reads ../shared/: the images are drawn so that PNEUMONIA has a learnable
difference (a bright opacity in the lower right lung field) from NORMAL.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest
from PIL import Image

from pneumonia.training import TrainConfig, train


def synthetic_xray(label: int, rng: np.random.Generator, size: int = 64, opacity: float = 110,
                   spread: float = 0.1) -> Image.Image:
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
                name = (f"person{patient}_bacteria_{i}.jpeg" if label else f"IM-{patient:04d}-{i % 2 + 1:04d}.jpeg")
                synthetic_xray(label, rng, size, **style).convert("RGB").save(folder / name, quality=92)
    return root


@pytest.fixture(scope="session")
def synthetic_data_dir(tmp_path_factory):
    """train/ (40 per class) and test/ (12 per class) of synthetic X-rays."""
    root = tmp_path_factory.mktemp("chest_xray")
    write_synthetic_dataset(root, per_class=40, splits=("train",), seed=0)
    write_synthetic_dataset(root, per_class=12, splits=("test",), seed=1)
    return root


@pytest.fixture(scope="session")
def tiny_model_dir(synthetic_data_dir, tmp_path_factory):
    """A custom CNN trained for 4 epochs at 32 px through the real `train` function: a
    real .keras file and model.json card, in seconds."""
    out = tmp_path_factory.mktemp("tiny_model")
    config = TrainConfig(data_dir=str(synthetic_data_dir), arch="custom", out=str(out), init="none",
                         image_size=32, epochs=4, batch_size=16, learning_rate=1e-3, val_fraction=0.25,
                         seed=0, patience=10, cache_dir=None)
    train(config, log=lambda *_: None)
    return out


# --- Web app and Grad-CAM fixtures -----------------------------------------------------

import io  # noqa: E402
import json  # noqa: E402

CENTRED_NORMALIZATION = {"scale": 1 / 255, "mean": [0.45] * 3, "std": [0.2] * 3}


def encode_image(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def xray_jpeg(width: int = 320, height: int = 256, seed: int = 0, label: int = 1) -> bytes:
    """A synthetic X-ray, stretched to width x height, as JPEG bytes."""
    image = synthetic_xray(label, np.random.default_rng(seed), size=128).resize((width, height))
    return encode_image(image, "JPEG", quality=90)


def save_model_dir(model, out, image_size: int, gradcam_layer: str, normalization=CENTRED_NORMALIZATION):
    """A .keras file and a minimal card in the shape `train` writes: enough for the web app."""
    out.mkdir(parents=True, exist_ok=True)
    model.save(out / "model.keras")
    card = {
        "name": model.name, "architecture": model.name, "file": "model.keras", "input_size": image_size,
        "preprocessing": {"image_size": image_size, "normalization": normalization},
        "calibration": {"temperature": 1.0},
        "thresholds": {"default": 0.5, "screening": 0.3},
        "gradcam": {"layer": gradcam_layer, "map_size": list(model.get_layer(gradcam_layer).output.shape[1:3])},
    }
    (out / "model.json").write_text(json.dumps(card))
    return out


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


@pytest.fixture(scope="session")
def gap_model_dir(tmp_path_factory):
    """A GAP CNN trained at 64 px on synthetic X-rays whose pneumonia blob lies at rows and
    columns 60-80 %; it separates them perfectly in a few seconds."""
    import keras

    from pneumonia.preprocessing import normalize

    rng = np.random.default_rng(0)
    labels = np.arange(400) % 2
    pixels = np.stack([np.asarray(synthetic_xray(int(y), rng, 64)) for y in labels])
    keras.utils.set_random_seed(0)
    model = build_gap_cnn(64)
    model.compile(keras.optimizers.Adam(3e-3), "binary_crossentropy", metrics=["accuracy"])
    model.fit(normalize(pixels, CENTRED_NORMALIZATION), labels, epochs=10, batch_size=16, verbose=0)
    return save_model_dir(model, tmp_path_factory.mktemp("gap_model"), 64, "features")


@pytest.fixture(scope="session")
def ungated_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model without its out-of-distribution gate. Its gate, fitted on 60 drawn
    images, refuses some fresh drawings as unlike them; tests of everything but the gate
    use this copy, and tests/test_ood.py tests the gate on both models."""
    import shutil

    copy = tmp_path_factory.mktemp("ungated") / "model"
    shutil.copytree(tiny_model_dir, copy, ignore=shutil.ignore_patterns("ood.npz", "checkpoints"))
    card = json.loads((copy / "model.json").read_text())
    card.pop("ood", None)
    (copy / "model.json").write_text(json.dumps(card))
    return copy


@pytest.fixture(scope="session")
def web_app(ungated_model_dir):
    """The app on the tiny model, created once (model loading and tracing take seconds)."""
    from web import create_app

    return create_app({"MODEL_PATH": str(ungated_model_dir), "TESTING": True})


SHIPPED_MODEL = Path(__file__).resolve().parent.parent / "model"
REAL_XRAYS = sorted((Path(__file__).resolve().parent / "data").glob("*.jpeg"))


@pytest.fixture(scope="session")
def shipped_app():
    """The app on the shipped model (model/), gate included."""
    from web import create_app

    return create_app({"MODEL_PATH": str(SHIPPED_MODEL), "TESTING": True})


@pytest.fixture
def client(web_app):
    return web_app.test_client()


# --- Fixtures for the pneumonia package tests ------------------------------------------

REPO = Path(__file__).resolve().parent.parent

# A large, bright opacity, so that the custom CNN (dropout 0.7, seven BatchNormalization layers)
# learns it within one epoch of ~150 steps: the default blob barely moves its training loss in that
# many steps and needs more epochs than a test can afford.
LEARNABLE = {"opacity": 160, "spread": 0.2}


def run_cli(*args, cwd, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m pneumonia ARGS` in a fresh interpreter, as a user runs it."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run([sys.executable, "-m", "pneumonia", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def learnable_data_dir(tmp_path_factory):
    """train/ (100 per class, 50 patients each) and test/ (12 per class) with the LEARNABLE signal."""
    root = tmp_path_factory.mktemp("learnable_xray")
    write_synthetic_dataset(root, per_class=100, splits=("train",), seed=10, **LEARNABLE)
    write_synthetic_dataset(root, per_class=12, splits=("test",), seed=11, **LEARNABLE)
    return root


@pytest.fixture(scope="session")
def densenet_cli_run(learnable_data_dir, tmp_path_factory):
    """DenseNet121 from scratch, 2 epochs at 32 px, through `python -m pneumonia train`:
    (output folder, finished process). The slowest fixture (~1 min on 2 idle cores: tracing
    and saving a 121-layer model dominate), so one run serves the training and CLI tests."""
    work = tmp_path_factory.mktemp("densenet_cli")
    out = work / "run"
    result = run_cli("train", learnable_data_dir, "--arch", "densenet121", "--init", "none", "--image-size", 32,
                     "--epochs", 2, "--batch-size", 32, "--val-fraction", 0.25, "--seed", 0, "--no-cache",
                     "--out", out, cwd=work, timeout=600)
    return out, result


# --- A folder of mixed files, for batch screening (CLI and package) ------------------------

@pytest.fixture(scope="session")
def mixed_folder(tmp_path_factory):
    """(folder, the files `predict` must report in walk order, the files it must skip): a JPEG,
    a PNG named .txt (wrong extension), a truncated JPEG, a DICOM without an extension in a
    subfolder, a PNG there; a text note and a hidden file are not images."""
    from test_app_inputs import dicom_bytes  # the DICOM writer of the input tests

    root = tmp_path_factory.mktemp("mixed") / "xrays"
    (root / "ward-b").mkdir(parents=True)
    jpeg = xray_jpeg(320, 256, seed=1, label=0)
    (root / "a-normal.jpeg").write_bytes(jpeg)
    (root / "b-corrupt.jpeg").write_bytes(jpeg[:300])
    (root / "c-wrong-extension.txt").write_bytes(encode_image(Image.open(io.BytesIO(xray_jpeg(288, 240, seed=2))), "PNG"))
    (root / "notes.txt").write_text("ward round notes\n")
    (root / ".hidden.jpeg").write_bytes(jpeg)
    pixels = np.asarray(synthetic_xray(1, np.random.default_rng(3), 128).resize((160, 128)), np.uint16) * 257
    (root / "ward-b" / "IM0001").write_bytes(dicom_bytes(pixels))
    (root / "ward-b" / "z-pneumonia.png").write_bytes(encode_image(synthetic_xray(1, np.random.default_rng(4), 200), "PNG"))
    reported = [root / "a-normal.jpeg", root / "b-corrupt.jpeg", root / "c-wrong-extension.txt",
                root / "ward-b" / "IM0001", root / "ward-b" / "z-pneumonia.png"]
    return root, [str(p) for p in reported], [str(root / "notes.txt")]
