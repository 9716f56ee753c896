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

from pneumonia.serving.screening import FAILED, REFUSED, SCREENED, ScreenedImage

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
    return SCREENED if probability is not None else REFUSED if ood_verdict == "rejected" else FAILED


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


def prediction_line(row, classifier, as_json: bool) -> str:
    """One output line: the probability and labels, or why the file was not screened."""
    image, verdict = row.name, row.verdict
    ood = None if verdict is None else {k: v for k, v in vars(verdict).items() if v is not None}
    if row.outcome == FAILED:
        return json.dumps({"path": image, "error": row.error}) if as_json else f"{image}\terror: {row.error}"
    if row.outcome == REFUSED:
        if as_json:
            return json.dumps({"path": image, "probability": None, "ood": ood, "error": verdict.message})
        return f"{image}\tnot screened ({verdict.reason}): {verdict.message}"
    probability, labels = row.probability, row.labels
    if as_json:
        return json.dumps(
            {
                "path": image,
                "probability": round(probability, 6),
                "label": labels["default"],
                "screening_label": labels["screening"],
                "thresholds": classifier.thresholds,
                "ood": ood,
            }
        )
    warning = "\tunusual for this model" if verdict is not None and verdict.verdict == "unusual" else ""
    return (
        f"{image}\t{probability:.4f}\tdefault({classifier.thresholds['default']:.3f}): {labels['default']}"
        f"\tscreening({classifier.thresholds['screening']:.3f}): {labels['screening']}{warning}"
    )
