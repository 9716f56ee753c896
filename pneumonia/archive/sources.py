"""What an archive run screens: the input paths of folders and manifests (CSV or Parquet with a `path`
column), on the local disk or any file system pyarrow reads by URI (object storage: `s3://`, `gs://`,
...), and the bytes of a block of files."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field

from pneumonia.errors import XrayReadError

MANIFEST_SUFFIXES = (".csv", ".parquet", ".pq")
PATH_COLUMN = "path"
URI_COLUMN = "uri"  # what the read tasks open: the path made absolute on the driver, or its URI


@dataclass
class Inputs:
    paths: list[str] = field(default_factory=list)  # in the order given, each once
    skipped: list[str] = field(default_factory=list)  # files under folders that are not images
    duplicates: int = 0  # paths given more than once (screened once)


def has_scheme(path: str) -> bool:
    return "://" in path


def absolute(path: str) -> str:
    return path if has_scheme(path) else os.path.abspath(path)


def file_system(path: str):
    """(pyarrow file system, path inside it): object storage by its URI, else the local disk."""
    from pyarrow import fs

    if has_scheme(path):
        return fs.FileSystem.from_uri(path)
    return fs.LocalFileSystem(), os.path.abspath(path)


def is_manifest(source: str) -> bool:
    return source.lower().endswith(MANIFEST_SUFFIXES) and (has_scheme(source) or os.path.isfile(source))


def read_manifest(source: str) -> list[str]:
    """The `path` column of a CSV or Parquet manifest; XrayReadError when it has none."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    system, inner = file_system(source)
    try:
        if source.lower().endswith(".csv"):
            with system.open_input_stream(inner) as stream:
                table = pacsv.read_csv(stream)
        else:
            table = pq.read_table(inner, filesystem=system)
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise XrayReadError(f"cannot read the manifest {source}: {err}") from None
    if PATH_COLUMN not in table.column_names:
        raise XrayReadError(f"the manifest {source} has no `{PATH_COLUMN}` column (it has {table.column_names})")
    return [str(path) for path in table.column(PATH_COLUMN).to_pylist() if path]


def find_objects(uri: str):
    """The image files under a folder URI, kept by their name (sniffing their content would cost a
    request each), hidden entries skipped; or the URI itself when it is no folder (a missing one
    becomes a row with its error)."""
    from pyarrow import fs

    from pneumonia.reading.image_files import IMAGE_SUFFIXES, FoundImages

    system, inner = file_system(uri)
    try:
        if system.get_file_info(inner).type != fs.FileType.Directory:
            return FoundImages(files=[uri])
        infos = system.get_file_info(fs.FileSelector(inner, recursive=True))
    except OSError as err:  # an unreachable endpoint, a bucket that is not there, no permission
        raise XrayReadError(f"cannot read {uri}: {err}") from None
    found, scheme = FoundImages(), uri.split("://", 1)[0]
    for info in sorted((i for i in infos if i.type == fs.FileType.File), key=lambda i: i.path):
        if not any(part.startswith(".") for part in info.path[len(inner) :].split("/")):
            is_image = os.path.splitext(info.base_name)[1].lower() in IMAGE_SUFFIXES
            (found.files if is_image else found.skipped).append(f"{scheme}://{info.path}")
    return found


def find_inputs(sources: Iterable[str]) -> Inputs:
    """Folders searched as `predict` searches them (folders on object storage by file name), manifests
    read, other paths kept as given (a missing one becomes a row with its error); each path once."""
    from pneumonia.reading.image_files import find_images

    inputs, seen = Inputs(), set()
    for source in map(str, sources):
        if is_manifest(source):
            found = read_manifest(source)
        else:
            images = find_objects(source) if has_scheme(source) else find_images([source])
            found, inputs.skipped = images.files, inputs.skipped + images.skipped
        for path in found:
            if path in seen:
                inputs.duplicates += 1
                continue
            seen.add(path)
            inputs.paths.append(path)
    return inputs


def read_bytes(batch: dict) -> dict:
    """A block of files -> their bytes, or why they could not be read (a row, never the end of the run)."""
    import numpy as np

    contents, errors = [], []
    for name, uri in zip(batch[PATH_COLUMN], batch[URI_COLUMN]):
        try:
            system, inner = file_system(str(uri))
            with system.open_input_stream(inner) as stream:
                contents.append(stream.read())
            errors.append("")
        except (OSError, ValueError) as err:
            contents.append(b"")
            errors.append(_read_error(str(name), err))
    return {
        PATH_COLUMN: np.asarray(batch[PATH_COLUMN], dtype=object),
        "content": np.asarray(contents + [b""], dtype=object)[:-1],  # stays an object array of bytes
        "read_error": np.asarray(errors, dtype=object),
    }


def _read_error(name: str, err: Exception) -> str:
    if isinstance(err, FileNotFoundError):
        return f"No such image file: {name}"
    return f"{name} could not be read: {getattr(err, 'strerror', None) or err}"
