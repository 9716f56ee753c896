"""The one screening pipeline: X-rays in chunks through one model pass, one row per image.

    (name, source) pairs ──chunks of N──> prepare: for each image, in the decoding sandbox
        (a bounded child process, pneumonia/serving/sandbox.py): prepare_xray, the pixel statistics,
        the model square (S, S) [+ a display copy for overlays] ──gate pixel check──>
    ──> score: the chunk's squares: model_input (N, S, S, 3) ──one compiled pass──> features, logits
    ──> gate feature check, Platt calibration, labels: one ScreenedImage (its Screening) per file

Memory: no file is decoded in this process; the sandbox's child holds one full-size image at a time
within its limits, and a chunk here holds N model squares (and N display copies when Grad-CAM is
wanted). A file that cannot be read, that goes past a limit of the sandbox, or that the gate refuses
is a row with its error; it never ends the run. `prepare` needs no model, so the web app runs it
before it takes a model slot and `score` holding one.

With Grad-CAM each accepted image of the chunk goes through the explain graph instead: one pass
gives the logit, the map and the features, so the probability comes from the same pass as the
map. This is the one screening pipeline: `predict`, the web app's result page (one file), its
results table and batch API (many) all call `BatchScreener.screen_chunk`.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from pneumonia.errors import XrayReadError
from pneumonia.labels import PNEUMONIA
from pneumonia.reading.decoding import Source
from pneumonia.serving.gate import OutOfDistribution, Verdict
from pneumonia.serving.outcomes import Outcome
from pneumonia.serving.preprocessing import model_input
from pneumonia.serving.sandbox import DecodingSandbox, shared_sandbox

LOG = logging.getLogger(__name__)
DEFAULT_CHUNK_SIZE = 16  # images per model pass


def chunked(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


@dataclass(frozen=True)
class Screening:
    """What became of one image, decided once, by the pipeline: screened (a probability and labels),
    refused by the gate (its verdict, and the refusal as `error`) or failed (unreadable: the message)."""

    outcome: Outcome
    probability: float | None = None
    labels: dict[str, str] | None = None  # threshold name -> class
    verdict: Verdict | None = None  # the gate's; None without a gate, or when the file was unreadable
    error: str | None = None  # unreadable, or the gate's refusal ("Not screened: ...")
    unexpected: bool = False  # the error is a failure of ours, not of the file

    @classmethod
    def screened(cls, probability: float, labels: dict[str, str], verdict: Verdict | None) -> Screening:
        return cls(Outcome.SCREENED, probability, labels, verdict)

    @classmethod
    def refused(cls, verdict: Verdict) -> Screening:
        return cls(Outcome.REFUSED, verdict=verdict, error=str(OutOfDistribution(verdict)))

    @classmethod
    def failed(cls, error: str, unexpected: bool = False) -> Screening:
        return cls(Outcome.FAILED, error=error, unexpected=unexpected)


@dataclass
class ScreenedImage:
    """One file's row: its Screening, and the pipeline's images and timings for it."""

    name: str
    screening: Screening | None = None  # None until the pipeline has decided
    heat: np.ndarray | None = None  # Grad-CAM of the default label's class, (h, w) in [0, 1]
    display: np.ndarray | None = None  # uint8 (H, W), long side <= display_side, for thumbnails and overlays
    timing_ms: dict[str, float] = field(default_factory=dict)  # decode, preprocess, model (its share of a chunk)

    # Read through to the Screening: what every reader of a row asks.
    @property
    def outcome(self) -> Outcome:
        return self.screening.outcome

    @property
    def probability(self) -> float | None:
        return self.screening.probability

    @property
    def labels(self) -> dict[str, str] | None:
        return self.screening.labels

    @property
    def verdict(self) -> Verdict | None:
        return self.screening.verdict

    @property
    def error(self) -> str | None:
        return self.screening.error


Prepared = tuple["ScreenedImage", np.ndarray | None]  # a row, and its model square while it waits for the model


@dataclass
class Tally:
    """How many images came to each outcome (a subclass adds the outcomes of its own path)."""

    files: int = 0
    screened: int = 0
    refused: int = 0
    failed: int = 0

    def count(self, outcome: str) -> None:
        self.files += 1
        setattr(self, outcome, getattr(self, outcome) + 1)

    def summary(self) -> str:
        return (
            f"{self.files} file(s): {self.screened} screened, {self.refused} refused by the gate, "
            f"{self.failed} unreadable"
        )


class BatchScreener:
    """A classifier for many images (or one). Safe to call from several threads."""

    def __init__(self, classifier, names_in_messages: bool = False, sandbox: DecodingSandbox | None = None):
        self.classifier = classifier
        self.sandbox = sandbox or shared_sandbox()  # where every file is decoded
        # Decoding messages call bytes by their row's name (the archive's files), else "the upload".
        self.names_in_messages = names_in_messages
        # Called with rows once decided, each row once: by `prepare` those it decided (unreadable, refused by
        # the pixel checks), by `score` the others (the web app's metrics and drift monitor).
        self.observers: list[Callable[[list[ScreenedImage]], None]] = []

    def screen(
        self,
        sources: Iterable[tuple[str, Source]],
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        display_side: int | None = None,
        with_gradcam: bool = False,
    ) -> Iterator[ScreenedImage]:
        """(name, bytes or path) pairs -> one row each, in order, a chunk at a time."""
        for chunk in chunked(sources, chunk_size):
            yield from self.screen_chunk(chunk, display_side, with_gradcam)

    def screen_chunk(
        self, chunk: list[tuple[str, Source]], display_side: int | None = None, with_gradcam: bool = False
    ) -> list[ScreenedImage]:
        """One chunk: decoded one file at a time in the sandbox, then one model pass (or Grad-CAM per image)."""
        return self.score(self.prepare(chunk, display_side), with_gradcam)

    def prepare(self, chunk: list[tuple[str, Source]], display_side: int | None = None) -> list[Prepared]:
        """Each file decoded in the decoding sandbox and checked by the gate's pixel checks: no model
        needed, so the web app does this before it takes a model slot. Raises DecoderBusy when the
        sandbox has no child free within its wait."""
        prepared = [self._prepare_one(name, source, display_side) for name, source in chunk]
        self._observed([row for row, pixels in prepared if pixels is None])
        return prepared

    def score(self, prepared: list[Prepared], with_gradcam: bool = False) -> list[ScreenedImage]:
        """The model's part: one pass over the squares (or Grad-CAM per image); the rows in order."""
        squares = [(row, pixels) for row, pixels in prepared if pixels is not None]
        if squares:
            (self._explain_each if with_gradcam else self._forward_all)(squares)
        self._observed([row for row, _ in squares])
        return [row for row, _ in prepared]

    def _observed(self, rows: list[ScreenedImage]) -> None:
        if rows:
            for observe in self.observers:
                observe(rows)

    def _prepare_one(self, name: str, source: Source, display_side: int | None) -> Prepared:
        """The row and the model's square (None once the row has its outcome)."""
        row = ScreenedImage(name)
        try:
            named = {"bytes_name": name} if self.names_in_messages else {}
            prepared = self.sandbox.prepare(source, self.classifier.image_size, display_side, **named)
        except XrayReadError as err:  # unreadable, or past a limit of the sandbox
            row.screening = Screening.failed(str(err))
            return row, None
        except RuntimeError as err:  # a decoder bug: the child says only its type (the message could quote the file)
            row.screening = Screening.failed(str(err), unexpected=True)
            LOG.error("Unexpected error while decoding a file: %s", err)
            return row, None
        row.timing_ms.update(prepared.timing_ms)
        row.display = prepared.display
        gate = self.classifier.gate
        refused = gate.check_pixels(prepared.stats) if gate is not None else None
        if refused is not None:
            row.screening = Screening.refused(refused)
            return row, None
        return row, prepared.square

    def _forward_all(self, squares: list[tuple[ScreenedImage, np.ndarray]]) -> None:
        started = time.perf_counter()
        inputs = model_input(np.stack([pixels for _, pixels in squares]), self.classifier.preprocessing)
        features, logits = self.classifier.features_and_logits(inputs, batch_size=len(inputs))
        gate = self.classifier.gate
        scores = gate.density.distance(features) if gate is not None else [None] * len(squares)
        share = _ms((time.perf_counter() - started) / len(squares))
        for (row, _), logit, score in zip(squares, logits, scores):
            self._score(row, float(logit), None if score is None else gate.check_score(float(score)))
            row.timing_ms["model"] = share

    def _explain_each(self, squares: list[tuple[ScreenedImage, np.ndarray]]) -> None:
        from pneumonia.serving.gradcam import heatmap

        gate = self.classifier.gate
        for row, pixels in squares:
            started = time.perf_counter()
            logit, cam, features = self.classifier.explain(model_input(pixels, self.classifier.preprocessing)[None])
            self._score(row, logit, gate.check_features(features) if gate is not None else None)
            if row.outcome == Outcome.SCREENED:
                row.heat = heatmap(cam, for_pneumonia=row.labels["default"] == PNEUMONIA)
            row.timing_ms["model_gradcam"] = _ms(time.perf_counter() - started)

    def _score(self, row: ScreenedImage, logit: float, verdict: Verdict | None) -> None:
        """The row's Screening once the model has seen it: screened, or refused by the feature check."""
        if verdict is not None and not verdict.accepted:
            row.screening = Screening.refused(verdict)
            return
        probability = float(self.classifier.calibrated(logit))
        row.screening = Screening.screened(probability, self.classifier.labels(probability), verdict)


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)
