"""What a training run can be asked for, without importing Keras: the command line builds its
parser from these names and defaults, and `training.train` takes a `TrainConfig`."""

from __future__ import annotations

from dataclasses import dataclass

ARCHITECTURES = ("densenet121", "custom")

# "acquisition" adds what differs between X-ray machines and sites: sharpness, gamma, noise,
# contrast. The shipped from-scratch model read blurrier or flatter NORMAL images as pneumonia
# (../shared/notes/measurements.md); these make such differences uninformative in training.
# "framing" adds zooming in to a 65 % field of view: the shipped model read tighter-framed normal
# chests as pneumonia; "normal-framing" zooms in only on NORMAL images (half of them, to 70-95 %).
AUGMENTATIONS = ("standard", "acquisition", "framing", "normal-framing")

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
    contrast: str = "none"  # one of preprocessing.CONTRASTS
    label_smoothing: float = 0.0
    ema: bool = False
    mixup: float = 0.0  # Beta(alpha, alpha) of mixup's blend; 0: no mixup
    match_sharpness: bool = False  # give about half of each class the other class's sharpness
    hold_out_series: str | None = None  # one of dataset.NORMAL_SERIES: kept out of training and validation
