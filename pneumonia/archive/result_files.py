"""The archive's results under DIR (a local folder or a URI): one Parquet file per screened block with
`predict --csv`'s columns (`path` and CSV_COLUMNS; numbers as numbers, at full precision, and null
where the CSV has an empty cell), encoded by the actor and written by the driver to a hidden temporary
name, then moved into place, so a stopped run leaves whole files or none. The done-set of a new run is
the paths in those files."""

from __future__ import annotations

import csv
import hashlib
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import IO

from pneumonia.archive.sources import PATH_COLUMN, file_system
from pneumonia.serving.outcomes import Outcome
from pneumonia.serving.result_formats import CSV_COLUMNS, DECIMALS, result_values, stored_outcome, text_cell
from pneumonia.serving.screening import Tally

PART_PREFIX, PART_SUFFIX, TEMPORARY_PREFIX = "part-", ".parquet", ".tmp-"
COLUMNS = (PATH_COLUMN, *CSV_COLUMNS)


def schema():
    import pyarrow as pa

    return pa.schema([(name, pa.float64() if name in DECIMALS else pa.string()) for name in COLUMNS])


def record(row, thresholds: dict[str, float], gated: bool) -> dict:
    """One ScreenedImage as a Parquet row: its result values, the numbers unrounded."""
    return {PATH_COLUMN: row.name, **result_values(row, thresholds, gated)}


def part_name(paths: Iterable[str]) -> str:
    """A stable name for a block: the same files give the same name, so a retried block replaces its file."""
    digest = hashlib.sha256("\n".join(paths).encode("utf-8", "surrogateescape")).hexdigest()[:24]
    return f"{PART_PREFIX}{digest}{PART_SUFFIX}"


def encode_part(records: list[dict]) -> tuple[str, bytes]:
    """A block's rows as (its part name, the bytes of its Parquet file)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(records, schema=schema()), sink)
    return part_name(r[PATH_COLUMN] for r in records), sink.getvalue().to_pybytes()


def write_part(out_dir: str, name: str, content: bytes) -> str:
    """DIR/<name>, written whole: to a temporary name first, then moved."""
    system, folder = file_system(out_dir)
    system.create_dir(folder, recursive=True)
    temporary = f"{folder}/{TEMPORARY_PREFIX}{uuid.uuid4().hex}-{name}"
    with system.open_output_stream(temporary) as stream:
        stream.write(content)
    system.move(temporary, f"{folder}/{name}")
    return name


def part_files(out_dir: str) -> tuple[object, list[str]]:
    from pyarrow import fs

    system, folder = file_system(out_dir)
    if system.get_file_info(folder).type == fs.FileType.NotFound:
        return system, []
    infos = system.get_file_info(fs.FileSelector(folder, recursive=False))
    names = [i.path for i in infos if i.base_name.startswith(PART_PREFIX) and i.base_name.endswith(PART_SUFFIX)]
    return system, sorted(names)


def read_results(out_dir: str, columns: Iterable[str] = COLUMNS):
    """The rows under DIR (the chosen columns) as one pyarrow Table; empty when there are none."""
    import pyarrow.dataset as ds

    system, names = part_files(out_dir)
    if not names:
        return schema().empty_table().select(list(columns))
    return ds.dataset(names, schema=schema(), format="parquet", filesystem=system).to_table(columns=list(columns))


def remove_temporaries(out_dir: str) -> int:
    """Deletes the half-written files a stopped run left behind; how many there were."""
    from pyarrow import fs

    system, folder = file_system(out_dir)
    if system.get_file_info(folder).type == fs.FileType.NotFound:
        return 0
    stale = [i.path for i in system.get_file_info(fs.FileSelector(folder)) if i.base_name.startswith(TEMPORARY_PREFIX)]
    for path in stale:
        system.delete_file(path)
    return len(stale)


TALLIED = (PATH_COLUMN, "probability", "ood_verdict", "error")


@dataclass
class ArchiveTally(Tally):
    errors: list[dict] = field(default_factory=list)  # the first few unreadable files: path, error


def tally(table, wanted: set[str] | None = None, max_errors: int = 100) -> ArchiveTally:
    """The outcomes of the rows under DIR (of the `wanted` paths), read back from their columns."""
    counts = ArchiveTally()
    for path, probability, verdict, error in zip(*(table.column(c).to_pylist() for c in TALLIED)):
        if wanted is not None and path not in wanted:
            continue
        outcome = stored_outcome(probability, verdict)
        counts.count(outcome)
        if outcome == Outcome.FAILED and len(counts.errors) < max_errors:
            counts.errors.append({PATH_COLUMN: path, "error": error})
    return counts


def write_csv(out_dir: str, stream: IO[str], wanted: set[str] | None = None) -> int:
    """`predict --csv`'s file from the Parquet under DIR, one part file at a time; the rows written."""
    import pyarrow.parquet as pq

    writer, written = csv.writer(stream), 0
    writer.writerow(COLUMNS)
    system, names = part_files(out_dir)
    for name in names:
        table = pq.read_table(name, filesystem=system, schema=schema())
        for values in zip(*(table.column(c).to_pylist() for c in COLUMNS)):
            if wanted is None or values[0] in wanted:
                writer.writerow([text_cell(v, c) for v, c in zip(values, COLUMNS)])
                written += 1
    return written
