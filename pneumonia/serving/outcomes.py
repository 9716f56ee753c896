"""The product's one vocabulary for what became of an image: every module compares these members, never
the words; the device page's own vocabulary module mirrors them for the browser (a test holds the two
equal), and the words are what the CSV, JSON and metrics carry."""

from __future__ import annotations

from enum import StrEnum


class Outcome(StrEnum):
    """What the pipeline decided for one image (a PACS run adds its own `skipped`: pneumonia/pacs)."""

    SCREENED = "screened"  # a probability and labels
    REFUSED = "refused"  # the gate's verdict was REJECTED: not screened
    FAILED = "failed"  # unreadable, or a failure of ours: the message says which


class GateVerdict(StrEnum):
    """The out-of-distribution gate's word on one image (pneumonia/serving/gate.py)."""

    OK = "ok"
    UNUSUAL = "unusual"  # screened, with a warning
    REJECTED = "rejected"  # refused: Outcome.REFUSED
