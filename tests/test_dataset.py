"""The Kaggle folder layout, patient ids, the patient-grouped split and the pixel cache."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from builders import write_synthetic_dataset
from PIL import Image

from pneumonia.serving.classifier import find_card
from pneumonia.training import dataset
from pneumonia.training.dataset import (
    SplitFiles,
    describe,
    fingerprint,
    load_pixels,
    patient_grouped_split,
    patient_id,
    scan_split,
)


def _jpeg(path: Path, value: int = 100, size: int = 24) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8), "L").save(path, quality=90)
    return path


def test_folder_names_are_matched_case_insensitively(tmp_path):
    _jpeg(tmp_path / "Train" / "normal" / "IM-0001-0001.jpeg")
    _jpeg(tmp_path / "Train" / "normal" / "IM-0002-0001.jpeg")
    _jpeg(tmp_path / "Train" / "Pneumonia" / "person1_bacteria_1.jpeg")
    files = scan_split(tmp_path, "train")
    assert files is not None
    assert [p.name for p in files.paths] == ["IM-0001-0001.jpeg", "IM-0002-0001.jpeg", "person1_bacteria_1.jpeg"]
    assert files.labels == [0, 0, 1]
    assert files.counts() == {"NORMAL": 2, "PNEUMONIA": 1}


def test_missing_split_is_none_and_a_missing_class_is_empty(tmp_path):
    _jpeg(tmp_path / "train" / "NORMAL" / "IM-0001-0001.jpeg")
    assert scan_split(tmp_path, "test") is None
    assert scan_split(tmp_path, "val") is None
    assert scan_split(tmp_path / "nowhere", "train") is None
    files = scan_split(tmp_path, "train")
    assert files.counts() == {"NORMAL": 1, "PNEUMONIA": 0}


def test_non_images_are_skipped_and_counted(tmp_path):
    folder = tmp_path / "train" / "NORMAL"
    _jpeg(folder / "IM-0001-0001.jpeg")
    _jpeg(folder / "IM-0002-0001.JPG")  # upper-case suffix is still an image
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (folder / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (folder / "notes.txt").write_text("reviewed by radiologist")
    _jpeg(folder / "._IM-0001-0001.jpeg")  # macOS resource fork: hidden, not an X-ray
    (folder / "sub").mkdir()
    files = scan_split(tmp_path, "train")
    assert sorted(p.name for p in files.paths) == ["IM-0001-0001.jpeg", "IM-0002-0001.JPG"]
    assert {p.name for p in files.skipped} == {"._IM-0001-0001.jpeg", ".DS_Store", "Thumbs.db", "notes.txt"}
    assert "skipped 4 non-image files" in describe("train", files)
    assert "2 images (NORMAL 2, PNEUMONIA 0)" in describe("train", files)


def test_unreadable_image_is_reported_and_dropped(tmp_path):
    folder = tmp_path / "train"
    _jpeg(folder / "NORMAL" / "IM-0001-0001.jpeg", 1)
    (folder / "NORMAL" / "IM-0002-0001.jpeg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    _jpeg(folder / "PNEUMONIA" / "person1_bacteria_1.jpeg", 2)
    (folder / "PNEUMONIA" / "person2_virus_2.png").write_bytes(b"")
    files = scan_split(tmp_path, "train")
    messages = []
    pixels, labels, kept = load_pixels(files, 16, log=messages.append)
    assert pixels.shape == (2, 16, 16) and pixels.dtype == np.uint8
    assert labels.tolist() == [0, 1]
    assert [p.name for p in kept.paths] == ["IM-0001-0001.jpeg", "person1_bacteria_1.jpeg"]
    assert len(messages) == 2
    assert "IM-0002-0001.jpeg" in messages[0] and "person2_virus_2.png" in messages[1]
    assert np.array_equal(pixels[1], dataset.xray_pixels(kept.paths[1], 16))


def test_no_readable_images_gives_empty_arrays(tmp_path):
    (tmp_path / "train" / "NORMAL").mkdir(parents=True)
    (tmp_path / "train" / "NORMAL" / "IM-0001-0001.jpeg").write_text("text")
    pixels, labels, kept = load_pixels(scan_split(tmp_path, "train"), 16, log=lambda *_: None)
    assert pixels.shape == (0, 16, 16) and labels.shape == (0,) and kept.paths == []


@pytest.mark.parametrize(
    "name, patient",
    [
        ("person123_bacteria_45.jpeg", "PERSON123"),
        ("person12_virus_3.jpeg", "PERSON12"),
        ("PERSON12_VIRUS_4.JPEG", "PERSON12"),
        ("IM-0115-0001.jpeg", "IM-0115"),
        ("NORMAL2-IM-1427-0001.jpeg", "NORMAL2-IM-1427"),
        ("scan.png", "SCAN.PNG"),  # unknown names are their own patient
    ],
)
def test_patient_id(name, patient):
    assert patient_id(Path("chest_xray/train/X") / name) == patient


def test_patient_id_groups_a_patients_images():
    assert patient_id("person12_bacteria_1.jpeg") == patient_id("person12_virus_9.jpeg")
    assert patient_id("person12_virus_3.jpeg") != patient_id("person123_virus_3.jpeg")
    assert patient_id("IM-0115-0001.jpeg") == patient_id("IM-0115-0002.jpeg")
    assert patient_id("IM-1427-0001.jpeg") != patient_id("NORMAL2-IM-1427-0001.jpeg")


def _kaggle_like_files(rng_seed: int = 0) -> SplitFiles:
    """300 NORMAL images from 150 patients and 420 PNEUMONIA images from 180 patients with
    1-4 images each (paths only: the split never opens the files)."""
    rng = np.random.default_rng(rng_seed)
    files = SplitFiles()
    for patient in range(150):
        for image in range(2):
            prefix = "NORMAL2-" if patient % 3 == 0 else ""
            files.paths.append(Path(f"NORMAL/{prefix}IM-{patient:04d}-{image + 1:04d}.jpeg"))
            files.labels.append(0)
    count = 0
    for patient in range(180):
        for _ in range(int(rng.integers(1, 5))):
            kind = "virus" if count % 3 == 0 else "bacteria"
            files.paths.append(Path(f"PNEUMONIA/person{patient}_{kind}_{count}.jpeg"))
            files.labels.append(1)
            count += 1
    return files


def test_patient_grouped_split_is_leak_free_stratified_and_complete():
    files = _kaggle_like_files()
    train, val = patient_grouped_split(files, 0.2, seed=42)
    train_patients = {patient_id(p) for p in train.paths}
    val_patients = {patient_id(p) for p in val.paths}
    assert train_patients and val_patients and not train_patients & val_patients
    assert sorted(map(str, train.paths + val.paths)) == sorted(map(str, files.paths))
    for path, label in zip(train.paths + val.paths, train.labels + val.labels):
        assert label == (1 if path.parent.name == "PNEUMONIA" else 0)
    total, in_val = files.counts(), val.counts()
    for name in dataset.CLASS_NAMES:
        fraction = in_val[name] / total[name]
        assert 0.2 <= fraction <= 0.2 + 4 / total[name] + 1e-9, (name, fraction)  # overshoot < one patient


def test_patient_grouped_split_is_deterministic_per_seed():
    files = _kaggle_like_files()
    first = patient_grouped_split(files, 0.2, seed=7)[1].paths
    again = patient_grouped_split(files, 0.2, seed=7)[1].paths
    other = patient_grouped_split(files, 0.2, seed=8)[1].paths
    assert first == again
    assert set(first) != set(other)


def test_patient_grouped_split_rejects_bad_fractions():
    for fraction in (0, 1, -0.1, 1.5):
        with pytest.raises(ValueError):
            patient_grouped_split(_kaggle_like_files(), fraction, seed=0)


def test_fingerprint_depends_on_the_file_set_not_its_order():
    files = _kaggle_like_files()
    reordered = files.subset(list(reversed(range(len(files.paths)))))
    assert fingerprint(files) == fingerprint(reordered)
    assert len(fingerprint(files)) == 64
    assert fingerprint(files) != fingerprint(files.subset(range(1, len(files.paths))))
    relabelled = SplitFiles(list(files.paths), [1 - label for label in files.labels])
    assert fingerprint(files) != fingerprint(relabelled)


@pytest.fixture()
def small_split(tmp_path):
    for i in range(3):
        _jpeg(tmp_path / "data" / "train" / "NORMAL" / f"IM-000{i}-0001.jpeg", i, size=40)
        _jpeg(tmp_path / "data" / "train" / "PNEUMONIA" / f"person{i}_bacteria_{i}.jpeg", 10 + i, size=40)
    (tmp_path / "data" / "train" / "PNEUMONIA" / "person9_virus_9.jpeg").write_text("broken")
    return scan_split(tmp_path / "data", "train")


def test_pixel_cache_round_trips_and_is_read_back(small_split, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    log = []
    first = load_pixels(small_split, 20, cache_dir=cache, log=log.append)
    written = sorted(cache.glob("*.npz"))
    assert len(written) == 1 and "-20-" in written[0].name
    assert len(log) == 1  # the broken file

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded although cached")

    monkeypatch.setattr(dataset, "xray_pixels", no_decoding)
    second = load_pixels(small_split, 20, cache_dir=cache, log=log.append)
    assert np.array_equal(first[0], second[0]) and second[0].dtype == np.uint8
    assert np.array_equal(first[1], second[1])
    assert first[2].paths == second[2].paths and first[2].labels == second[2].labels
    assert len(second[2].paths) == 6


def test_pixel_cache_is_keyed_by_size_and_files(small_split, tmp_path):
    cache = tmp_path / "cache"
    small = load_pixels(small_split, 20, cache_dir=cache, log=lambda *_: None)
    large = load_pixels(small_split, 24, cache_dir=cache, log=lambda *_: None)
    assert large[0].shape == (6, 24, 24) and small[0].shape == (6, 20, 20)
    assert len(list(cache.glob("*.npz"))) == 2
    # a changed file makes a new cache entry, with the new pixels
    changed = small_split.paths[0]
    _jpeg(changed, 99, size=40)
    again = load_pixels(small_split, 20, cache_dir=cache, log=lambda *_: None)
    assert len(list(cache.glob("*.npz"))) == 3
    assert np.array_equal(again[0][0], dataset.xray_pixels(changed, 20))
    assert not np.array_equal(again[0][0], small[0][0])
    # a subset of the files is its own entry too
    subset = load_pixels(small_split.subset([0, 1]), 20, cache_dir=cache, log=lambda *_: None)
    assert subset[0].shape == (2, 20, 20) and len(list(cache.glob("*.npz"))) == 4


def test_a_damaged_cache_file_is_decoded_again(small_split, tmp_path):
    cache = tmp_path / "cache"
    first = load_pixels(small_split, 20, cache_dir=cache, log=lambda *_: None)
    (entry,) = cache.glob("*.npz")
    entry.write_bytes(entry.read_bytes()[:100])  # as if the run was killed while writing it
    log = []
    again = load_pixels(small_split, 20, cache_dir=cache, log=log.append)
    assert np.array_equal(first[0], again[0]) and first[2].paths == again[2].paths
    assert any("pixel cache" in line for line in log)
    assert [p.name for p in cache.iterdir()] == [entry.name]  # rewritten, no partial files left
    assert np.array_equal(load_pixels(small_split, 20, cache_dir=cache, log=lambda *_: None)[0], first[0])


def _series_files() -> dataset.SplitFiles:
    names = [
        ("IM-0001-0001.jpeg", 0),
        ("IM-0001-0002.jpeg", 0),
        ("NORMAL2-IM-0005-0001.jpeg", 0),
        ("NORMAL2-IM-0006-0001.jpeg", 0),
        ("person1_bacteria_1.jpeg", 1),
        ("person2_virus_2.jpeg", 1),
    ]
    return dataset.SplitFiles([Path("train") / n for n, _ in names], [label for _, label in names])


def test_a_held_out_series_is_every_normal_image_of_it_and_nothing_else():
    files = _series_files()
    assert [dataset.normal_series(p) for p in files.paths[:4]] == ["IM", "IM", "NORMAL2-IM", "NORMAL2-IM"]
    kept, held = dataset.split_off_series(files, "NORMAL2-IM")
    assert [p.name for p in held.paths] == ["NORMAL2-IM-0005-0001.jpeg", "NORMAL2-IM-0006-0001.jpeg"]
    assert held.labels == [0, 0] and len(kept.paths) == 4 and not set(kept.paths) & set(held.paths)
    untouched, nothing = dataset.split_off_series(files, None)
    assert untouched.paths == files.paths and nothing.paths == []
    train, val, held_out = dataset.training_parts(files, 0.5, 0, "NORMAL2-IM")
    assert held_out.paths == held.paths
    assert sorted(train.paths + val.paths) == sorted(kept.paths)


def test_normal_series_follows_the_kaggle_names():
    assert dataset.normal_series("NORMAL/IM-0115-0001.jpeg") == "IM"
    assert dataset.normal_series("NORMAL/NORMAL2-IM-1427-0001.jpeg") == "NORMAL2-IM"
    assert dataset.normal_series("NORMAL/scan.png") == "other"


def test_validation_reconstruction_matches_the_card_fingerprint(tiny_model_dir, synthetic_data_dir):
    _, card = find_card(tiny_model_dir)
    val, info = dataset.validation_part(synthetic_data_dir, card)
    assert info["fingerprint_matches"] and "warning" not in info
    assert dataset.fingerprint(val) == card.data.validation_fingerprint
    assert info["n"] == card.data.validation

    config = dataclasses.replace(card.training.config, seed=card.training.config.seed + 1)
    other_seed = dataclasses.replace(card, training=dataclasses.replace(card.training, config=config))
    _, info = dataset.validation_part(synthetic_data_dir, other_seed)
    assert not info["fingerprint_matches"] and "differs" in info["warning"]

    with pytest.raises(dataset.DataError, match="no train/NORMAL or train/PNEUMONIA"):
        dataset.validation_part(synthetic_data_dir / "missing", card)


def test_the_unseen_series_is_the_normal_images_of_the_cards_held_out_series(tmp_path):
    write_synthetic_dataset(tmp_path, per_class=4)
    normal = tmp_path / "train" / "NORMAL"
    for i in range(3):
        (normal / f"NORMAL2-IM-{1000 + i:04d}-0001.jpeg").write_bytes((normal / "IM-0000-0001.jpeg").read_bytes())

    def card(series):
        return SimpleNamespace(training=SimpleNamespace(config=SimpleNamespace(hold_out_series=series)))

    unseen = dataset.unseen_series(str(tmp_path), card("NORMAL2-IM"))
    assert sorted(p.name for p in unseen.paths) == [f"NORMAL2-IM-{1000 + i:04d}-0001.jpeg" for i in range(3)]
    assert unseen.labels == [0, 0, 0]
    assert dataset.unseen_series(str(tmp_path), card(None)) is None
