"""`train`: a Kaggle-layout folder -> a model folder (weights, card, report, gate, ONNX export)."""

from __future__ import annotations

import dataclasses

from pneumonia.cli import fail


def run(args) -> int:
    from pneumonia.errors import TrainingError
    from pneumonia.training.architectures import InitError
    from pneumonia.training.config import DEFAULT_IMAGE_SIZE, DEFAULT_INIT, TrainConfig
    from pneumonia.training.fitting import train

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    config = TrainConfig(
        **{
            **given,
            "out": args.out or f"runs/{args.arch}",
            "init": args.init or DEFAULT_INIT[args.arch],
            "image_size": args.image_size or DEFAULT_IMAGE_SIZE[args.arch],
            "cache_dir": None if args.no_cache else args.cache_dir,
        }
    )
    try:
        card = train(config)
    except (InitError, TrainingError) as err:
        return fail(err)
    print(
        f"validation AUC {card.validation.auc:.4f}; thresholds: default {card.thresholds.default:.3f}, "
        f"screening {card.thresholds.screening:.3f}"
    )
    return 0


def add(commands, shipped: str) -> None:
    from pneumonia.training.config import (
        ARCHITECTURES,
        DEFAULT_IMAGE_SIZE,
        DEFAULT_INIT,
        TrainConfig,
    )

    default = TrainConfig(data_dir="")
    per_arch = lambda values: ", ".join(f"{v} for {arch}" for arch, v in values.items())  # noqa: E731
    train = commands.add_parser("train", help="train a model on a Kaggle-layout folder")
    train.add_argument("data_dir")
    train.add_argument("--arch", choices=ARCHITECTURES, default=default.arch)
    train.add_argument("--out", help="output folder (default runs/<arch>)")
    train.add_argument(
        "--init",
        help="imagenet, none, or a local DenseNet121 weights file or trained .keras model "
        f"(default: {per_arch(DEFAULT_INIT)})",
    )
    train.add_argument("--image-size", type=int, help=f"input side in pixels (default {per_arch(DEFAULT_IMAGE_SIZE)})")
    helps = {
        "epochs": "the schedule's length; the final epoch's weights are the model",
        "learning_rate": "the peak rate, reached after the warm-up, then decayed along a cosine to 0",
        "warmup_fraction": "the share of all steps over which the rate rises linearly to its peak",
    }
    for name in ("epochs", "batch_size", "learning_rate", "warmup_fraction", "val_fraction", "seed"):
        value = getattr(default, name)
        train.add_argument("--" + name.replace("_", "-"), type=type(value), default=value, help=helps.get(name))
    train.add_argument("--target-sensitivity", type=float, default=default.target_sensitivity)
    _add_recipe(train, default)
    train.add_argument(
        "--resume", action="store_true", help="continue from OUT/checkpoints/last.keras, at the schedule's step"
    )
    train.add_argument("--cache-dir", default=default.cache_dir, help="where decoded, resized pixels are kept")
    train.add_argument("--no-cache", action="store_true")
    train.set_defaults(run=run)


def _add_recipe(train, default) -> None:
    """Augmentation, contrast, the threshold rule and the held-out series."""
    from pneumonia.serving.preprocessing import CONTRASTS
    from pneumonia.training.config import AUGMENTATIONS, RULES
    from pneumonia.training.dataset import NORMAL_SERIES

    train.add_argument(
        "--augment",
        choices=AUGMENTATIONS,
        default=default.augment,
        help="standard: rotation, shift, zoom, brightness, contrast; acquisition: also sharpness, "
        "gamma, noise and stronger contrast (what differs between X-ray machines)",
    )
    train.add_argument(
        "--contrast",
        choices=CONTRASTS,
        default=default.contrast,
        help="contrast normalisation of the model's square (equalize: global histogram equalisation), "
        "recorded in the card and applied everywhere the model is used",
    )
    train.add_argument(
        "--threshold-rule",
        choices=[rule.name for rule in RULES],
        default=default.threshold_rule,
        help="how the two thresholds are chosen: on the validation part alone, or across it and a set of "
        "acquisition shifts of it (mean or worst Youden's J; model/report/levers.md compares them)",
    )
    train.add_argument(
        "--hold-out-series",
        choices=NORMAL_SERIES,
        help="keep this NORMAL acquisition series out of training and validation and report the "
        "specificity on it in the card (a test of transfer to an unseen series)",
    )
