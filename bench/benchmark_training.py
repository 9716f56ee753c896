"""Seconds per training epoch on this machine, through the package's own input pipeline.

    .venv/bin/python -m bench.benchmark_training --arch densenet121 --image-size 120
    .venv/bin/python -m bench.benchmark_training --arch custom --image-size 120 --steps 60

Random pixels stand in for X-rays (the step costs the same); augmentation, class weights and
the metrics are those of `train`. The first steps are traced and not timed.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from pneumonia.training.architectures import build_model, normalization_for  # noqa: E402
from pneumonia.training.augmentation import augmentation_for, class_weights, make_dataset  # noqa: E402
from pneumonia.training.config import ARCHITECTURES, TrainConfig  # noqa: E402
from pneumonia.training.fitting import compile_for_training  # noqa: E402

TRAIN_IMAGES = 4692  # the training part of the Kaggle train/ split after the validation carve-out


def seconds_per_step(arch: str, image_size: int, batch_size: int, steps: int) -> float:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (batch_size * steps, image_size, image_size), dtype=np.uint8)
    labels = (rng.uniform(0, 1, len(pixels)) < 0.74).astype(np.int64)
    model = build_model(arch, image_size, {"kind": "none"})
    compile_for_training(model, TrainConfig.learning_rate)
    batches = make_dataset(
        pixels, labels, normalization_for(arch), batch_size, 0, augment=augmentation_for("standard", 0), shuffle=True
    )
    weights = class_weights(labels)
    model.fit(batches.take(2), epochs=1, verbose=0, class_weight=weights)  # traces the same signature
    started = time.perf_counter()
    model.fit(batches, epochs=1, verbose=0, class_weight=weights)
    return (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=ARCHITECTURES, default="densenet121")
    parser.add_argument("--image-size", type=int, default=120)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=16, help="timed steps")
    args = parser.parse_args()
    per_step = seconds_per_step(args.arch, args.image_size, args.batch_size, args.steps)
    steps_per_epoch = -(-TRAIN_IMAGES // args.batch_size)
    print(
        f"{args.arch} at {args.image_size} px, batch {args.batch_size}, {os.cpu_count()} CPUs: "
        f"{per_step:.3f} s/step, {per_step * steps_per_epoch:.0f} s per epoch of {TRAIN_IMAGES:,} images "
        f"({steps_per_epoch} steps, validation not included)"
    )


if __name__ == "__main__":
    main()
