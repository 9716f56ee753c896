"""`monitor RESULTS`: the web app's drift monitor (pneumonia/serving/drift.py) on the results of a run: the CSV of
`predict --csv` or `pacs screen --csv`, or the Parquet of `archive` (a file or its folder)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from pneumonia.cli import CommandFailed, fail
from pneumonia.cli.options import add_model_option

COLUMNS = ("probability", "ood_score", "threshold_default", "threshold_screening")


def _number(cell) -> float | None:
    if cell is None or cell == "":
        return None
    value = float(cell)
    return None if math.isnan(value) else value


def read_results(path: Path) -> dict[str, list[float | None]]:
    """COLUMNS of every row of a results file, in its order (None where a cell is empty)."""
    if path.is_dir() or path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise CommandFailed(fail("reading Parquet needs pyarrow: pip install .[archive]")) from None
        table = pq.read_table(path, columns=list(COLUMNS))
        return {name: [_number(v) for v in table.column(name).to_pylist()] for name in COLUMNS}
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [name for name in COLUMNS if name not in (reader.fieldnames or ())]
        if missing:
            raise CommandFailed(fail(f"{path} has no column {missing[0]}: is it the CSV of predict, pacs or archive?"))
        rows = list(reader)
    return {name: [_number(row[name]) for row in rows] for name in COLUMNS}


def _check_thresholds(columns: dict, thresholds: dict[str, float]) -> None:
    """Results labelled at other thresholds came from another model or calibration: its card is the reference."""
    for name in ("default", "screening"):
        found = {round(v, 5) for v in columns[f"threshold_{name}"] if v is not None}
        if found and found != {round(thresholds[name], 5)}:
            raise CommandFailed(
                fail(
                    f"the results were labelled at a {name} threshold of {', '.join(map(str, sorted(found)))}, the "
                    f"model's is {thresholds[name]:.5f}: pass the model that made them with --model"
                )
            )


def format_report(report: dict) -> str:
    lines = [("ALARM: " if report["alarm"] else "") + report["advice"], ""]
    if report["signals"]:
        lines += ["| signal | share | expected | reference | alarm |", "|---|---|---|---|---|"]
        for s in report["signals"]:
            share = "-" if s["value"] is None else f"{100 * s['value']:.1f} % ({s['count']} of {s['of']})"
            expected = "-" if s["expected"] is None else " - ".join(f"{100 * x:.1f} %" for x in s["expected"])
            alarm = "yes" if s["alarm"] else "no"
            lines.append(f"| {s['name']} | {share} | {expected} | {100 * s['reference']:.1f} % | {alarm} |")
    lines.append(
        f"\n{report['images']} image(s); at most {100 * report['false_alarm_rate']:g} % of runs without drift alarm"
    )
    return "\n".join(lines)


def run(args) -> int:
    from pneumonia.errors import ModelLoadError
    from pneumonia.serving.classifier import find_card
    from pneumonia.serving.drift import assess_values

    path = Path(args.results)
    if not path.exists():
        return fail(f"no results file or folder {path}")
    try:
        _, card = find_card(args.model)
    except ModelLoadError as err:
        return fail(err)
    columns = read_results(path)
    _check_thresholds(columns, card.thresholds.as_dict())
    last = slice(-args.last, None) if args.last else slice(None)
    nan = float("nan")
    probabilities = [nan if v is None else v for v in columns["probability"][last]]
    scores = [nan if v is None else v for v in columns["ood_score"][last]]
    screened_or_scored = [(p, s) for p, s in zip(probabilities, scores) if not (math.isnan(p) and math.isnan(s))]
    probabilities = [p for p, _ in screened_or_scored]
    scores = [s for _, s in screened_or_scored]
    report = assess_values(card.monitor, probabilities, scores, args.min_images)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def add(commands, shipped: str) -> None:
    from pneumonia.cli import positive_int
    from pneumonia.serving.drift import MIN_IMAGES

    monitor = commands.add_parser(
        "monitor",
        help="the drift monitor on a run's results: do its X-rays look like those the thresholds were chosen on?",
        description="The drift monitor on a run's results, against the reference in the card of --model: the model "
        "that made them.",
    )
    monitor.add_argument("results", help="the CSV of predict --csv or pacs screen --csv, or archive's Parquet (folder)")
    add_model_option(monitor, shipped)
    monitor.add_argument("--last", type=positive_int, help="only the last N rows (default: all)")
    monitor.add_argument(
        "--min-images", type=positive_int, default=MIN_IMAGES, help=f"no alarm below (default {MIN_IMAGES})"
    )
    monitor.add_argument("--json", action="store_true", help="the answer of GET /api/monitor, as JSON")
    monitor.set_defaults(run=run)
