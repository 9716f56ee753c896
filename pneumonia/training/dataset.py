"""The Kaggle "Chest X-Ray Images (Pneumonia)" folder layout, the patient-grouped
validation split, and the cache of decoded, resized pixels."""

from __future__ import annotations

import hashlib
import os
import re
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pneumonia.errors import XrayReadError
from pneumonia.labels import CLASS_NAMES, NORMAL, PNEUMONIA  # noqa: F401  (read as dataset.PNEUMONIA too)
from pneumonia.serving.card import ModelCard
from pneumonia.serving.preprocessing import xray_pixels

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".bmp", ".tif", ".tiff"}

_PNEUMONIA_PATIENT = re.compile(r"^(person\d+)_", re.IGNORECASE)
_NORMAL_PATIENT = re.compile(r"^((?:NORMAL2-)?IM-\d+)-", re.IGNORECASE)


@dataclass
class SplitFiles:
    """The images of one split, in a stable order, and what was skipped while scanning."""

    paths: list[Path] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        labels = np.asarray(self.labels, dtype=int)
        return {name: int((labels == index).sum()) for index, name in enumerate(CLASS_NAMES)}

    def subset(self, indices) -> SplitFiles:
        return SplitFiles([self.paths[i] for i in indices], [self.labels[i] for i in indices])


def _child_folder(parent: Path, name: str) -> Path | None:
    """The sub-folder called `name`, matched case-insensitively."""
    if not parent.is_dir():
        return None
    for child in sorted(parent.iterdir()):
        if child.is_dir() and child.name.lower() == name.lower():
            return child
    return None


def scan_split(root: str | Path, split: str) -> SplitFiles | None:
    """Lists ROOT/split/{NORMAL,PNEUMONIA}/ images; None when the split is absent."""
    split_dir = _child_folder(Path(root), split)
    if split_dir is None:
        return None
    files = SplitFiles()
    for label, class_name in enumerate(CLASS_NAMES):
        class_dir = _child_folder(split_dir, class_name)
        if class_dir is None:
            continue
        for path in sorted(class_dir.iterdir()):
            if not path.is_file():
                continue
            if path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith("."):
                files.paths.append(path)
                files.labels.append(label)
            else:
                files.skipped.append(path)
    return files


def patient_id(path: str | Path) -> str:
    """The patient a Kaggle file name belongs to; unknown names are their own patient."""
    name = Path(path).name
    for pattern in (_PNEUMONIA_PATIENT, _NORMAL_PATIENT):
        match = pattern.match(name)
        if match:
            return match.group(1).upper()
    return name.upper()


NORMAL_SERIES = ("IM", "NORMAL2-IM")  # the two acquisition series of the Kaggle NORMAL file names


def normal_series(path: str | Path) -> str:
    """The NORMAL acquisition series of a Kaggle file name: "NORMAL2-IM" or "IM" (else "other")."""
    patient = patient_id(path)
    if patient.startswith("NORMAL2-IM-"):
        return "NORMAL2-IM"
    if patient.startswith("IM-"):
        return "IM"
    return "other"


def split_off_series(files: SplitFiles, series: str | None) -> tuple[SplitFiles, SplitFiles]:
    """(the files without the NORMAL images of `series`, those images). A series held out of
    training and validation alike is a test of transfer to an acquisition the model never saw."""
    if series is None:
        return files, SplitFiles()
    held = [
        i
        for i, (path, label) in enumerate(zip(files.paths, files.labels))
        if label == 0 and normal_series(path) == series
    ]
    held_set = set(held)
    return files.subset([i for i in range(len(files.paths)) if i not in held_set]), files.subset(held)


def unseen_series(data_dir: str | Path, card: ModelCard) -> SplitFiles | None:
    """The NORMAL images of the series the model was trained without (train --hold-out-series), or None."""
    series = card.training.config.hold_out_series
    return split_off_series(scan_split(data_dir, "train"), series)[1] if series else None


def training_parts(
    files: SplitFiles, val_fraction: float, seed: int, hold_out_series: str | None = None
) -> tuple[SplitFiles, SplitFiles, SplitFiles]:
    """train/ -> (training part, validation part, held-out series), as `train` makes them and as
    `fit-ood` and `robustness` recreate them from a card's training config."""
    kept, held_out = split_off_series(files, hold_out_series)
    train_files, val_files = patient_grouped_split(kept, val_fraction, seed)
    return train_files, val_files, held_out


def patient_grouped_split(files: SplitFiles, val_fraction: float, seed: int) -> tuple[SplitFiles, SplitFiles]:
    """Stratified by class, grouped by patient: no patient has images on both sides.

    Patients are shuffled with `seed`; per class, whole patients go to validation until it
    holds `val_fraction` of that class's images.
    """
    if not 0 < val_fraction < 1:
        raise ValueError("val_fraction must be between 0 and 1")
    rng = np.random.default_rng(seed)
    by_patient: dict[str, list[int]] = {}
    for index, path in enumerate(files.paths):
        by_patient.setdefault(patient_id(path), []).append(index)
    val_indices: list[int] = []
    for label in range(len(CLASS_NAMES)):
        patients = sorted(p for p, idx in by_patient.items() if files.labels[idx[0]] == label)
        rng.shuffle(patients)
        target = val_fraction * sum(len(by_patient[p]) for p in patients)
        taken = 0
        for patient in patients:
            if taken >= target:
                break
            val_indices.extend(by_patient[patient])
            taken += len(by_patient[patient])
    val_set = set(val_indices)
    train_indices = [i for i in range(len(files.paths)) if i not in val_set]
    return files.subset(train_indices), files.subset(sorted(val_set))


def fingerprint(files: SplitFiles) -> str:
    """sha256 of the sorted (class/file name) list: which images a model was trained on."""
    names = sorted(f"{CLASS_NAMES[label]}/{path.name}" for path, label in zip(files.paths, files.labels))
    return hashlib.sha256("\n".join(names).encode()).hexdigest()


def load_pixels(
    files: SplitFiles, image_size: int, cache_dir: str | Path | None = None, log=print
) -> tuple[np.ndarray, np.ndarray, SplitFiles]:
    """Decodes and resizes every image once: uint8 (N, S, S) pixels and int labels (N,).

    Unreadable images are reported by path and dropped (the returned SplitFiles lists what
    was kept). With `cache_dir`, the arrays are saved under a key of the file list and size,
    so later runs skip decoding.
    """
    cache_file = None
    if cache_dir is not None:
        key = hashlib.sha256(
            (
                "\n".join(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files.paths)
                + f"\n{image_size}"
            ).encode()
        ).hexdigest()[:20]
        cache_file = Path(cache_dir) / f"pixels-{image_size}-{key}.npz"
        if cache_file.exists():
            try:
                with np.load(cache_file, allow_pickle=False) as cached:
                    position = {str(p): i for i, p in enumerate(files.paths)}
                    kept = [position[str(p)] for p in cached["paths"]]
                    return cached["pixels"], cached["labels"], files.subset(kept)
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
                log(f"ignoring unreadable pixel cache {cache_file} ({type(err).__name__}); decoding again")
    pixels, kept = [], []
    with tqdm(total=len(files.paths), unit="image", file=sys.stderr, disable=None) as progress:  # on a terminal only
        for index, path in enumerate(files.paths):
            try:
                pixels.append(xray_pixels(path, image_size))
                kept.append(index)
            except XrayReadError as err:
                with progress.external_write_mode():
                    log(f"skipped unreadable image {path}: {err}")
            progress.update()
    kept_files = files.subset(kept)
    array = np.stack(pixels) if pixels else np.zeros((0, image_size, image_size), np.uint8)
    labels = np.asarray(kept_files.labels, dtype=np.int64)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        partial = cache_file.with_name(f".{cache_file.stem}.{os.getpid()}.partial.npz")
        np.savez(partial, pixels=array, labels=labels, paths=np.asarray([str(p) for p in kept_files.paths]))
        os.replace(partial, cache_file)  # an interrupted run leaves no half-written cache behind
    return array, labels, kept_files


def describe(name: str, files: SplitFiles) -> str:
    counts = files.counts()
    text = f"{name}: {len(files.paths)} images ({', '.join(f'{k} {v}' for k, v in counts.items())})"
    if files.skipped:
        text += f"; skipped {len(files.skipped)} non-image files"
    return text


class DataError(ValueError):
    """A data folder that cannot give what is asked of it; the message is meant for a person."""


def validation_part(data_dir: str | Path, card: ModelCard) -> tuple[SplitFiles, dict]:
    """The validation part of DATA_DIR/train/, recreated as training made it -> (files, info).

    `info` holds val_fraction, seed, the fingerprints and whether they match (a mismatch means
    a different copy of the data or a different split: the numbers are then not the card's).
    """
    config = card.training.config
    files = scan_split(data_dir, "train")
    if files is None or not files.paths:
        raise DataError(f"{data_dir} has no train/NORMAL or train/PNEUMONIA images")
    _, val, _ = training_parts(files, card.data.val_fraction, config.seed, config.hold_out_series)
    expected = card.data.validation_fingerprint
    found = fingerprint(val)
    info = {
        "val_fraction": card.data.val_fraction,
        "seed": config.seed,
        "hold_out_series": config.hold_out_series,
        "fingerprint": found,
        "card_fingerprint": expected,
        "fingerprint_matches": found == expected,
        "n": val.counts(),
    }
    if found != expected:
        info["warning"] = (
            "validation fingerprint differs from the card's: this is not the validation split the "
            "model was selected on (different data copy, val_fraction or seed)"
        )
    return val, info
