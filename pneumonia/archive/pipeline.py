"""An archive run on Ray Data: what is missing under DIR, read by Ray tasks, screened by actors that
load the model once, one Parquet file per block (written by the driver); then the counts over every
source file, the run's summary (DIR/summary.json) and, on request, `predict --csv`'s file. The same
run on a local Ray or on a cluster: what the driver is given (relative paths, the model) it resolves
itself, and what only the driver may see (local files, DIR) stays on its node.

Memory: the driver holds the paths and the stats; each block's rows reach it as one small Parquet
file (a few hundred bytes a row), written as it comes. Image bytes travel in blocks of
`rows_per_block` files; Ray Data's streaming executor backpressures the read tasks, and each actor
takes at most `tasks_in_flight` blocks at a time, so a bounded number of blocks is in flight; each
actor decodes one full-size image at a time (the one screening pipeline) and keeps only rows."""

from __future__ import annotations

import json
import math
import os
import socket
import time
from dataclasses import asdict, dataclass, field, replace

from pneumonia.archive import result_files
from pneumonia.archive.sources import (
    PATH_COLUMN,
    URI_COLUMN,
    Inputs,
    absolute,
    file_system,
    find_inputs,
    has_scheme,
    read_bytes,
)

SUMMARY_NAME = "summary.json"
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONNECT_TIMEOUT_S = 10  # ray.init waits for an unreachable address for ever


class ArchiveError(RuntimeError):
    """A run that cannot start or that stopped (what DIR holds so far is kept); the message says why."""


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
    model: str | None = None  # None: the driver's PNEUMONIA_MODEL_PATH, else each actor's shipped model
    runtime: str | None = None


@dataclass
class Summary(result_files.ArchiveTally):  # the counts over every source file, and what this run did
    already_done: int = 0  # rows found under DIR before this run
    screened_now: int = 0  # rows this run wrote
    skipped: int = 0  # files under the folders that are not images
    duplicates: int = 0  # paths given more than once
    seconds: float = 0.0
    images_per_second: float = 0.0
    actors: dict = field(default_factory=dict)  # actor -> {node, blocks, rows, loaded_mb, peak_rss_mb}


def check_reachable(address: str) -> None:
    """ArchiveError unless a HOST:PORT address answers (`auto` and `ray://` are Ray's to find)."""
    host, _, port = address.rpartition(":")
    if "://" in address or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as err:
        raise ArchiveError(f"cannot reach the Ray cluster at {address}: {err.strerror or err}") from None


def connect(address: str) -> bool:
    """ray.init unless Ray is already up in this process; True when this call started it. An address
    (or RAY_ADDRESS, as `ray job submit` sets it) joins that cluster, whose workers import their own
    installed package; none starts a local Ray whose workers import this very package."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS", "")
    if address:
        check_reachable(address)
        try:
            ray.init(address=address, logging_level="WARNING")
        except ConnectionError as err:  # `auto` with no cluster to find
            raise ArchiveError(f"cannot connect to the Ray cluster at {address}: {err}") from None
    else:
        env = {"PYTHONPATH": os.pathsep.join(filter(None, [PACKAGE_ROOT, os.environ.get("PYTHONPATH")]))}
        ray.init(include_dashboard=False, logging_level="WARNING", runtime_env={"env_vars": env})
    return True


def model_path(model: str | None) -> str | None:
    """The model the actors load, resolved on the driver (a cluster's workers have other working folders
    and environments); None: each actor's shipped model."""
    from pneumonia.serving.classifier import MODEL_PATH_ENV

    model = model or os.environ.get(MODEL_PATH_ENV)
    return absolute(model) if model else None


def read_placement(paths: list[str]) -> dict:
    """Local files are read on the driver's node (the other nodes may not see its disk); URIs anywhere."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if all(map(has_scheme, paths)):
        return {}
    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)}


def screening_dataset(paths: list[str], options: Options):
    """The lazy Ray Dataset: paths -> bytes -> one row per screened block: its Parquet file and stats."""
    import ray

    from pneumonia.archive.actor import ScreeningActor

    blocks = max(1, math.ceil(len(paths) / options.rows_per_block))
    rows = [{PATH_COLUMN: path, URI_COLUMN: absolute(path)} for path in paths]  # workers have other folders
    items = ray.data.from_items(rows, override_num_blocks=blocks)
    read = items.map_batches(
        read_bytes, batch_size=options.rows_per_block, num_cpus=options.read_cpus, **read_placement(paths)
    )
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
            "model": model_path(options.model),
            "runtime": options.runtime,
            "chunk_size": options.batch_size,
            "threads": max(1, math.ceil(options.cpus_per_actor)),
        },
    )


def write_block(out_dir: str, stats: dict) -> None:
    try:
        result_files.write_part(out_dir, str(stats["part"]), stats["content"])
    except OSError as err:  # an unreachable endpoint, a full disk, no permission
        raise ArchiveError(f"cannot write under {out_dir}: {err}") from None


def screen_missing(paths: list[str], options: Options, summary: Summary) -> None:
    """Runs the dataset to its end, writing each block's Parquet file under DIR as it comes and
    gathering the stats (the driver's progress: Ray Data's bars)."""
    started = time.perf_counter()
    for stats in screening_dataset(paths, options).iter_rows():
        write_block(options.out, stats)
        summary.screened_now += int(stats["rows"])
        actor = summary.actors.setdefault(str(stats["actor"]), {"node": str(stats["node"]), "blocks": 0, "rows": 0})
        actor["blocks"] += 1
        actor["rows"] += int(stats["rows"])
        actor["loaded_mb"] = float(stats["loaded_mb"])  # peak memory once the model was loaded
        actor.setdefault("first_block_peak_mb", float(stats["peak_rss_mb"]))
        actor["peak_rss_mb"] = max(actor.get("peak_rss_mb", 0.0), float(stats["peak_rss_mb"]))
    summary.seconds = round(time.perf_counter() - started, 3)
    summary.images_per_second = round(summary.screened_now / max(summary.seconds, 1e-9), 2)


def run_on_ray(paths: list[str], options: Options, summary: Summary) -> None:
    """screen_missing on the Ray of `options.address`; a run that Ray stops is an ArchiveError (the
    blocks written so far stay: the same command resumes)."""
    import ray

    started_ray = connect(options.address)
    try:
        screen_missing(paths, options, summary)
    except ray.exceptions.RayError as err:  # an actor that cannot load the model, a node lost, ...
        cause = (str(err).strip().splitlines() or [type(err).__name__])[-1]  # a traceback's end names the cause
        raise ArchiveError(f"the run stopped: {cause}") from None
    finally:
        if started_ray:
            ray.shutdown()


def done_paths(out_dir: str) -> set[str]:
    """The paths already screened under DIR, once its half-written files are removed."""
    try:
        result_files.remove_temporaries(out_dir)
        return set(result_files.read_results(out_dir, [PATH_COLUMN]).column(PATH_COLUMN).to_pylist())
    except OSError as err:  # an unreachable endpoint, a bucket that is not there, no permission
        raise ArchiveError(f"cannot read {out_dir}: {err}") from None


def run_archive(options: Options, inputs: Inputs | None = None) -> Summary:
    """Screens what of `options.sources` is not yet under `options.out`; the counts cover every source file."""
    inputs = inputs or find_inputs(options.sources)
    summary = Summary(skipped=len(inputs.skipped), duplicates=inputs.duplicates)
    done = done_paths(options.out)
    missing = [path for path in inputs.paths if path not in done]
    summary.already_done = len(inputs.paths) - len(missing)
    if missing:
        run_on_ray(missing, options, summary)
    counts = result_files.tally(result_files.read_results(options.out, result_files.TALLIED), set(inputs.paths))
    summary = replace(summary, **vars(counts))
    write_summary(options.out, summary)
    return summary


def write_summary(out_dir: str, summary: Summary) -> str:
    system, folder = file_system(out_dir)
    system.create_dir(folder, recursive=True)
    path = f"{folder}/{SUMMARY_NAME}"
    with system.open_output_stream(path) as stream:
        stream.write(json.dumps(asdict(summary), indent=2).encode())
    return path
