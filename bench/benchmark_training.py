"""Seconds per training epoch on this machine, through the package's own input pipeline, for each way
`train` could run a step: the default graph, XLA compilation (`jit_compile`), and the step without the
augmentation (what the input pipeline costs).

    .venv/bin/python -m bench.benchmark_training --arch densenet121 --image-size 128 --batch-size 64
    .venv/bin/python -m bench.benchmark_training --arch custom --image-size 120 --steps 60

Random pixels stand in for X-rays (the step costs the same); augmentation, class weights, the schedule
and the metrics are those of `train`. The first steps are traced (and compiled) and not timed; the
variants run one after another in one process, so compare them within one run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from pneumonia.training.architectures import build_model, normalization_for  # noqa: E402
from pneumonia.training.augmentation import augmentation_for, class_weights, make_dataset  # noqa: E402
from pneumonia.training.config import ARCHITECTURES, TrainConfig  # noqa: E402
from pneumonia.training.fitting import compile_for_training  # noqa: E402
from pneumonia.training.schedule import warmup_cosine  # noqa: E402

TRAIN_IMAGES = 4692  # the training part of the Kaggle train/ split after the validation carve-out
VARIANTS = {  # name: (jit_compile, augment)
    "graph (train's default)": (False, True),
    "XLA (jit_compile=True)": (True, True),
    "graph, no augmentation": (False, False),
}


def seconds_per_step(arch: str, image_size: int, batch_size: int, steps: int, jit_compile: bool, augment: bool):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (batch_size * steps, image_size, image_size), dtype=np.uint8)
    labels = (rng.uniform(0, 1, len(pixels)) < 0.74).astype(np.int64)
    model = build_model(arch, image_size, {"kind": "none"})
    schedule = warmup_cosine(TrainConfig.learning_rate, TrainConfig.epochs, steps + 2, TrainConfig.warmup_fraction)
    compile_for_training(model, schedule, jit_compile=jit_compile)
    batches = make_dataset(
        pixels,
        labels,
        normalization_for(arch),
        batch_size,
        0,
        augment=augmentation_for("standard", 0) if augment else None,
        shuffle=True,
    )
    weights = class_weights(labels)
    model.fit(batches.take(2), epochs=1, verbose=0, class_weight=weights)  # traces the same signature
    started = time.perf_counter()
    model.fit(batches, epochs=1, verbose=0, class_weight=weights)
    return (time.perf_counter() - started) / steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=ARCHITECTURES, default="densenet121")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--steps", type=int, default=12, help="timed steps per variant")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    args = parser.parse_args(argv)
    steps_per_epoch = -(-TRAIN_IMAGES // args.batch_size)
    print(
        f"{args.arch} at {args.image_size} px, batch {args.batch_size}, {os.cpu_count()} CPUs, {args.steps} timed "
        f"steps; an epoch is {steps_per_epoch} steps of {TRAIN_IMAGES:,} images (validation not included)"
    )
    baseline = None
    for name in args.variants:
        per_step = seconds_per_step(args.arch, args.image_size, args.batch_size, args.steps, *VARIANTS[name])
        baseline = baseline or per_step
        print(
            f"  {name:26s} {per_step:.3f} s/step, {per_step * steps_per_epoch:.0f} s per epoch "
            f"({per_step / baseline:.2f}x the first)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
