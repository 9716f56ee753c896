"""The learning rate of every training step: a linear warm-up to the peak, then a cosine decay to zero.

Why this schedule: validation AUC on the patient-grouped part of train/ is 0.997-0.999 at every late
epoch (issue 34), so it cannot rank epochs, stop early or cut the rate on a plateau; a schedule fixed
in advance that ends at zero converges without asking it. The rate is a function of the global step
(the optimizer's `iterations`, saved in every checkpoint), so `--resume` continues it exactly.
"""

from __future__ import annotations

import math

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="pneumonia")
class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    """Step s (0-based) -> peak * (s + 1) / warmup for s < warmup, then peak * (1 + cos(pi * t)) / 2
    with t going from 0 at the end of the warm-up to 1 at the last step."""

    def __init__(self, peak: float, total_steps: int, warmup_steps: int):
        if total_steps < 1 or not 0 <= warmup_steps < total_steps:
            raise ValueError(f"need 0 <= warmup_steps < total_steps, got {warmup_steps} and {total_steps}")
        self.peak = float(peak)
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        warming = self.peak * (step + 1.0) / max(self.warmup_steps, 1)
        decay_steps = max(self.total_steps - self.warmup_steps - 1, 1)
        progress = ops.clip((step - self.warmup_steps) / decay_steps, 0.0, 1.0)
        decaying = 0.5 * self.peak * (1.0 + ops.cos(math.pi * progress))
        return ops.where(step < self.warmup_steps, warming, decaying)

    def get_config(self) -> dict:
        return {"peak": self.peak, "total_steps": self.total_steps, "warmup_steps": self.warmup_steps}


def warmup_cosine(peak: float, epochs: int, steps_per_epoch: int, warmup_fraction: float) -> WarmupCosine:
    total = epochs * steps_per_epoch
    return WarmupCosine(peak, total, min(round(warmup_fraction * total), total - 1))


def describe(schedule: WarmupCosine) -> str:
    """One line for the card."""
    return (
        f"linear warm-up over {schedule.warmup_steps} steps to {schedule.peak:g}, then cosine decay to 0 at step "
        f"{schedule.total_steps}; the final weights are kept"
    )
