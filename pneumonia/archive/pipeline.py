"""An archive run on Ray Data: what is missing under DIR, read by Ray tasks, screened by actors that
load the model once, one Parquet file per block; then the counts over every source file, the run's
summary (DIR/summary.json) and, on request, `predict --csv`'s file.

Memory: the driver holds the paths and one small stats row per block. Bytes travel in blocks of
`rows_per_block` files; Ray Data's streaming executor backpressures the read tasks, and each actor
takes at most `tasks_in_flight` blocks at a time, so a bounded number of blocks is in flight; each
actor decodes one full-size image at a time (the one screening pipeline) and keeps only rows."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field

from pneumonia.archive import results
from pneumonia.archive.sources import PATH_COLUMN, URI_COLUMN, Inputs, absolute, file_system, find_inputs, read_bytes

SUMMARY_NAME = "summary.json"
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass
class Options:
    sources: list[str]
    out: str
    address: str = ""  # empty: a local Ray on this machine (or the one already started in this process)
    min_actors: int = 1
    max_actors: int = 1
    batch_size: int = 16  # images per model pass
    rows_per_block: int = 64  # files per block: per actor call, per Parquet file; what a resume redoes at most
    cpus_per_actor: float = 1.0
    read_cpus: float = 0.0  # I/O-bound read tasks take no CPU slot from the actors
    tasks_in_flight: int = 2  # blocks queued per actor
    model: str | None = None  # None: each actor's default model (PNEUMONIA_MODEL_PATH or the shipped one)
    runtime: str | None = None


@dataclass
class Summary:
    files: int = 0
    screened: int = 0
    refused: int = 0
    failed: int = 0
    already_done: int = 0  # rows found under DIR before this run
    screened_now: int = 0  # rows this run wrote
    skipped: int = 0  # files under the folders that are not images
    duplicates: int = 0  # paths given more than once
    seconds: float = 0.0
    images_per_second: float = 0.0
    actors: dict = field(default_factory=dict)  # actor -> {blocks, rows, loaded_mb, peak_rss_mb}
    errors: list = field(default_factory=list)  # the first unreadable files: path, error


def connect(address: str) -> bool:
    """ray.init unless Ray is already up in this process; True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, logging_level="WARNING")
    else:  # a local Ray; its workers import this checkout when the package is not installed
        env = {"PYTHONPATH": os.pathsep.join(filter(None, [PACKAGE_ROOT, os.environ.get("PYTHONPATH")]))}
        ray.init(include_dashboard=False, logging_level="WARNING", runtime_env={"env_vars": env})
    return True


def screening_dataset(paths: list[str], options: Options):
    """The lazy Ray Dataset: paths -> bytes -> one stats row per screened and written block."""
    import ray

    from pneumonia.archive.actor import ScreeningActor

    blocks = max(1, math.ceil(len(paths) / options.rows_per_block))
    rows = [{PATH_COLUMN: path, URI_COLUMN: absolute(path)} for path in paths]  # workers have other folders
    items = ray.data.from_items(rows, override_num_blocks=blocks)
    read = items.map_batches(read_bytes, batch_size=options.rows_per_block, num_cpus=options.read_cpus)
    pool = ray.data.ActorPoolStrategy(
        min_size=options.min_actors,
        max_size=options.max_actors,
        max_tasks_in_flight_per_actor=options.tasks_in_flight,
    )
    return read.map_batches(
        ScreeningActor,
        batch_size=options.rows_per_block,
        compute=pool,
        num_cpus=options.cpus_per_actor,
        fn_constructor_kwargs={
            "out_dir": absolute(options.out),
            "model": options.model,
            "runtime": options.runtime,
            "chunk_size": options.batch_size,
            "threads": max(1, math.ceil(options.cpus_per_actor)),
        },
    )


def screen_missing(paths: list[str], options: Options, summary: Summary) -> None:
    """Runs the dataset to its end, gathering the stats rows (the driver's progress: Ray Data's bars)."""
    started = time.perf_counter()
    for stats in screening_dataset(paths, options).iter_rows():
        summary.screened_now += int(stats["rows"])
        actor = summary.actors.setdefault(str(stats["actor"]), {"blocks": 0, "rows": 0})
        actor["blocks"] += 1
        actor["rows"] += int(stats["rows"])
        actor["loaded_mb"] = float(stats["loaded_mb"])  # peak memory once the model was loaded
        actor.setdefault("first_block_peak_mb", float(stats["peak_rss_mb"]))
        actor["peak_rss_mb"] = max(actor.get("peak_rss_mb", 0.0), float(stats["peak_rss_mb"]))
    summary.seconds = round(time.perf_counter() - started, 3)
    summary.images_per_second = round(summary.screened_now / max(summary.seconds, 1e-9), 2)


def run_archive(options: Options, inputs: Inputs | None = None) -> Summary:
    """Screens what of `options.sources` is not yet under `options.out`; the counts cover every source file."""
    inputs = inputs or find_inputs(options.sources)
    summary = Summary(skipped=len(inputs.skipped), duplicates=inputs.duplicates)
    results.remove_temporaries(options.out)
    done = set(results.read_results(options.out, [PATH_COLUMN]).column(PATH_COLUMN).to_pylist())
    missing = [path for path in inputs.paths if path not in done]
    summary.already_done = len(inputs.paths) - len(missing)
    if missing:
        started_ray = connect(options.address)
        try:
            screen_missing(missing, options, summary)
        finally:
            if started_ray:
                import ray

                ray.shutdown()
    counts = results.tally(results.read_results(options.out, results.TALLIED), set(inputs.paths))
    summary.files, summary.screened, summary.refused, summary.failed = (
        counts.files,
        counts.screened,
        counts.refused,
        counts.failed,
    )
    summary.errors = counts.errors
    write_summary(options.out, summary)
    return summary


def write_summary(out_dir: str, summary: Summary) -> str:
    system, folder = file_system(out_dir)
    system.create_dir(folder, recursive=True)
    path = f"{folder}/{SUMMARY_NAME}"
    with system.open_output_stream(path) as stream:
        stream.write(json.dumps(asdict(summary), indent=2).encode())
    return path
