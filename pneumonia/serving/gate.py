"""The gate for what is not a chest X-ray: pixel checks, then a feature distance.

A one-output sigmoid model answers every input with a probability (a flower got 99.6 %), and
its output cannot tell it was never trained on such a thing. Two measured checks refuse it:

1. Pixel checks on the decoded upload, before any model work: too few pixels, an aspect ratio
   no radiograph has, strong colour, a near-constant image. Bounds come from the training
   images (percentiles) with the slack stated beside each, and are stored with the model.
2. The Mahalanobis distance of the pooled features (the vector that feeds the logit) to the
   nearer of the two class means, with one shared Ledoit-Wolf-shrunk covariance fitted on the
   training part. The model pass that gives the logit and Grad-CAM returns these features too,
   so the gate costs one matrix-vector product. Thresholds are quantiles of the validation
   part's distances: `rejected` lets at least 99.5 % of validation images through.

Everything is stored beside the model in `ood.npz`, with the model file's sha256: a gate fitted
for another model is not used.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pneumonia.reading.pixel_stats import PixelStats
from pneumonia.serving.card import file_sha256
from pneumonia.serving.outcomes import GateVerdict
from pneumonia.serving.records import CardFieldError, parsed_record, record

GATE_FILE = "ood.npz"
REASONS = ("size", "shape", "colour", "blank", "features")

# Share of validation images that must pass (`rejected`) and that pass without a warning (`unusual`).
ACCEPT_QUANTILE = 0.995
UNUSUAL_QUANTILE = 0.975

# Slack around the training percentiles. The training copies of the Kaggle images are all
# 224x224 squares, greyscale: their percentiles alone would refuse every real upload's size,
# aspect or JPEG chroma noise, so each bound is the training percentile widened as stated.
MIN_PIXELS_FRACTION = 0.25  # of the 0.1st-percentile training pixel count
MIN_ASPECT_LIMIT = 4.0  # long side / short side; Kaggle originals reach 3.2 (a cropped 445x140)
TINT_ALLOWANCE = 16.0  # grey levels of mean chroma: a phone photo of a film on a light box is tinted
MIN_SPREAD_FRACTION = 0.5  # of the 0.1st-percentile training spread (1st to 99th grey-level percentile)

MESSAGES = {
    "size": "The image has too few pixels to be a chest radiograph.",
    "shape": "The image's shape (width to height) is unlike any chest radiograph.",
    "colour": "The image is in colour; a chest radiograph is greyscale.",
    "blank": "The image is almost uniform: there is no radiograph in it.",
    "features": "The image does not look like the chest X-rays this model was trained on.",
}
EXPECTED = "a frontal chest radiograph (X-ray), as a greyscale image"
UNUSUAL_WARNING = (
    "This image is unusual for this model (unlike most of its training X-rays): "
    "treat the probability with extra caution."
)


@dataclass
class Verdict:
    """The gate's answer for one image."""

    verdict: GateVerdict
    reason: str | None = None  # one of REASONS when rejected
    score: float | None = None  # feature distance, when computed
    threshold: float | None = None  # the bound that was crossed, when rejected

    @property
    def accepted(self) -> bool:
        return self.verdict != GateVerdict.REJECTED

    @property
    def message(self) -> str | None:
        if self.verdict == GateVerdict.REJECTED:
            return MESSAGES[self.reason]
        return UNUSUAL_WARNING if self.verdict == GateVerdict.UNUSUAL else None


class OutOfDistribution(ValueError):
    """An input the gate refused; `verdict` says why."""

    def __init__(self, verdict: Verdict):
        super().__init__(f"Not screened: {verdict.message} Expected {EXPECTED}.")
        self.verdict = verdict


@record
class PixelBounds:
    min_pixels: int
    max_aspect: float
    max_chroma: float
    min_spread: float
    derivation: dict  # the training percentiles and slack each bound came from


def pixel_bounds(train_stats: list[PixelStats]) -> PixelBounds:
    """Bounds from the training images' percentiles, widened by the slack above."""
    pixels = np.array([s.pixels for s in train_stats], float)
    aspect = np.array([s.aspect for s in train_stats])
    chroma = np.array([s.chroma for s in train_stats])
    spread = np.array([s.spread for s in train_stats])
    p_pixels, p_aspect = np.percentile(pixels, 0.1), np.percentile(aspect, 99.9)
    p_chroma, p_spread = np.percentile(chroma, 99.9), np.percentile(spread, 0.1)
    return PixelBounds(
        min_pixels=int(MIN_PIXELS_FRACTION * p_pixels),
        max_aspect=float(max(p_aspect, MIN_ASPECT_LIMIT)),
        max_chroma=float(p_chroma + TINT_ALLOWANCE),
        min_spread=float(MIN_SPREAD_FRACTION * p_spread),
        derivation={
            "images": len(train_stats),
            "pixels_p0.1": float(p_pixels),
            "min_pixels_fraction": MIN_PIXELS_FRACTION,
            "aspect_p99.9": float(p_aspect),
            "aspect_limit_at_least": MIN_ASPECT_LIMIT,
            "chroma_p99.9": float(p_chroma),
            "tint_allowance": TINT_ALLOWANCE,
            "spread_p0.1": float(p_spread),
            "min_spread_fraction": MIN_SPREAD_FRACTION,
        },
    )


def pixel_verdict(stats: PixelStats, bounds: PixelBounds) -> Verdict | None:
    """A rejection by the first failing pixel check, or None when all pass."""
    checks = (
        ("size", stats.pixels < bounds.min_pixels, stats.pixels, bounds.min_pixels),
        ("shape", stats.aspect > bounds.max_aspect, stats.aspect, bounds.max_aspect),
        ("colour", stats.chroma > bounds.max_chroma, stats.chroma, bounds.max_chroma),
        ("blank", stats.spread < bounds.min_spread, stats.spread, bounds.min_spread),
    )
    for reason, failed, value, bound in checks:
        if failed:
            return Verdict(GateVerdict.REJECTED, reason, float(value), float(bound))
    return None


@dataclass
class FeatureDensity:
    """Class-conditional Gaussians with one shared, shrunk covariance over pooled features."""

    means: np.ndarray  # (2, d)
    precision: np.ndarray  # (d, d)

    def distance(self, features: np.ndarray) -> np.ndarray:
        """(N, d) or (d,) -> Mahalanobis distance to the nearer class mean, (N,)."""
        features = np.atleast_2d(np.asarray(features, self.precision.dtype))
        centred = features[:, None, :] - self.means[None]  # (N, 2, d)
        # einsum's own loop, not BLAS: a multithreaded BLAS call leaves its threads spinning, which
        # slowed the next model pass in the web app by far more than this loop costs.
        squared = (np.einsum("nkd,de->nke", centred, self.precision, optimize=False) * centred).sum(axis=-1)  # (N, 2)
        return np.sqrt(np.maximum(squared.min(axis=1), 0.0))


def fit_feature_density(features: np.ndarray, labels: np.ndarray) -> FeatureDensity:
    """Ledoit-Wolf on the class-centred training features: one covariance for both classes."""
    from sklearn.covariance import LedoitWolf

    features = np.asarray(features, np.float64)
    labels = np.asarray(labels)
    means = np.stack([features[labels == k].mean(axis=0) for k in (0, 1)])  # (2, d)
    centred = features - means[labels]
    shrunk = LedoitWolf(assume_centered=True).fit(centred)
    return FeatureDensity(means, shrunk.precision_)


class OodGate:
    """Pixel bounds + feature density + thresholds, as stored in `ood.npz`."""

    def __init__(self, bounds: PixelBounds, density: FeatureDensity, thresholds: dict, info: dict):
        self.bounds = bounds
        self.density = density
        self.thresholds = {k: float(thresholds[k]) for k in (GateVerdict.UNUSUAL, GateVerdict.REJECTED)}
        self.info = info  # layer, model sha256, validation figures, detection figures

    def check_pixels(self, stats: PixelStats) -> Verdict | None:
        return pixel_verdict(stats, self.bounds)

    def check_features(self, features: np.ndarray) -> Verdict:
        """(d,) pooled features -> ok, unusual or rejected by distance."""
        return self.check_score(float(self.density.distance(features)[0]))

    def check_score(self, score: float) -> Verdict:
        if score > self.thresholds[GateVerdict.REJECTED]:
            return Verdict(GateVerdict.REJECTED, "features", score, self.thresholds[GateVerdict.REJECTED])
        return Verdict(
            GateVerdict.UNUSUAL if score > self.thresholds[GateVerdict.UNUSUAL] else GateVerdict.OK, None, score
        )

    def verdict(self, stats: PixelStats, score: float) -> Verdict:
        """The gate's answer for an image whose pixel statistics and feature distance are both known:
        the pixel checks first, as the screening pipeline applies them."""
        return self.check_pixels(stats) or self.check_score(float(score))

    def summary(self) -> dict:
        """What the card, /model and /healthz show."""
        return {"thresholds": self.thresholds, "pixel_bounds": asdict(self.bounds), **self.info}

    def save(self, path: str | Path) -> None:
        meta = {"bounds": asdict(self.bounds), "thresholds": self.thresholds, "info": self.info}
        np.savez_compressed(
            path,
            means=self.density.means.astype(np.float32),
            precision=self.density.precision.astype(np.float32),
            meta=np.array(json.dumps(meta)),
        )

    @classmethod
    def load(cls, path: str | Path) -> OodGate:
        """The gate stored at `path`, its metadata and arrays checked; GateFileError naming the file and field."""
        with np.load(path, allow_pickle=False) as stored:
            meta = gate_metadata(path, _stored(path, stored, "meta"))
            # float32: half the memory traffic of the (d, d) product on every upload; ample precision for a distance
            density = FeatureDensity(_stored(path, stored, "means"), _stored(path, stored, "precision"))
        if (
            density.means.ndim != 2
            or density.means.shape[0] != 2
            or density.precision.shape != (density.means.shape[1],) * 2
        ):
            raise GateFileError(
                f"the gate file {path} is not valid: means {density.means.shape} and precision "
                f"{density.precision.shape} should be (2, d) and (d, d)"
            )
        return cls(meta.bounds, density, asdict(meta.thresholds), meta.info)


class GateFileError(ValueError):
    """An `ood.npz` whose metadata or arrays are missing or malformed; the message names the file and the field."""


@record
class GateThresholds:
    unusual: float
    rejected: float


@record
class GateMetadata:
    """`ood.npz`'s `meta` (JSON): the pixel bounds, the distance thresholds and the fit's report."""

    bounds: PixelBounds
    thresholds: GateThresholds
    info: dict  # layer, model_sha256, validation and detection figures (what /model shows)


def _stored(path, stored, name: str) -> np.ndarray:
    if name not in stored.files:
        raise GateFileError(f"the gate file {path} is not valid: field {name} is missing")
    return stored[name]


def gate_metadata(path, stored: np.ndarray) -> GateMetadata:
    """The metadata array of `ood.npz` at `path`, checked field by field."""
    try:
        meta = parsed_record(GateMetadata, json.loads(str(stored)), "meta")
    except json.JSONDecodeError as err:
        raise GateFileError(f"the gate file {path} is not valid: field meta is not JSON ({err})") from None
    except CardFieldError as err:
        raise GateFileError(f"the gate file {path} is not valid: {err}") from None
    if not isinstance(meta.info.get("model_sha256"), str):
        raise GateFileError(f"the gate file {path} is not valid: field meta.info.model_sha256 is missing")
    return meta


def load_gate_for(keras_path: Path, keras_sha256: str | None = None) -> tuple[OodGate | None, str]:
    """The gate stored beside a model file (whose sha256 the caller may know), or None with the reason it is off."""
    path = keras_path.with_name(GATE_FILE)
    if not path.is_file():
        return None, f"no {GATE_FILE} beside the model: fit one with `python -m pneumonia fit-ood`"
    try:
        gate = OodGate.load(path)
    except GateFileError as err:
        return None, str(err)
    except (OSError, ValueError) as err:  # not a zip archive, a truncated one
        return None, f"{path} is unreadable ({type(err).__name__})"
    if gate.info.get("model_sha256") != (keras_sha256 or file_sha256(keras_path)):
        return None, f"{path} was fitted for another model file: fit it again with `python -m pneumonia fit-ood`"
    return gate, "on"


def feature_thresholds(val_scores: np.ndarray) -> dict:
    """Quantiles of the validation distances: at least ACCEPT_QUANTILE of them pass."""
    return {
        GateVerdict.UNUSUAL: float(np.quantile(val_scores, UNUSUAL_QUANTILE)),
        GateVerdict.REJECTED: float(np.quantile(val_scores, ACCEPT_QUANTILE, method="higher")),
    }
