"""A screening as an HTTP answer, for a single upload and a batch's file alike: the status of each outcome,
and the exception that carries a single upload's unscreened outcome to its answer (error_responses.py)."""

from __future__ import annotations

from pneumonia.serving.outcomes import Outcome
from pneumonia.serving.screening import Screening

OUTCOME_STATUS = {
    Outcome.SCREENED: 200,
    Outcome.REFUSED: 422,  # decoded, but the gate says it is not a chest X-ray
    Outcome.FAILED: 400,  # unreadable, or past a limit of the decoding sandbox
}
UNEXPECTED_STATUS = 500  # a failure of ours on that file (the pipeline logged it without its message)


def http_status(screening: Screening) -> int:
    return UNEXPECTED_STATUS if screening.unexpected else OUTCOME_STATUS[screening.outcome]


class NotScreened(Exception):
    """A single upload the pipeline did not screen: answered with `http_status` of its screening."""

    def __init__(self, screening: Screening):
        super().__init__(screening.outcome)
        self.screening = screening
