"""The drift monitor: do the recent screenings still look like the images the thresholds were chosen on?

A model answers a new site's X-rays with the same confidence whether or not they resemble its training
data, and its thresholds were chosen on the validation part of train/ (or, after `calibrate`, on a site
sample). Labels are not needed to see part of a shift: the gate's scores and the distribution of the
calibrated probability move. The monitor compares a window of recent screenings, numbers only, with the
reference the model card carries (`ModelCard.monitor`, written by `fit-ood`, which `train` runs, and
replaced by `calibrate` with the site sample's), one signal per band of a quantity:

    unusual_share            gate score >= the gate's `unusual` threshold    (a one-sided test: only more)
    gate_score_above_median  gate score >= the reference's median score      (two-sided)
    uncertain_share          0.1 <= calibrated probability < 0.9             (two-sided)
    above_default            probability >= the default threshold            (two-sided)
    above_screening          probability >= the screening threshold          (two-sided)

The gate signals count every image the gate scored (screened, or refused by its feature check); the
probability signals count the screened images. A signal's test asks whether the window's count k of n
is one the reference makes likely: under no drift, k follows the beta-binomial predictive distribution
of a share estimated from the reference's count c of m (Jeffreys prior, Beta(c + 1/2, m - c + 1/2)),
which carries the reference's own uncertainty as well as the window's. A signal alarms when k falls
outside the central range that holds at least 1 - alpha/s of that distribution (s signals: Bonferroni),
so the chance that any signal alarms on a window without drift is at most ALPHA (1 %). That range,
divided by n, is the signal's `expected` share. A window under `min_images` never alarms.

Measured (studies/drift_monitor.py, docs/monitoring.md): the false-alarm rate over random windows of the
validation part, and after how many images each shift proxy is caught.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from pneumonia.serving.drift_reference import MonitorBand, MonitorReference
from pneumonia.serving.outcomes import GateVerdict

ALPHA = 0.01  # the chance that a window without drift alarms, all signals together (at most)
WINDOW = 500  # screenings the web app's monitor keeps (per worker process)
MIN_IMAGES = 100  # a window (or a signal) with fewer never alarms
UNCERTAIN = (0.1, 0.9)
TOLERANCE = 1e-9  # a share on the edge of its expected range is inside it
QUANTILES = {"p10": 0.1, "p25": 0.25, "p50": 0.5, "p75": 0.75, "p90": 0.9}


@dataclass(frozen=True)
class Signal:
    quantity: str  # "gate_score" or "probability"
    sided: str  # "above": only a larger share alarms; "both"
    says: str  # what its share is, after the number ("4.6 % unusual")


SIGNALS = {
    "unusual_share": Signal("gate_score", "above", "unusual for the gate"),
    "gate_score_above_median": Signal("gate_score", "both", "of gate scores above the reference's median"),
    "uncertain_share": Signal("probability", "both", "of probabilities between 10 % and 90 %"),
    "above_default": Signal("probability", "both", "above the default threshold"),
    "above_screening": Signal("probability", "both", "above the screening threshold"),
}


# --- The reference ------------------------------------------------------------------------------


def _inside(band: MonitorBand, values: np.ndarray) -> np.ndarray:
    inside = ~np.isnan(values)
    filled = np.where(inside, values, 0.0)
    if band.low is not None:
        inside &= filled >= band.low
    if band.high is not None:
        inside &= filled < band.high
    return inside


def design_effect(inside: np.ndarray, groups, resamples: int = 1000, seed: int = 0) -> float:
    """The variance of the share of `inside` over a bootstrap of whole groups (patients), against the binomial
    variance of as many independent images; at least 1 (1 without groups)."""
    share = inside.mean() if len(inside) else 0.0
    if groups is None or len(inside) < 2 or share in (0.0, 1.0):
        return 1.0
    _, group_of = np.unique(np.asarray(groups), return_inverse=True)
    members = np.bincount(group_of)
    hits = np.bincount(group_of, weights=inside.astype(float))
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(members), (resamples, len(members)))
    shares = hits[picks].sum(axis=1) / members[picks].sum(axis=1)
    return float(max(1.0, shares.var() / (share * (1 - share) / len(inside))))


def _band(quantity: str, values: np.ndarray, low, high, groups) -> MonitorBand:
    band = MonitorBand(quantity, low, high, 0, max(1, len(values)))
    inside = _inside(band, values)
    return MonitorBand(quantity, low, high, int(inside.sum()), int(len(values)), design_effect(inside, groups))


def monitor_reference(
    logits,
    scores,
    platt_parameters: tuple[float, float],
    thresholds: dict[str, float],
    gate_thresholds: dict[str, float] | None,
    computed_on: str,
    command: str | None = None,
    groups=None,
) -> MonitorReference:
    """The card's reference from the images the thresholds were chosen on: their raw logits, the gate's
    scores (None without a gate), the card's calibration (slope, intercept), its thresholds and the gate's;
    `groups` (a patient per image, when known) gives each band's design effect. The probability bands count
    the images the gate lets through, as a screening would."""
    from pneumonia.serving.card import platt

    logits = np.asarray(logits, np.float64)
    probabilities = platt(logits, *platt_parameters)
    groups = None if groups is None else np.asarray(groups)
    bands, quantiles, kept = {}, {}, groups
    if scores is not None and gate_thresholds is not None:
        scores = np.asarray(scores, np.float64)
        median = float(np.median(scores))
        bands["unusual_share"] = _band("gate_score", scores, float(gate_thresholds[GateVerdict.UNUSUAL]), None, groups)
        bands["gate_score_above_median"] = _band("gate_score", scores, median, None, groups)
        quantiles["gate_score"] = {name: float(np.quantile(scores, q)) for name, q in QUANTILES.items()}
        through = scores <= float(gate_thresholds[GateVerdict.REJECTED])
        probabilities, kept = probabilities[through], None if groups is None else groups[through]
    bands["uncertain_share"] = _band("probability", probabilities, *UNCERTAIN, kept)
    bands["above_default"] = _band("probability", probabilities, float(thresholds["default"]), None, kept)
    bands["above_screening"] = _band("probability", probabilities, float(thresholds["screening"]), None, kept)
    quantiles["probability"] = {name: float(np.quantile(probabilities, q)) for name, q in QUANTILES.items()}
    return MonitorReference(computed_on, int(len(logits)), bands, quantiles, command)


# --- The test -----------------------------------------------------------------------------------


@lru_cache(maxsize=4096)
def _acceptance(n: int, count: float, of: float, alpha: float, sided: str) -> tuple[int, int]:
    """(lo, hi): the counts k of n that do not alarm, lo <= k <= hi, for a reference count of `count` of `of`:
    each tail outside holds less than alpha / 2 ("both") or the upper one less than alpha ("above") of the
    beta-binomial predictive distribution."""
    a, b = count + 0.5, of - count + 0.5
    k = np.arange(n, dtype=float)
    # pmf(k + 1) / pmf(k) = (n - k) / (k + 1) * (k + a) / (n - k - 1 + b): the log pmf, up to a constant, in
    # one vectorised pass (microseconds for n = 500, on every screening that changes the window's size)
    log_ratio = np.log(n - k) - np.log(k + 1) + np.log(k + a) - np.log(n - k - 1 + b)
    log_pmf = np.concatenate([[0.0], np.cumsum(log_ratio)])
    pmf = np.exp(log_pmf - log_pmf.max())
    pmf /= pmf.sum()
    below = np.cumsum(pmf)  # P(K <= k)
    above = pmf[::-1].cumsum()[::-1]  # P(K >= k)
    tail = alpha if sided == "above" else alpha / 2
    lo = 0 if sided == "above" else int(np.argmax(below >= tail))
    hi = int(np.nonzero(above >= tail)[0][-1])
    return lo, hi


def acceptance(n: int, count: int, of: int, alpha: float, sided: str, design_effect: float = 1.0):
    """(lowest, highest) share of a window of n that does not alarm. With a design effect d > 1 both the
    reference and the window count as n / d independent images (clustered images carry less information)."""
    effective = max(1, round(n / design_effect))
    lo, hi = _acceptance(effective, count / design_effect, of / design_effect, alpha, sided)
    return lo / effective, hi / effective


@dataclass(frozen=True)
class Count:
    inside: int  # window values in the signal's band
    of: int  # window values of the signal's quantity


def signal_alpha(reference: MonitorReference, alpha: float = ALPHA) -> float:
    return alpha / max(1, len(reference.bands))


def assessed_signal(name: str, band: MonitorBand, count: Count, alpha: float, min_images: int) -> dict:
    """One signal of the answer: its share in the window, the range expected at this window's size, the alarm."""
    sided = SIGNALS[name].sided
    answer = {"name": name, "quantity": band.quantity, "sided": sided, "count": count.inside, "of": count.of}
    answer["reference"] = band.count / band.of
    if count.of == 0:
        return answer | {"value": None, "expected": None, "alarm": False}
    low, high = acceptance(count.of, band.count, band.of, alpha, sided, band.design_effect)
    value = count.inside / count.of
    alarm = count.of >= min_images and not low - TOLERANCE <= value <= high + TOLERANCE
    return answer | {"value": value, "expected": [low, high], "alarm": alarm}


def assess(
    reference: MonitorReference | None,
    counts: dict[str, Count],
    images: int,
    min_images: int = MIN_IMAGES,
    alpha: float = ALPHA,
) -> dict:
    """The monitor's answer (GET /api/monitor, the model page, `pneumonia monitor`) for a window of `images`
    screenings whose counts per signal are `counts`."""
    answer = {"alarm": False, "images": images, "min_images": min_images, "false_alarm_rate": alpha}
    if reference is None:
        return answer | {"reference": None, "signals": [], "advice": NO_REFERENCE}
    answer["reference"] = {"computed_on": reference.computed_on, "images": reference.images}
    each = signal_alpha(reference, alpha)
    signals = [
        assessed_signal(name, band, counts.get(name, Count(0, 0)), each, min_images)
        for name, band in reference.bands.items()
        if name in SIGNALS
    ]
    alarm = images >= min_images and any(signal["alarm"] for signal in signals)
    return answer | {"alarm": alarm, "signals": signals, "advice": advice(reference, signals, images, min_images)}


NO_REFERENCE = (
    "The model card has no reference statistics for the drift monitor, so nothing is compared. They are written "
    "by `pneumonia fit-ood MODEL DATA_DIR` (which `train` runs) and by `pneumonia calibrate` (a site sample)."
)


def _share(value: float) -> str:
    return f"{100 * value:.1f} %"


def _expected(signal: dict) -> str:
    lo, hi = signal["expected"]
    if signal["sided"] == "above" or lo == 0:
        return f"at most {_share(hi)}"
    return f"between {_share(lo)} and {_share(hi)}"


def advice(reference: MonitorReference, signals: list[dict], images: int, min_images: int) -> str:
    """The answer in plain words."""
    where = "the site sample the thresholds were recalibrated on" if "site" in reference.computed_on else None
    where = where or "the validation set the thresholds were chosen on"
    if images < min_images:
        return (
            f"Only {images} screening(s) in the window: the monitor needs at least {min_images} to tell a drift "
            "from chance, so it does not alarm yet."
        )
    alarmed = [signal for signal in signals if signal["alarm"]]
    if not alarmed:
        return f"The last {images} screenings are in line with {where}: every signal is within its expected range."
    found = "; ".join(
        f"{_share(signal['value'])} {SIGNALS[signal['name']].says} against {_expected(signal)} expected"
        for signal in alarmed
    )
    return (
        f"This site's X-rays differ from {where}: {found}. The thresholds may not hold here: check them with "
        "`pneumonia calibrate` on about 200 labelled X-rays from this site."
    )


# --- Counting a window ----------------------------------------------------------------------------


def in_band(band: MonitorBand, value: float | None) -> bool:
    return value is not None and (band.low is None or value >= band.low) and (band.high is None or value < band.high)


def counts_of(reference: MonitorReference, probabilities, scores) -> dict[str, Count]:
    """Counts per signal of arrays of values (NaN: none, as for an image the gate refused)."""
    values = {"probability": np.asarray(probabilities, float), "gate_score": np.asarray(scores, float)}
    counts = {}
    for name, band in reference.bands.items():
        present = values[band.quantity]
        counts[name] = Count(int(_inside(band, present).sum()), int((~np.isnan(present)).sum()))
    return counts


def assess_values(reference, probabilities, scores, min_images: int = MIN_IMAGES, alpha: float = ALPHA) -> dict:
    """The monitor's answer for whole arrays of results (a `predict`/`archive`/`pacs` run, a study's window)."""
    images = int(max(len(probabilities), len(scores)))
    counts = counts_of(reference, probabilities, scores) if reference is not None else {}
    return assess(reference, counts, images, min_images, alpha)


class DriftMonitor:
    """The last `window` screenings of this process, as numbers only (a probability and a gate score,
    either of which may be missing), with running counts per signal. Thread-safe; kept in memory, so a
    restart starts an empty window."""

    def __init__(self, reference: MonitorReference | None, window: int = WINDOW, min_images: int = MIN_IMAGES):
        if window < 1 or min_images < 1:
            raise ValueError("the monitor's window and minimum must be at least 1")
        self.reference = reference
        self.window, self.min_images = int(window), int(min_images)
        self._values: deque[tuple[float | None, float | None]] = deque()
        self._inside = dict.fromkeys(reference.bands if reference else (), 0)
        self._of = dict.fromkeys(reference.bands if reference else (), 0)
        self._lock = threading.Lock()

    def _count(self, values: tuple[float | None, float | None], step: int) -> None:
        by_quantity = {"probability": values[0], "gate_score": values[1]}
        for name, band in self.reference.bands.items():
            value = by_quantity[band.quantity]
            if value is not None:
                self._of[name] += step
                self._inside[name] += step * in_band(band, value)

    def observe(self, probability: float | None, score: float | None) -> None:
        """One screening: its calibrated probability (None when refused) and gate score (None without one)."""
        if probability is None and score is None:
            return
        values = (None if probability is None else float(probability), None if score is None else float(score))
        with self._lock:
            self._values.append(values)
            if self.reference is not None:
                self._count(values, +1)
            if len(self._values) > self.window:
                old = self._values.popleft()
                if self.reference is not None:
                    self._count(old, -1)

    def report(self) -> dict:
        with self._lock:
            counts = {name: Count(self._inside[name], self._of[name]) for name in self._inside}
            images = len(self._values)
        return assess(self.reference, counts, images, self.min_images) | {"window": self.window}
