"""The drift monitor's reference as the model card carries it (`ModelCard.monitor`, checked on load like every
field of the card): each signal's band and its count on the images the thresholds were chosen on. The monitor
itself is pneumonia/serving/drift.py."""

from __future__ import annotations

from dataclasses import dataclass

from pneumonia.serving.records import CardFieldError, optional

MONITOR_QUANTITIES = ("gate_score", "probability")


@dataclass(frozen=True)
class MonitorBand:
    """One signal's band of a quantity, low <= x < high (None: unbounded), and how many of the reference
    images that had the quantity fell in it."""

    quantity: str  # one of MONITOR_QUANTITIES
    low: float | None
    high: float | None
    count: int
    of: int
    # The variance of the band's share over patients (a bootstrap of whole patients) against a binomial's, at
    # least 1: several X-rays of one patient are not independent (serving/drift.py).
    design_effect: float = 1.0

    def __post_init__(self):
        if self.design_effect < 1:
            raise CardFieldError(f"design_effect {self.design_effect} should be at least 1")
        if self.quantity not in MONITOR_QUANTITIES:
            raise CardFieldError(f"quantity {self.quantity!r} is not one of {', '.join(MONITOR_QUANTITIES)}")
        if not 0 <= self.count <= self.of or self.of < 1:
            raise CardFieldError(f"count {self.count} of {self.of}: needs 0 <= count <= of and of >= 1")
        if self.low is not None and self.high is not None and not self.low < self.high:
            raise CardFieldError(f"band [{self.low}, {self.high}) is empty")


@dataclass(frozen=True)
class MonitorReference:
    """The reference the drift monitor tests a window of screenings against: each signal's band with its
    count on the images the thresholds were chosen on (the validation part, or a recalibration's site
    sample), and the quantiles of each quantity there (shown beside the window's)."""

    computed_on: str
    images: int
    bands: dict[str, MonitorBand]  # signal name (serving/drift.py SIGNALS) -> its band
    quantiles: dict[str, dict[str, float]]  # quantity -> {"p10": ..., "p50": ..., "p90": ...}
    command: str | None = optional()

    def __post_init__(self):
        if self.images < 1:
            raise CardFieldError("images should be at least 1")
