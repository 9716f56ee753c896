"""Shared fixtures: a tiny synthetic data set in the Kaggle layout and a tiny trained model.

Nothing here reads ../shared/: the images are drawn so that PNEUMONIA has a learnable
difference (a bright opacity in the lower right lung field) from NORMAL.
"""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest
from PIL import Image

from pneumonia.training import TrainConfig, train


def synthetic_xray(label: int, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """A dark chest-like field; label 1 adds a bright blob at rows/cols 55-85 % of the image."""
    y, x = np.mgrid[0:size, 0:size] / size
    body = 90 + 60 * np.exp(-(((x - 0.5) / 0.35) ** 2 + ((y - 0.5) / 0.45) ** 2))
    image = body + rng.normal(0, 12, (size, size))
    if label:
        cy, cx = rng.uniform(0.6, 0.8, 2)
        image += 110 * np.exp(-(((x - cx) / 0.1) ** 2 + ((y - cy) / 0.1) ** 2))
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8), mode="L")


def write_synthetic_dataset(root, per_class: int = 24, splits=("train",), seed: int = 0, size: int = 64):
    """ROOT/<split>/{NORMAL,PNEUMONIA}/ with Kaggle-style names; two images per patient."""
    rng = np.random.default_rng(seed)
    for split in splits:
        for label, class_name in enumerate(("NORMAL", "PNEUMONIA")):
            folder = root / split / class_name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                patient = i // 2 + 1000 * (split != "train")
                name = (f"person{patient}_bacteria_{i}.jpeg" if label else f"IM-{patient:04d}-{i % 2 + 1:04d}.jpeg")
                synthetic_xray(label, rng, size).convert("RGB").save(folder / name, quality=92)
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
