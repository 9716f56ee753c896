"""What a training run can be asked for, without importing Keras: the command line builds its
parser from these names and defaults, and `fitting.train` takes a `TrainConfig` (defined with the
model card that records it, pneumonia/serving/card.py, as the serving layer may not import this one)."""

from __future__ import annotations

from dataclasses import dataclass

from pneumonia.serving.card import TrainConfig

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


# The shift sets a rule may be chosen across: each a kind of difference between sites.
SHIFT_SETS = {
    "framing": ("crop_90", "crop_80"),
    "exposure": ("gamma_0.8", "gamma_1.25", "contrast_0.8", "contrast_1.2"),
    "sharpness": ("blur_r1", "blur_r2", "unsharp"),
}
SHIFT_SETS["framing+exposure+sharpness"] = tuple(s for group in SHIFT_SETS.values() for s in group)
# Shifts no rule is chosen on: every rule is scored on these (and on the originals), never chosen by them.
HELD_OUT_SHIFTS = ("noise_s5", "jpeg_q30", "rotate_+5", "rotate_-5", "crop_70", "resample_nearest", "resample_bicubic")

AGGREGATES = {
    "youden": "Youden's J on the validation part",
    "mean": "the mean of Youden's J over the validation part and each shift of the set",
    "worst": "the smallest Youden's J across the validation part and each shift of the set",
}


@dataclass(frozen=True)
class ThresholdRule:
    name: str
    shift_set: str | None  # a key of SHIFT_SETS; None: the validation part alone
    default: str  # a key of AGGREGATES

    @property
    def shifts(self) -> tuple[str, ...]:
        return SHIFT_SETS[self.shift_set] if self.shift_set else ()

    @property
    def description(self) -> str:
        if not self.shift_set:
            return (
                "default maximises Youden's J (sensitivity + specificity - 1) on the validation part; screening is "
                "the highest threshold whose sensitivity there reaches the target, and never above the default"
            )
        return (
            f"default maximises {AGGREGATES[self.default]} ({self.shift_set}: {', '.join(self.shifts)}); screening "
            "is the highest threshold whose sensitivity reaches the target on the validation part and under every "
            "shift of the set, and never above the default"
        )


RULES = (
    ThresholdRule("validation", None, "youden"),
    *(
        ThresholdRule(f"{aggregate}:{shift_set}", shift_set, aggregate)
        for shift_set in SHIFT_SETS
        for aggregate in ("mean", "worst")
    ),
)
RULES_BY_NAME = {rule.name: rule for rule in RULES}

__all__ = ["TrainConfig"]  # re-exported: `from pneumonia.training.config import TrainConfig`
