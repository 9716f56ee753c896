"""Shared fixtures: a tiny synthetic data set in the Kaggle layout, tiny trained models, the web
app on them, and the `slow` marker's rule. What the fixtures build comes from builders.py."""

from __future__ import annotations

import io
import json
import os
import shutil

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest
from builders import (
    ACCESS_KEYS,
    CENTRED_NORMALIZATION,
    LEARNABLE,
    SHIPPED_MODEL,
    app_on,
    build_gap_cnn,
    dicom_bytes,
    encode_image,
    run_cli,
    save_model_dir,
    synthetic_xray,
    write_synthetic_dataset,
    xray_jpeg,
)
from PIL import Image

from pneumonia.training.config import TrainConfig
from pneumonia.training.fitting import train

# `slow`, left out of the default run (pyproject.toml; `-m slow` runs them): every test that uses a
# fixture that trains a model for a minute or more or keeps gunicorn serving slow clients.
# A test that is slow by itself says so with @pytest.mark.slow.
# The tests run on two pytest-xdist workers (pyproject.toml): the tests of one slow fixture also
# share a worker, so each is built once.
SLOW_FIXTURES = ("custom_run", "densenet_cli_run", "gunicorn_server")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the xdist_group marks
def pytest_collection_modifyitems(items):
    for item in items:
        slow_fixtures = [name for name in SLOW_FIXTURES if name in item.fixturenames]
        if slow_fixtures:
            item.add_marker(pytest.mark.slow)
        if slow_fixtures:
            item.add_marker(pytest.mark.xdist_group(slow_fixtures[0]))


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
    config = TrainConfig(
        data_dir=str(synthetic_data_dir),
        arch="custom",
        out=str(out),
        init="none",
        image_size=32,
        epochs=4,
        batch_size=16,
        learning_rate=1e-3,
        val_fraction=0.25,
        seed=0,
        cache_dir=None,
    )
    train(config, log=lambda *_: None)
    return out


# --- Web app and Grad-CAM fixtures -----------------------------------------------------


@pytest.fixture(scope="session")
def gap_model_dir(tmp_path_factory):
    """A GAP CNN trained at 64 px on synthetic X-rays whose pneumonia blob lies at rows and
    columns 60-80 %; it separates them perfectly in a few seconds."""
    import keras

    from pneumonia.serving.preprocessing import normalize

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
    use this copy, and tests/test_gate.py tests the gate on both models."""
    copy = tmp_path_factory.mktemp("ungated") / "model"
    shutil.copytree(tiny_model_dir, copy, ignore=shutil.ignore_patterns("ood.npz", "checkpoints"))
    card = json.loads((copy / "model.json").read_text())
    card.pop("ood", None)
    (copy / "model.json").write_text(json.dumps(card))
    return copy


# One app for the session serves the tests that only read it (creating one loads and traces its
# model); a test that changes an app's settings, extensions or counters (the rate limits', the wrong
# keys') takes one of its own, made for that test alone, so nothing it does reaches another test.


@pytest.fixture(scope="session")
def web_app(ungated_model_dir):
    """The app on the tiny model, shared: for tests that only read it."""
    return app_on(ungated_model_dir)


@pytest.fixture
def fresh_app(ungated_model_dir):
    """The app on the tiny model, made for this test: to change as it likes."""
    return app_on(ungated_model_dir)


@pytest.fixture(scope="session")
def shipped_app():
    """The app on the shipped model (model/), gate included, shared: for tests that only read it."""
    return app_on(SHIPPED_MODEL)


@pytest.fixture
def fresh_shipped_app():
    """The app on the shipped model, made for this test: to change as it likes."""
    return app_on(SHIPPED_MODEL)


@pytest.fixture
def keyed_app(ungated_model_dir):
    """The app on the tiny model with builders.ACCESS_KEYS set, 3 wrong keys a minute per client address,
    made for this test: its count of wrong keys starts at nothing."""
    return app_on(ungated_model_dir, ACCESS_KEYS=",".join(ACCESS_KEYS), ACCESS_FAILURES_LIMIT="3 per minute")


@pytest.fixture
def client(web_app):
    return web_app.test_client()


# --- Fixtures for the pneumonia package tests ------------------------------------------


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
    result = run_cli(
        "train",
        learnable_data_dir,
        "--arch",
        "densenet121",
        "--init",
        "none",
        "--image-size",
        32,
        "--epochs",
        2,
        "--batch-size",
        32,
        "--val-fraction",
        0.25,
        "--seed",
        0,
        "--no-cache",
        "--out",
        out,
        cwd=work,
        timeout=600,
    )
    return out, result


# --- A folder of mixed files, for batch screening (CLI and package) ------------------------


@pytest.fixture(scope="session")
def mixed_folder(tmp_path_factory):
    """(folder, the files `predict` must report in walk order, the files it must skip): a JPEG,
    a PNG named .txt (wrong extension), a truncated JPEG, a DICOM without an extension in a
    subfolder, a PNG there; a text note and a hidden file are not images."""
    root = tmp_path_factory.mktemp("mixed") / "xrays"
    (root / "ward-b").mkdir(parents=True)
    jpeg = xray_jpeg(320, 256, seed=1, label=0)
    (root / "a-normal.jpeg").write_bytes(jpeg)
    (root / "b-corrupt.jpeg").write_bytes(jpeg[:300])
    wrong_extension = encode_image(Image.open(io.BytesIO(xray_jpeg(288, 240, seed=2))), "PNG")
    (root / "c-wrong-extension.txt").write_bytes(wrong_extension)
    (root / "notes.txt").write_text("ward round notes\n")
    (root / ".hidden.jpeg").write_bytes(jpeg)
    pixels = np.asarray(synthetic_xray(1, np.random.default_rng(3), 128).resize((160, 128)), np.uint16) * 257
    (root / "ward-b" / "IM0001").write_bytes(dicom_bytes(pixels))
    pneumonia = encode_image(synthetic_xray(1, np.random.default_rng(4), 200), "PNG")
    (root / "ward-b" / "z-pneumonia.png").write_bytes(pneumonia)
    reported = [
        root / "a-normal.jpeg",
        root / "b-corrupt.jpeg",
        root / "c-wrong-extension.txt",
        root / "ward-b" / "IM0001",
        root / "ward-b" / "z-pneumonia.png",
    ]
    return root, [str(p) for p in reported], [str(root / "notes.txt")]


# --- The serving install, without the pacs extra -------------------------------------------


@pytest.fixture
def without_highdicom(monkeypatch):
    """highdicom unimportable, as on the serving install (requirements.txt): pneumonia.pacs.reports,
    which needs it, is imported afresh on its next use and fails as it would there."""
    import sys

    import pneumonia.pacs

    monkeypatch.setitem(sys.modules, "highdicom", None)
    monkeypatch.delitem(sys.modules, "pneumonia.pacs.reports", raising=False)
    monkeypatch.delattr(pneumonia.pacs, "reports", raising=False)
