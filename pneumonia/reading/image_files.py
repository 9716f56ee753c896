"""The image files under folders, found by their content or their name, in walk order (what `predict`
screens)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pneumonia.reading.decoding import SIGNATURE_BYTES, sniff_format

# In a folder, a file is screened when its content is an accepted image, or when its name says it
# is one: a corrupt X-ray is then reported as a row with its error instead of being skipped unseen.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".dcm", ".dicom"})


def _is_image_file(path: Path) -> bool:
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return True
    try:
        with path.open("rb") as handle:
            return sniff_format(handle.read(SIGNATURE_BYTES)) is not None
    except OSError:
        return False


@dataclass
class FoundImages:
    files: list[str] = field(default_factory=list)  # in the order given; each folder's files sorted by path
    skipped: list[str] = field(default_factory=list)  # files under a folder that are not images


def find_images(paths: Iterable[str | Path]) -> FoundImages:
    """Files as given (a missing one too: it becomes a row with its error); folders walked
    recursively in name order, hidden entries skipped, a file kept when it is an image by
    content or by name (so a DICOM without an extension or a PNG named .dat is found)."""
    found = FoundImages()
    for given in map(str, paths):
        if not os.path.isdir(given):
            found.files.append(given)
            continue
        for folder, subfolders, names in os.walk(given):
            subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
            for name in sorted(names):
                if not name.startswith("."):
                    path = os.path.join(folder, name)
                    (found.files if _is_image_file(Path(path)) else found.skipped).append(path)
    return found
