"""Screening many X-rays: the image files under folders (found by their content), chunks of
images through one compiled model pass, one row per file, and the rows as CSV.

    paths ──find_images──> files ──chunks of N──> for each file, one after the other:
        decode_xray ──gate pixel check──> resize_xray (S, S) [+ a display copy for overlays]
        (the full-size image is dropped here, before the next file is decoded)
    ──> the chunk's squares: model_input (N, S, S, 3) ──one compiled pass──> features, logits
    ──> gate feature check, Platt calibration, labels: one ScreenedImage per file

Memory: at most one full-size decoded image at a time, whatever the number of files; a chunk
holds N model squares (and N display copies when Grad-CAM is wanted). A file that cannot be
read, or that the gate refuses, is a row with its error; it never ends the run.

With Grad-CAM each accepted image of the chunk goes through the explain graph instead: one pass
gives the logit, the map and the features, so the probability comes from the same pass as the
map. This is the one screening pipeline: `predict`, the web app's result page (one file), its
results table and batch API (many) all call `BatchScreener.screen_chunk`.
"""

from __future__ import annotations

import csv
import io
import itertools
import logging
import os
import re
import time
import traceback
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np

from pneumonia.dataset import PNEUMONIA
from pneumonia.errors import XrayReadError
from pneumonia.ood import OutOfDistribution, Verdict
from pneumonia.preprocessing import SIGNATURE_BYTES, Source, decode_xray, model_input, resize_xray, sniff_format

LOG = logging.getLogger(__name__)
DEFAULT_CHUNK_SIZE = 16  # images per model pass

# In a folder, a file is screened when its content is an accepted image, or when its name says it
# is one: a corrupt X-ray is then reported as a row with its error instead of being skipped unseen.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".dcm", ".dicom"})

CSV_COLUMNS = (
    "probability",
    "label_default",
    "label_screening",
    "threshold_default",
    "threshold_screening",
    "ood_verdict",
    "ood_reason",
    "ood_score",
    "error",
)
SPREADSHEET_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _is_image_file(path: Path) -> bool:
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return True
    try:
        with path.open("rb") as handle:
            return sniff_format(handle.read(SIGNATURE_BYTES)) is not None
    except OSError:
        return False


@dataclass
class FoundImages:
    files: list[str] = field(default_factory=list)  # in the order given; each folder's files sorted by path
    skipped: list[str] = field(default_factory=list)  # files under a folder that are not images


def find_images(paths: Iterable[str | Path]) -> FoundImages:
    """Files as given (a missing one too: it becomes a row with its error); folders walked
    recursively in name order, hidden entries skipped, a file kept when it is an image by
    content or by name (so a DICOM without an extension or a PNG named .dat is found)."""
    found = FoundImages()
    for given in map(str, paths):
        if not os.path.isdir(given):
            found.files.append(given)
            continue
        for folder, subfolders, names in os.walk(given):
            subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
            for name in sorted(names):
                if not name.startswith("."):
                    path = os.path.join(folder, name)
                    (found.files if _is_image_file(Path(path)) else found.skipped).append(path)
    return found


def chunked(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


@dataclass
class ScreenedImage:
    """One file's row: a probability and labels, or the error that stopped it."""

    name: str
    probability: float | None = None
    labels: dict[str, str] | None = None  # threshold name -> class
    verdict: Verdict | None = None  # the gate's; None without a gate, or when the file was unreadable
    error: str | None = None  # unreadable, or the gate's refusal ("Not screened: ...")
    unexpected: bool = False  # the error is a failure of ours, not of the file
    heat: np.ndarray | None = None  # Grad-CAM of the default label's class, (h, w) in [0, 1]
    display: np.ndarray | None = None  # uint8 (H, W), long side <= display_side, for thumbnails and overlays
    timing_ms: dict[str, float] = field(default_factory=dict)  # decode, preprocess, model (its share of a chunk)

    @property
    def refused(self) -> bool:
        return self.verdict is not None and not self.verdict.accepted


class BatchScreener:
    """A classifier for many images (or one). Safe to call from several threads."""

    def __init__(self, classifier):
        self.classifier = classifier

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
        return rows

    def _decode(self, name: str, source: Source, display_side: int | None) -> tuple[ScreenedImage, np.ndarray | None]:
        """The row and the model's square; the full-size image does not outlive this call."""
        row = ScreenedImage(name)
        started = time.perf_counter()
        try:
            xray, stats = decode_xray(source, self.classifier.image_size)
        except XrayReadError as err:
            row.error = str(err)
            return row, None
        except Exception as err:  # a decoder bug must not end the run; its message could quote the file
            row.error, row.unexpected = f"It could not be read ({type(err).__name__}).", True
            LOG.error(
                "Unexpected %s while decoding a file (message withheld: it may quote the file)\n%s",
                type(err).__name__,
                "".join(traceback.format_tb(err.__traceback__)),
            )
            return row, None
        decoded = time.perf_counter()
        row.timing_ms["decode"] = _ms(decoded - started)
        if display_side:
            from gradcam import display_image

            row.display = display_image(xray, display_side)
        gate = self.classifier.gate
        refused = gate.check_pixels(stats) if gate is not None else None
        if refused is not None:
            _refuse(row, refused)
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
        from gradcam import heatmap

        gate = self.classifier.gate
        for row, pixels in squares:
            started = time.perf_counter()
            logit, cam, features = self.classifier.explain(model_input(pixels, self.classifier.preprocessing)[None])
            if self._score(row, logit, gate.check_features(features) if gate is not None else None):
                row.heat = heatmap(cam, for_pneumonia=row.labels["default"] == PNEUMONIA)
            row.timing_ms["model_gradcam"] = _ms(time.perf_counter() - started)

    def _score(self, row: ScreenedImage, logit: float, verdict: Verdict | None) -> bool:
        """Fills the probability and labels, or the refusal; True when the image was accepted."""
        if verdict is not None and not verdict.accepted:
            _refuse(row, verdict)
            return False
        row.verdict = verdict
        row.probability = float(self.classifier.calibrated(logit))
        row.labels = self.classifier.labels(row.probability)
        return True


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def _refuse(row: ScreenedImage, verdict: Verdict) -> None:
    row.verdict = verdict
    row.error = str(OutOfDistribution(verdict))


# --- CSV --------------------------------------------------------------------------------------


def _text_cell(text: str) -> str:
    """A spreadsheet runs a cell that starts with = + - @ as a formula: such text gets a leading quote."""
    return f"'{text}" if text.startswith(SPREADSHEET_FORMULA_STARTS) else text


def ood_verdict_name(row: ScreenedImage, gated: bool) -> str:
    """ok, unusual, rejected; unchecked when the model has no gate; empty when the file was unreadable."""
    if row.verdict is not None:
        return row.verdict.verdict
    return "unchecked" if not gated and row.error is None else ""


def csv_fields(row: ScreenedImage, thresholds: dict[str, float], gated: bool) -> list[str]:
    """The CSV_COLUMNS of one row (after the file's name)."""
    screened = row.probability is not None
    verdict = row.verdict
    score = "" if verdict is None or verdict.score is None else f"{verdict.score:.3f}"
    return [
        f"{row.probability:.6f}" if screened else "",
        row.labels["default"] if screened else "",
        row.labels["screening"] if screened else "",
        f"{thresholds['default']:.6f}",
        f"{thresholds['screening']:.6f}",
        ood_verdict_name(row, gated),
        (verdict.reason or "") if verdict is not None else "",
        score,
        _text_cell(row.error or ""),
    ]


class CsvRows:
    """CSV with a header and one row per screened file, written as rows come (flushed: an
    interrupted run keeps what it did)."""

    def __init__(
        self,
        stream: IO[str],
        name_column: str,
        thresholds: dict[str, float],
        gated: bool,
        extra_columns: tuple[str, ...] = (),
    ):
        self.stream = stream
        self.writer = csv.writer(stream)
        self.thresholds, self.gated = thresholds, gated
        self.writer.writerow([name_column, *CSV_COLUMNS, *extra_columns])

    def write(self, row: ScreenedImage, *extra: str) -> None:
        self.writer.writerow([_text_cell(row.name), *csv_fields(row, self.thresholds, self.gated), *extra])
        self.stream.flush()


def csv_text(rows: Iterable[ScreenedImage], name_column: str, thresholds: dict[str, float], gated: bool) -> str:
    buffer = io.StringIO()
    table = CsvRows(buffer, name_column, thresholds, gated)
    for row in rows:
        table.write(row)
    return buffer.getvalue()


def overlay_file_name(index: int, name: str) -> str:
    """A unique, ordered PNG name for the overlay of the index-th file (1-based)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).stem)[:80] or "image"
    return f"{index:05d}-{stem}.png"
