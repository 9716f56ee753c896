"""`predict`: image files and folders through the one screening pipeline: a line per file, and a CSV
and Grad-CAM overlays on request. Exit status 1 when a file could not be read."""

from __future__ import annotations

import contextlib
import sys
from typing import TYPE_CHECKING

from pneumonia.cli import fail, load_classifier, positive_int
from pneumonia.cli.options import add_model_option, add_runtime_option

if TYPE_CHECKING:
    from pneumonia.serving.screening import Tally

GRADCAM_MAX_SIDE = 1024  # overlays written by `predict --gradcam`, as on the result page


def run(args) -> int:
    from tqdm import tqdm

    from pneumonia.reading.image_files import find_images
    from pneumonia.serving.result_formats import CsvRows
    from pneumonia.serving.screening import BatchScreener

    classifier = load_classifier(args.model, args.runtime)
    found = find_images(args.paths)
    if found.skipped:
        print(
            f"note: skipped {len(found.skipped)} file(s) that are not images by content or name, e.g. "
            f"{found.skipped[0]}",
            file=sys.stderr,
        )
    if not found.files:
        return fail("no image files in " + ", ".join(args.paths))
    try:
        csv_file = open(args.csv, "w", newline="", encoding="utf-8") if args.csv else None
    except OSError as err:
        return fail(f"cannot write {args.csv}: {err.strerror}")
    # drawn on stderr, only when it is a terminal (disable=None)
    progress = tqdm(total=len(found.files), unit="image", file=sys.stderr, disable=None)
    with csv_file or contextlib.nullcontext(), progress:
        extra = ("gradcam",) if args.gradcam else ()
        gated = classifier.gate is not None
        table = CsvRows(csv_file, "path", classifier.thresholds, gated, extra) if csv_file else None
        tally = screen_files(BatchScreener(classifier), found.files, args, table, progress)
    print(tally.summary() + (f"; wrote {args.csv}" if args.csv else ""), file=sys.stderr)
    return 1 if tally.failed else 0


def screen_files(batch, files: list[str], options, table, progress, out=None) -> Tally:
    """Screens `files` a chunk at a time: a line each on `out` (stdout), a CSV row, an overlay PNG.
    `options`: batch_size, gradcam (a folder or None), json; `progress`: a tqdm bar."""
    from pneumonia.serving.result_formats import prediction_line, write_overlay
    from pneumonia.serving.screening import Tally

    tally = Tally()
    rows = batch.screen(
        ((path, path) for path in files),
        options.batch_size,
        display_side=GRADCAM_MAX_SIDE if options.gradcam else None,
        with_gradcam=bool(options.gradcam),
    )
    for index, row in enumerate(rows, start=1):
        overlay_path = write_overlay(options.gradcam, index, row) if options.gradcam else None
        if table is not None:
            table.write(row, *([overlay_path or ""] if options.gradcam else []))
        with progress.external_write_mode(file=out):  # the bar cleared for the line, then redrawn
            print(prediction_line(row, batch.classifier, options.json), file=out, flush=True)
        progress.update()
        tally.count(row.outcome)
    return tally


def add(commands, shipped: str) -> None:
    from pneumonia.serving.screening import DEFAULT_CHUNK_SIZE

    predict = commands.add_parser("predict", help="probability of pneumonia for image files and folders")
    predict.add_argument(
        "paths",
        nargs="+",
        metavar="PATH",
        help="image files (JPEG, PNG, BMP, TIFF, DICOM) and folders, searched recursively for "
        "files that are images by content or by name",
    )
    add_model_option(predict, shipped)
    predict.add_argument("--json", action="store_true", help="one JSON object per line")
    add_runtime_option(predict)
    predict.add_argument(
        "--csv",
        metavar="FILE",
        help="also write one CSV row per file: path, probability, label at each threshold, the gate's verdict, error",
    )
    predict.add_argument("--gradcam", metavar="DIR", help="write each screened file's Grad-CAM overlay to DIR as a PNG")
    predict.add_argument(
        "--batch-size",
        type=positive_int,
        default=DEFAULT_CHUNK_SIZE,
        help="images per model pass (default %(default)s); at most one full-size image is decoded at a time",
    )
    predict.set_defaults(run=run)
