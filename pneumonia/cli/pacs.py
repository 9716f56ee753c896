"""`pacs screen URL` and `pacs watch URL`: chest X-rays from a PACS over DICOMweb through the one
screening pipeline, their results stored back in the PACS (an SR and a Grad-CAM Secondary Capture per
image). Exit status 0 when every image was screened, skipped or refused by the gate; 1 when some
image failed (unreadable, not fetched, not stored); 2 for a usage error, an unreachable PACS or
refused credentials."""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import re
import sys
from datetime import datetime

from pneumonia.cli import fail, load_classifier, positive_int
from pneumonia.cli.options import add_model_option, add_runtime_option

PASSWORD_ENV, TOKEN_ENV = "PNEUMONIA_PACS_PASSWORD", "PNEUMONIA_PACS_TOKEN"
CSV_HEAD = ("study_instance_uid", "series_instance_uid", "sop_instance_uid", "status")
CSV_TAIL = ("sr_sop_instance_uid", "gradcam_sop_instance_uid")


def dicom_date(text: str) -> str:
    """YYYY-MM-DD or YYYYMMDD -> YYYYMMDD (a DICOM DA)."""
    digits = text.replace("-", "")
    try:
        datetime.strptime(digits, "%Y%m%d")
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {text}") from None
    return digits


def local_time(text: str) -> datetime:
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date and time (YYYY-MM-DDTHH:MM): {text}") from None


def word_list(text: str) -> tuple[str, ...]:
    return tuple(word for word in re.split(r"[,\s]+", text.strip()) if word)


def connection_of(args):
    from pneumonia.pacs.dicomweb import Connection

    verify = args.ca_bundle or not args.insecure
    password = args.password if args.password is not None else os.environ.get(PASSWORD_ENV)
    token = args.token or os.environ.get(TOKEN_ENV)
    return Connection(args.url, args.user, password, token, verify, args.timeout, args.retries, args.backoff)


def filters_of(args):
    from pneumonia.pacs.runs import Filters

    studies = tuple(uid for given in args.study or () for uid in word_list(given))
    return Filters(studies, args.since, args.modality, args.body_part or (), args.view or ())


class Report:
    """A line per image on stdout and, with --csv, a CSV row: UIDs, status, probability, labels,
    thresholds, the gate's verdict, the error, the stored objects' UIDs; never a name."""

    def __init__(self, classifier, stream):
        from pneumonia.serving.result_formats import CSV_COLUMNS

        self.classifier, self.stream = classifier, stream
        self.writer = csv.writer(stream) if stream else None
        if self.writer:
            self.writer.writerow([*CSV_HEAD, *CSV_COLUMNS, *CSV_TAIL])

    def write(self, row) -> None:
        from pneumonia.pacs.runs import SKIPPED
        from pneumonia.serving.outcomes import Outcome
        from pneumonia.serving.result_formats import csv_fields, prediction_line

        if row.status == SKIPPED:
            print(f"{row.candidate.instance}\tskipped: this model's result is already in the PACS", flush=True)
        elif row.status == Outcome.FAILED:
            print(f"{row.candidate.instance}\terror: {row.screened.error}", flush=True)
        else:
            stored = f"\tstored SR {row.stored[0]}" if row.status == Outcome.SCREENED else ""
            print(prediction_line(row.screened, self.classifier, False) + stored, flush=True)
        if self.writer:
            c = row.candidate
            fields = csv_fields(row.screened, self.classifier.thresholds, self.classifier.gate is not None)
            self.writer.writerow([c.study, c.series, c.instance, row.status, *fields, *row.stored])
            self.stream.flush()


def screen_once(screener, filters, report) -> int:
    """One run: 0, 1 when an image failed; PacsUnreachable / PacsAuthError go to the caller."""
    from pneumonia.pacs.runs import RunTally

    tally = RunTally()
    for row in screener.run(filters):
        tally.count(row.status)
        report.write(row)
    print(tally.summary(), file=sys.stderr, flush=True)
    return 1 if tally.failed else 0


def run(args) -> int:

    try:
        from pneumonia.pacs.dicomweb import DicomWeb, PacsError
        from pneumonia.pacs.runs import PacsScreener
    except ImportError as err:
        return fail(f"pacs needs {err.name}: pip install -r requirements-pacs.txt (or .[pacs])")

    if args.pacs_command == "watch" and args.max_runs is None and args.until is None:
        return fail("watch needs a bound: --max-runs N or --until TIME")
    try:
        pacs = DicomWeb(connection_of(args))
    except PacsError as err:
        return fail(err)
    classifier = load_classifier(args.model, args.runtime)
    try:
        csv_file = open(args.csv, "w", newline="", encoding="utf-8") if args.csv else None
    except OSError as err:
        pacs.close()
        return fail(f"cannot write {args.csv}: {err.strerror}")
    screener = PacsScreener(pacs, classifier, force=args.force)
    with csv_file or contextlib.nullcontext(), contextlib.closing(pacs):
        report = Report(classifier, csv_file)
        try:
            if args.pacs_command == "screen":
                return screen_once(screener, filters_of(args), report)
            return watch_runs(screener, filters_of(args), report, args)
        except PacsError as err:
            return fail(err)


def watch_runs(screener, filters, report, args) -> int:
    """`watch`: a run every --interval seconds; an unreachable PACS is reported and tried again at the
    next poll (the status is then 2), refused credentials end the watch."""
    from pneumonia.pacs.dicomweb import PacsUnreachable
    from pneumonia.pacs.runs import watch

    def run_once() -> int:
        try:
            return screen_once(screener, filters, report)
        except PacsUnreachable as err:
            print(f"error: {err}; trying again in {args.interval:g} s", file=sys.stderr, flush=True)
            return 2

    return watch(run_once, args.interval, args.max_runs, args.until)


def _common(parser, shipped: str) -> None:
    parser.add_argument("url", metavar="URL", help="the PACS's DICOMweb root, e.g. https://pacs.example.org/dicom-web")
    parser.add_argument(
        "--study", action="append", metavar="UID", help="only these studies (repeat, or comma-separate)"
    )
    parser.add_argument("--since", type=dicom_date, metavar="DATE", help="only studies on or after DATE (YYYY-MM-DD)")
    parser.add_argument(
        "--modality", type=word_list, default=("CR", "DX"), help="modalities to screen (default: CR,DX)"
    )
    parser.add_argument(
        "--body-part", type=word_list, help="Body Part Examined values, e.g. CHEST (where the PACS has it)"
    )
    parser.add_argument("--view", type=word_list, help="View Position values, e.g. PA,AP (where the PACS has it)")
    parser.add_argument("--force", action="store_true", help="screen and store again images this model already did")
    parser.add_argument(
        "--csv", metavar="FILE", help="also write the run's rows: UIDs, probability, labels, verdict, error"
    )
    auth = parser.add_argument_group("connection")
    auth.add_argument("--user", help="HTTP basic authentication user")
    auth.add_argument("--password", help=f"its password (default: ${PASSWORD_ENV}, which keeps it out of `ps`)")
    auth.add_argument("--token", help=f"a bearer token instead (default: ${TOKEN_ENV})")
    auth.add_argument("--insecure", action="store_true", help="do not verify the PACS's TLS certificate")
    auth.add_argument("--ca-bundle", metavar="FILE", help="verify TLS against these CA certificates")
    auth.add_argument("--timeout", type=float, default=30.0, help="seconds per request (default %(default)s)")
    auth.add_argument("--retries", type=int, default=3, help="retries of a failed request (default %(default)s)")
    auth.add_argument("--backoff", type=float, default=1.0, help="first wait between retries, doubled each time")
    add_model_option(parser, shipped)
    add_runtime_option(parser)
    parser.set_defaults(run=run)


def add(commands, shipped: str) -> None:
    pacs = commands.add_parser("pacs", help="screen X-rays in a PACS over DICOMweb and store the results back")
    actions = pacs.add_subparsers(dest="pacs_command", required=True)
    screen = actions.add_parser("screen", help="one run: find, screen and store what is not done yet")
    _common(screen, shipped)
    watch = actions.add_parser("watch", help="a run every --interval seconds, up to --max-runs or --until")
    _common(watch, shipped)
    watch.add_argument("--interval", type=float, default=60.0, help="seconds between runs (default %(default)s)")
    watch.add_argument("--max-runs", type=positive_int, help="stop after this many runs")
    watch.add_argument("--until", type=local_time, metavar="TIME", help="stop at this local time (YYYY-MM-DDTHH:MM)")
