"""What a training run can be asked for, without importing Keras: the command line builds its
parser from these names and defaults, and `fitting.train` takes a `TrainConfig`."""

from __future__ import annotations

from dataclasses import dataclass

ARCHITECTURES = ("densenet121", "custom")

# "acquisition" adds what differs between X-ray machines and sites: sharpness, gamma, noise and
# stronger contrast. In the lever study (model/report/levers.md) it was the one augmentation that
# moved a proxy (the acquisition shifts); the framing and sharpness levers, mixup, CLAHE, label
# smoothing and weight averaging did not, and were retired from the product.
AUGMENTATIONS = ("standard", "acquisition")

# DenseNet121 at 128 px is the shipped trade-off of accuracy and CPU latency; the custom CNN is
# the seed's baseline at its own size.
DEFAULT_IMAGE_SIZE = {"densenet121": 128, "custom": 320}
DEFAULT_INIT = {"densenet121": "imagenet", "custom": "none"}  # the custom CNN has no pretrained weights


@dataclass
class TrainConfig:
    data_dir: str
    arch: str = "densenet121"
    out: str = "runs/densenet121"
    init: str = "imagenet"
    image_size: int = 128
    epochs: int = 30
    batch_size: int = 32
    learning_rate: float = 1e-3
    val_fraction: float = 0.1
    seed: int = 42
    patience: int = 6
    target_sensitivity: float = 0.98
    resume: bool = False
    cache_dir: str | None = "cache"
    augment: str = "standard"  # one of AUGMENTATIONS
    contrast: str = "none"  # one of serving.preprocessing.CONTRASTS
    hold_out_series: str | None = None  # one of dataset.NORMAL_SERIES: kept out of training and validation
