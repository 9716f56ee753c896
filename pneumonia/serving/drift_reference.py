"""The drift monitor's reference as the model card carries it (`ModelCard.monitor`, checked on load like every
field of the card): each signal's band and its count on the images the thresholds were chosen on. The monitor
itself is pneumonia/serving/drift.py."""

from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from pneumonia.serving.records import optional, record

MonitorQuantity = Literal["gate_score", "probability"]


@record
class MonitorBand:
    """One signal's band of a quantity, low <= x < high (None: unbounded), and how many of the reference
    images that had the quantity fell in it."""

    quantity: MonitorQuantity
    low: float | None
    high: float | None
    count: int
    of: int
    # The variance of the band's share over patients (a bootstrap of whole patients) against a binomial's, at
    # least 1: several X-rays of one patient are not independent (serving/drift.py).
    design_effect: float = 1.0

    @model_validator(mode="after")
    def _possible(self):
        if self.design_effect < 1:
            raise ValueError(f"design_effect {self.design_effect} should be at least 1")
        if not 0 <= self.count <= self.of or self.of < 1:
            raise ValueError(f"count {self.count} of {self.of}: needs 0 <= count <= of and of >= 1")
        if self.low is not None and self.high is not None and not self.low < self.high:
            raise ValueError(f"band [{self.low}, {self.high}) is empty")
        return self


@record
class MonitorReference:
    """The reference the drift monitor tests a window of screenings against: each signal's band with its
    count on the images the thresholds were chosen on (the validation part, or a recalibration's site
    sample), and the quantiles of each quantity there (shown beside the window's)."""

    computed_on: str
    images: int
    bands: dict[str, MonitorBand]  # signal name (serving/drift.py SIGNALS) -> its band
    quantiles: dict[str, dict[str, float]]  # quantity -> {"p10": ..., "p50": ..., "p90": ...}
    command: str | None = optional()

    @model_validator(mode="after")
    def _of_some_images(self):
        if self.images < 1:
            raise ValueError("images should be at least 1")
        return self
