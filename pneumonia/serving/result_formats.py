"""A screened image's row as others read it: a CSV row (the `predict --csv` file and the web app's
results table), `predict`'s output line (text or JSON), and its Grad-CAM overlay file."""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import IO

from pneumonia.serving.gate import Verdict
from pneumonia.serving.outcomes import GateVerdict, Outcome
from pneumonia.serving.screening import ScreenedImage, Screening

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
DECIMALS = {"probability": 6, "threshold_default": 6, "threshold_screening": 6, "ood_score": 3}  # in a CSV cell


def text_cell(value, column: str | None = None) -> str:
    """A value as a CSV cell: empty for None, a number at its column's DECIMALS, and text that a
    spreadsheet would run as a formula (starting with = + - @) with a leading quote."""
    if value is None:
        return ""
    if column in DECIMALS:
        return f"{value:.{DECIMALS[column]}f}"
    text = str(value)
    return f"'{text}" if text.startswith(SPREADSHEET_FORMULA_STARTS) else text


def ood_verdict_name(row: ScreenedImage, gated: bool) -> str:
    """ok, unusual, rejected; unchecked when the model has no gate; empty when the file was unreadable."""
    if row.verdict is not None:
        return row.verdict.verdict
    return "unchecked" if not gated and row.error is None else ""


def stored_outcome(probability: float | None, ood_verdict: str | None) -> str:
    """A row's outcome read back from its values: a probability when screened, the gate's verdict
    without one when refused, neither when it failed."""
    return (
        Outcome.SCREENED
        if probability is not None
        else Outcome.REFUSED
        if ood_verdict == GateVerdict.REJECTED
        else Outcome.FAILED
    )


def result_values(row: ScreenedImage, thresholds: dict[str, float], gated: bool) -> dict:
    """One row's CSV_COLUMNS as values: numbers as numbers at full precision, None where there is none.
    What the CSV (`text_cell`), the archive's Parquet and the DICOM SR are written from."""
    screened = row.probability is not None  # a PACS row screened but not stored keeps its values
    verdict = row.verdict
    return {
        "probability": row.probability,
        "label_default": row.labels["default"] if screened else None,
        "label_screening": row.labels["screening"] if screened else None,
        "threshold_default": float(thresholds["default"]),
        "threshold_screening": float(thresholds["screening"]),
        "ood_verdict": ood_verdict_name(row, gated) or None,
        "ood_reason": verdict.reason if verdict is not None else None,
        "ood_score": None if verdict is None or verdict.score is None else float(verdict.score),
        "error": row.error,
    }


def csv_fields(row: ScreenedImage, thresholds: dict[str, float], gated: bool) -> list[str]:
    """The CSV_COLUMNS of one row (after the file's name)."""
    values = result_values(row, thresholds, gated)
    return [text_cell(values[column], column) for column in CSV_COLUMNS]


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
        self.writer.writerow([text_cell(row.name), *csv_fields(row, self.thresholds, self.gated), *extra])
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


def write_overlay(folder: str, index: int, row) -> str | None:
    """DIR/NNNNN-<name>.png: Grad-CAM of the default label's class over the X-ray; None when not screened."""
    import cv2

    from pneumonia.serving.gradcam import overlay

    if row.heat is None:
        return None
    path = Path(folder) / overlay_file_name(index, row.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), overlay(row.display, row.heat)):
        raise OSError(f"could not write {path}")
    return str(path)


def screening_json(screening: Screening, classifier) -> dict:
    """One screening as JSON values, the one shape of a result: what the API answers for an upload or a
    batch's file (which add their own fields) and what `predict --json` prints after the file's path. The
    probability (null unless screened), its shown text, the labels and thresholds when screened; the gate's
    `ood` when screened or refused; the error when it was not screened."""
    answer: dict = {"probability": screening.probability}
    if screening.outcome == Outcome.SCREENED:
        answer.update(
            probability_text=classifier.card.shown_probability(screening.probability),
            label=screening.labels["default"],
            screening_label=screening.labels["screening"],
            thresholds=classifier.thresholds,
        )
    if screening.outcome in (Outcome.SCREENED, Outcome.REFUSED):
        answer["ood"] = ood_json(screening.verdict, classifier)
    if screening.error:
        answer["error"] = screening.error
    return answer


def ood_json(verdict: Verdict | None, classifier) -> dict:
    """The `ood` object of a result: the verdict with the gate's thresholds, or why the gate is off."""
    gate = classifier.gate
    if gate is None:
        return {"verdict": "unchecked", "gate": "off", "detail": classifier.gate_status}
    if not verdict.accepted:
        return {
            "verdict": verdict.verdict,
            "reason": verdict.reason,
            "score": verdict.score,
            "threshold": verdict.threshold,
        }
    answer = {"verdict": verdict.verdict, "score": verdict.score, "thresholds": gate.thresholds}
    if verdict.message:
        answer["warning"] = verdict.message
    return answer


def prediction_line(row, classifier, as_json: bool) -> str:
    """One output line: the probability and labels, or why the file was not screened."""
    if as_json:
        return json.dumps({"path": row.name, **screening_json(row.screening, classifier)})
    image, verdict = row.name, row.verdict
    if row.outcome == Outcome.FAILED:
        return f"{image}\terror: {row.error}"
    if row.outcome == Outcome.REFUSED:
        return f"{image}\tnot screened ({verdict.reason}): {verdict.message}"
    probability, labels = row.probability, row.labels
    warning = "\tunusual for this model" if verdict is not None and verdict.verdict == GateVerdict.UNUSUAL else ""
    return (
        f"{image}\t{probability:.4f}\tdefault({classifier.thresholds['default']:.3f}): {labels['default']}"
        f"\tscreening({classifier.thresholds['screening']:.3f}): {labels['screening']}{warning}"
    )
