"""The one screening pipeline: X-rays in chunks through one model pass, one row per image.

    (name, source) pairs ──chunks of N──> for each image, one after the other:
        decode_xray ──gate pixel check──> resize_xray (S, S) [+ a display copy for overlays]
        (the full-size image is dropped here, before the next file is decoded)
    ──> the chunk's squares: model_input (N, S, S, 3) ──one compiled pass──> features, logits
    ──> gate feature check, Platt calibration, labels: one ScreenedImage (its Screening) per file

Memory: at most one full-size decoded image at a time, whatever the number of files; a chunk
holds N model squares (and N display copies when Grad-CAM is wanted). A file that cannot be
read, or that the gate refuses, is a row with its error; it never ends the run.

With Grad-CAM each accepted image of the chunk goes through the explain graph instead: one pass
gives the logit, the map and the features, so the probability comes from the same pass as the
map. This is the one screening pipeline: `predict`, the web app's result page (one file), its
results table and batch API (many) all call `BatchScreener.screen_chunk`.
"""

from __future__ import annotations

import itertools
import logging
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from pneumonia.errors import XrayReadError
from pneumonia.labels import PNEUMONIA
from pneumonia.reading.decoding import Source, decode_xray
from pneumonia.serving.gate import OutOfDistribution, Verdict
from pneumonia.serving.preprocessing import model_input, resize_xray

LOG = logging.getLogger(__name__)
DEFAULT_CHUNK_SIZE = 16  # images per model pass


def chunked(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


SCREENED, REFUSED, FAILED = "screened", "refused", "failed"
OUTCOMES = (SCREENED, REFUSED, FAILED)


@dataclass(frozen=True)
class Screening:
    """What became of one image, decided once, by the pipeline: screened (a probability and labels),
    refused by the gate (its verdict, and the refusal as `error`) or failed (unreadable: the message)."""

    outcome: str  # one of OUTCOMES (a PACS run adds skipped: pneumonia/pacs)
    probability: float | None = None
    labels: dict[str, str] | None = None  # threshold name -> class
    verdict: Verdict | None = None  # the gate's; None without a gate, or when the file was unreadable
    error: str | None = None  # unreadable, or the gate's refusal ("Not screened: ...")
    unexpected: bool = False  # the error is a failure of ours, not of the file

    @classmethod
    def screened(cls, probability: float, labels: dict[str, str], verdict: Verdict | None) -> Screening:
        return cls(SCREENED, probability, labels, verdict)

    @classmethod
    def refused(cls, verdict: Verdict) -> Screening:
        return cls(REFUSED, verdict=verdict, error=str(OutOfDistribution(verdict)))

    @classmethod
    def failed(cls, error: str, unexpected: bool = False) -> Screening:
        return cls(FAILED, error=error, unexpected=unexpected)


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
    def outcome(self) -> str:
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

    def __init__(self, classifier, names_in_messages: bool = False):
        self.classifier = classifier
        # Decoding messages call bytes by their row's name (the archive's files), else "the upload".
        self.names_in_messages = names_in_messages
        # Called with each chunk's rows once decided (the web app's metrics and drift monitor, web/monitoring.py).
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
        """One chunk: decoded one file at a time, then one model pass (or Grad-CAM per image)."""
        rows, squares = [], []  # squares: (row, uint8 (S, S)) waiting for the model
        for name, source in chunk:
            row, pixels = self._decode(name, source, display_side)
            rows.append(row)
            if pixels is not None:
                squares.append((row, pixels))
        if squares:
            (self._explain_each if with_gradcam else self._forward_all)(squares)
        for observe in self.observers:
            observe(rows)
        return rows

    def _decode(self, name: str, source: Source, display_side: int | None) -> tuple[ScreenedImage, np.ndarray | None]:
        """The row and the model's square; the full-size image does not outlive this call."""
        row = ScreenedImage(name)
        started = time.perf_counter()
        try:
            named = {"bytes_name": name} if self.names_in_messages else {}
            xray, stats = decode_xray(source, self.classifier.image_size, **named)
        except XrayReadError as err:
            row.screening = Screening.failed(str(err))
            return row, None
        except Exception as err:  # a decoder bug must not end the run; its message could quote the file
            row.screening = Screening.failed(f"It could not be read ({type(err).__name__}).", unexpected=True)
            LOG.error(
                "Unexpected %s while decoding a file (message withheld: it may quote the file)\n%s",
                type(err).__name__,
                "".join(traceback.format_tb(err.__traceback__)),
            )
            return row, None
        decoded = time.perf_counter()
        row.timing_ms["decode"] = _ms(decoded - started)
        if display_side:
            from pneumonia.serving.gradcam import display_image

            row.display = display_image(xray, display_side)
        gate = self.classifier.gate
        refused = gate.check_pixels(stats) if gate is not None else None
        if refused is not None:
            row.screening = Screening.refused(refused)
            return row, None
        square = resize_xray(xray, self.classifier.image_size)
        row.timing_ms["preprocess"] = _ms(time.perf_counter() - decoded)
        return row, square

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
            if row.outcome == SCREENED:
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
