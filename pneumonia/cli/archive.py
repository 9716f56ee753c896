"""`archive`: an archive too large for one machine through the one screening pipeline on Ray Data:
`predict --csv`'s rows as Parquet files under DIR, resumable (a new run over the same DIR screens only
what is missing), with the run's summary in DIR/summary.json. Exit status 1 when a file could not be
read, 2 for a usage error, a run that cannot start or that stopped (DIR keeps its rows: the same
command resumes), or Ray missing (`pip install .[archive]`)."""

from __future__ import annotations

import argparse
import contextlib
import sys

from pneumonia.cli import fail, positive_int
from pneumonia.cli.options import add_model_option, add_runtime_option


def actor_range(text: str) -> tuple[int, int]:
    """`N` (a fixed pool) or `MIN:MAX` (an autoscaling one)."""
    low, _, high = text.partition(":")
    try:
        low_n, high_n = int(low), int(high or low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not N or MIN:MAX: {text}") from None
    if not 1 <= low_n <= high_n:
        raise argparse.ArgumentTypeError(f"need 1 <= MIN <= MAX, not {text}")
    return low_n, high_n


def report(summary, args) -> None:
    actors = summary.actors.values()
    if summary.already_done:
        print(f"note: {summary.already_done} file(s) were already screened under {args.out}", file=sys.stderr)
    if summary.screened_now:
        peak = max(a["peak_rss_mb"] for a in actors)
        print(
            f"note: screened {summary.screened_now} file(s) in {summary.seconds:.1f} s "
            f"({summary.images_per_second:.1f} images/s) with {len(summary.actors)} actor(s), "
            f"peak memory per actor {peak:.0f} MB",
            file=sys.stderr,
        )
    wrote = args.out + (f" and {args.csv}" if args.csv else "")
    print(f"{summary.summary()}; wrote {wrote}", file=sys.stderr)


def run(args) -> int:
    try:
        import ray  # noqa: F401
    except ImportError:
        return fail("archive needs Ray: pip install -r requirements-archive.txt (or: pip install .[archive])")
    from pneumonia.archive.pipeline import ArchiveError, Options, run_archive
    from pneumonia.archive.result_files import write_csv
    from pneumonia.archive.sources import find_inputs
    from pneumonia.errors import XrayReadError

    try:
        inputs = find_inputs(args.sources)
    except XrayReadError as err:
        return fail(err)
    if inputs.skipped:
        print(
            f"note: skipped {len(inputs.skipped)} file(s) that are not images, e.g. {inputs.skipped[0]}",
            file=sys.stderr,
        )
    if not inputs.paths:
        return fail("no image files in " + ", ".join(args.sources))
    options = Options(
        sources=args.sources,
        out=args.out,
        address=args.address,
        min_actors=args.actors[0],
        max_actors=args.actors[1],
        batch_size=args.batch_size,
        rows_per_block=args.rows_per_file,
        cpus_per_actor=args.cpus_per_actor,
        model=args.model,
        runtime=args.runtime,
    )
    try:
        csv_file = open(args.csv, "w", newline="", encoding="utf-8") if args.csv else None
    except OSError as err:
        return fail(f"cannot write {args.csv}: {err.strerror}")
    with csv_file or contextlib.nullcontext():
        try:
            summary = run_archive(options, inputs)
        except ArchiveError as err:
            return fail(err)
        if csv_file:
            write_csv(args.out, csv_file, set(inputs.paths))
    report(summary, args)
    return 1 if summary.failed else 0


def add(commands, shipped: str) -> None:
    from pneumonia.serving.screening import DEFAULT_CHUNK_SIZE

    archive = commands.add_parser(
        "archive",
        help="screen an archive on Ray Data: Parquet rows, resumable",
        description="Screen an archive on Ray Data. --model (relative to here) must be at that path on every node.",
    )
    archive.add_argument(
        "sources",
        nargs="+",
        metavar="SOURCE",
        help="folders (searched as `predict` does), image files, or manifests: .csv or .parquet files with a "
        "`path` column, local or on object storage (any URI pyarrow's file systems read)",
    )
    archive.add_argument("--out", required=True, metavar="DIR", help="where the Parquet files and summary.json go")
    archive.add_argument(
        "--address",
        default="",
        help="the Ray cluster: HOST:PORT or auto (default: RAY_ADDRESS when set, else a local Ray on this machine)",
    )
    archive.add_argument(
        "--actors", type=actor_range, default=(1, 1), metavar="N|MIN:MAX", help="model actors (default 1)"
    )
    archive.add_argument(
        "--batch-size", type=positive_int, default=DEFAULT_CHUNK_SIZE, help="images per model pass (default 16)"
    )
    archive.add_argument(
        "--rows-per-file",
        type=positive_int,
        default=64,
        help="files per block: per actor call and per Parquet file, the most a resume redoes (default 64)",
    )
    archive.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs (and ONNX threads) per actor")
    archive.add_argument("--csv", metavar="FILE", help="also write `predict --csv`'s file from the Parquet rows")
    # No default here: the driver resolves the model once for the whole cluster (pipeline.model_path).
    add_model_option(archive)
    add_runtime_option(archive)
    archive.set_defaults(run=run)
