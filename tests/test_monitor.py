"""The drift monitor (pneumonia/serving/drift.py): its test's false-alarm rate and power on drawn data, the
window's running counts, too few images and a card without a reference; the card's reference as `train` and
`fit-ood --monitor-only` write it (`calibrate`'s: tests/test_recalibration.py), and the shipped card's;
`pneumonia monitor RESULTS` on a CSV and on Parquet. Drawn data and the tiny model only (nothing from ../shared/)."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
from builders import SHIPPED_MODEL

from pneumonia.cli import main
from pneumonia.errors import ModelLoadError
from pneumonia.serving.card import CARD_NAME, ModelCard, MonitorReference
from pneumonia.serving.drift import (
    ALPHA,
    NO_REFERENCE,
    SIGNALS,
    DriftMonitor,
    acceptance,
    assess_values,
    counts_of,
    design_effect,
    monitor_reference,
)
from pneumonia.serving.result_formats import CSV_COLUMNS

THRESHOLDS = {"default": 0.9, "screening": 0.6}
GATE = {"unusual": 40.0, "rejected": 50.0}


def drawn(rng, n: int, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Raw logits and gate scores of n images; `shift` moves both."""
    labels = rng.random(n) < 0.7
    logits = np.where(labels, rng.normal(4, 2, n), rng.normal(-4, 2, n)) + shift
    return logits, rng.normal(30, 6, n) + 4 * shift


def reference_of(logits, scores, groups=None) -> MonitorReference:
    return monitor_reference(logits, scores, (1.0, 0.0), THRESHOLDS, GATE, "validation (drawn)", groups=groups)


def probabilities(logits, scores) -> np.ndarray:
    return np.where(scores > GATE["rejected"], np.nan, 1 / (1 + np.exp(-logits)))


# --- The reference ---------------------------------------------------------------------------------


def test_the_reference_counts_each_band_as_the_card_says():
    rng = np.random.default_rng(0)
    logits, scores = drawn(rng, 600)
    reference = reference_of(logits, scores)
    through = scores <= GATE["rejected"]
    probs = 1 / (1 + np.exp(-logits[through]))
    assert set(reference.bands) == set(SIGNALS)
    assert reference.bands["unusual_share"].count == int((scores >= 40).sum())
    assert reference.bands["unusual_share"].of == 600
    assert reference.bands["gate_score_above_median"].count == 300
    assert reference.bands["uncertain_share"].count == int(((probs >= 0.1) & (probs < 0.9)).sum())
    assert reference.bands["above_default"].of == int(through.sum())
    assert reference.bands["above_default"].low == 0.9 and reference.bands["above_screening"].low == 0.6
    assert all(band.design_effect == 1.0 for band in reference.bands.values())  # no patients given


def test_without_a_gate_the_reference_has_only_the_probability_signals():
    logits, _ = drawn(np.random.default_rng(1), 200)
    reference = monitor_reference(logits, None, (1.0, 0.0), THRESHOLDS, None, "validation (drawn)")
    assert set(reference.bands) == {"uncertain_share", "above_default", "above_screening"}


def test_images_of_one_patient_count_as_less_than_independent_ones():
    rng = np.random.default_rng(2)
    patient_inside = rng.random(100) < 0.3
    inside = np.repeat(patient_inside, 4)  # four identical X-rays per patient
    groups = np.repeat(np.arange(100), 4)
    assert 3.0 < design_effect(inside, groups) < 5.0
    assert design_effect(inside, np.arange(400)) < 1.3  # one image each
    assert design_effect(inside, None) == 1.0


def test_a_card_keeps_its_reference_and_refuses_an_impossible_one(tmp_path):
    card = ModelCard.load(SHIPPED_MODEL / CARD_NAME)
    assert ModelCard.load(_written(tmp_path, card.to_dict())).monitor == card.monitor
    content = card.to_dict()
    content["monitor"]["bands"]["unusual_share"]["count"] = 10_000
    with pytest.raises(ModelLoadError, match="monitor.bands.unusual_share"):
        ModelCard.load(_written(tmp_path, content))
    content = card.to_dict()
    del content["monitor"]
    assert ModelCard.load(_written(tmp_path, content)).monitor is None


def _written(folder, content) -> str:
    path = folder / CARD_NAME
    path.write_text(json.dumps(content))
    return path


def test_the_shipped_card_has_a_reference_at_its_own_thresholds():
    card = ModelCard.load(SHIPPED_MODEL / CARD_NAME)
    bands = card.monitor.bands
    assert card.monitor.images == sum(card.data.validation.values())  # the validation part, whole
    assert bands["above_default"].low == card.thresholds.default
    assert bands["above_screening"].low == card.thresholds.screening
    assert bands["unusual_share"].low == card.ood["thresholds"]["unusual"]
    assert bands["gate_score_above_median"].count == card.monitor.images // 2
    assert all(band.design_effect >= 1 for band in bands.values())


# --- The test -------------------------------------------------------------------------------------


def test_the_expected_range_holds_the_reference_share_narrows_with_the_window_and_widens_with_clustering():
    low_100, high_100 = acceptance(100, 50, 500, 0.002, "both")
    low_500, high_500 = acceptance(500, 50, 500, 0.002, "both")
    assert low_100 < 0.1 < high_100 and low_500 < 0.1 < high_500
    assert high_500 - low_500 < high_100 - low_100
    low_clustered, high_clustered = acceptance(500, 50, 500, 0.002, "both", design_effect=2.0)
    assert low_clustered < low_500 and high_clustered > high_500
    assert acceptance(200, 14, 524, 0.002, "above")[0] == 0.0  # one-sided: no lower bound


@pytest.mark.parametrize("n", [100, 300])
def test_windows_without_drift_alarm_at_most_at_the_stated_rate(n):
    """Reference and window drawn from the same population, 1,500 times: the share of windows that alarm
    is no more than ALPHA, allowing three standard errors of the simulation."""
    rng = np.random.default_rng(n)
    alarms = 0
    trials = 1500
    for _ in range(trials):
        reference = reference_of(*drawn(rng, 500))
        logits, scores = drawn(rng, n)
        alarms += assess_values(reference, probabilities(logits, scores), scores)["alarm"]
    assert alarms / trials <= ALPHA + 3 * np.sqrt(ALPHA * (1 - ALPHA) / trials)


def test_a_shifted_window_alarms_and_the_advice_says_what_moved_and_what_to_do():
    rng = np.random.default_rng(3)
    reference = reference_of(*drawn(rng, 500))
    logits, scores = drawn(rng, 300, shift=3.0)
    report = assess_values(reference, probabilities(logits, scores), scores)
    assert report["alarm"] and report["images"] == 300
    alarmed = [s for s in report["signals"] if s["alarm"]]
    assert {"unusual_share", "gate_score_above_median"} <= {s["name"] for s in alarmed}
    for signal in alarmed:
        low, high = signal["expected"]
        assert not low <= signal["value"] <= high
    assert "unusual for the gate" in report["advice"] and "pneumonia calibrate" in report["advice"]


def test_too_few_images_never_alarm_and_say_so():
    rng = np.random.default_rng(4)
    reference = reference_of(*drawn(rng, 500))
    logits, scores = drawn(rng, 40, shift=5.0)
    report = assess_values(reference, probabilities(logits, scores), scores, min_images=100)
    assert not report["alarm"] and not any(s["alarm"] for s in report["signals"])
    assert report["images"] == 40 and "Only 40" in report["advice"] and "at least 100" in report["advice"]


def test_a_card_without_a_reference_answers_no_signals_and_how_to_get_them():
    report = assess_values(None, [0.5] * 300, [30.0] * 300)
    assert report["signals"] == [] and not report["alarm"] and report["advice"] == NO_REFERENCE
    assert "fit-ood" in report["advice"]


# --- The window -----------------------------------------------------------------------------------


def test_the_window_keeps_the_last_screenings_and_counts_them_as_a_whole_array_would():
    rng = np.random.default_rng(5)
    reference = reference_of(*drawn(rng, 500))
    monitor = DriftMonitor(reference, window=50, min_images=10)
    logits, scores = drawn(rng, 130, shift=1.0)
    probs = probabilities(logits, scores)
    probs[::7] = np.nan  # refused by the gate: a score, no probability
    for probability, score in zip(probs, scores):
        monitor.observe(None if np.isnan(probability) else float(probability), float(score))
    monitor.observe(None, None)  # unreadable: nothing to count
    report = monitor.report()
    assert report["images"] == 50 and report["window"] == 50
    expected = counts_of(reference, probs[-50:], scores[-50:])
    assert {s["name"]: (s["count"], s["of"]) for s in report["signals"]} == {
        name: (count.inside, count.of) for name, count in expected.items()
    }
    assert report == assess_values(reference, probs[-50:], scores[-50:], min_images=10) | {"window": 50}
    assert all(isinstance(v, (float, type(None))) for entry in monitor._values for v in entry)  # numbers only


def test_a_monitor_without_a_gate_score_leaves_the_gate_signals_empty():
    rng = np.random.default_rng(6)
    monitor = DriftMonitor(reference_of(*drawn(rng, 500)), window=200, min_images=10)
    for probability in rng.random(150):
        monitor.observe(float(probability), None)
    signals = {s["name"]: s for s in monitor.report()["signals"]}
    assert signals["unusual_share"]["value"] is None and signals["unusual_share"]["of"] == 0
    assert not signals["unusual_share"]["alarm"] and signals["uncertain_share"]["of"] == 150


# --- Where the reference comes from -----------------------------------------------------------------


def test_train_writes_the_reference_through_fit_ood(tiny_model_dir):
    card = ModelCard.load(tiny_model_dir / CARD_NAME)
    assert card.monitor is not None and card.monitor.computed_on.startswith("validation part of train/")
    assert card.monitor.images == sum(card.data.validation.values())
    assert set(card.monitor.bands) == set(SIGNALS)


def test_fit_ood_monitor_only_writes_the_reference_and_keeps_the_gate(tiny_model_dir, synthetic_data_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model, ignore=shutil.ignore_patterns("checkpoints"))
    content = json.loads((model / CARD_NAME).read_text())
    reference = content.pop("monitor")
    (model / CARD_NAME).write_text(json.dumps(content))
    gate_before = (model / "ood.npz").read_bytes()
    assert main(["fit-ood", str(model), str(synthetic_data_dir), "--monitor-only", "--cache-dir", str(tmp_path)]) == 0
    card = ModelCard.load(model / CARD_NAME)
    assert (model / "ood.npz").read_bytes() == gate_before
    assert set(card.monitor.bands) == set(reference["bands"]) == set(SIGNALS)
    assert card.monitor.images == reference["images"] == sum(card.data.validation.values())
    assert card.monitor.bands["above_default"].low == card.thresholds.default


# --- pneumonia monitor RESULTS ----------------------------------------------------------------------


def results_rows(n: int, probability: float, score: float, thresholds: dict) -> list[dict]:
    values = {"probability": probability, "ood_score": score, "ood_verdict": "ok"}
    values |= {"threshold_default": thresholds["default"], "threshold_screening": thresholds["screening"]}
    return [{"path": f"image-{i}.jpeg", **{c: values.get(c, "") for c in CSV_COLUMNS}} for i in range(n)]


def write_csv(path, rows: list[dict]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["path", *CSV_COLUMNS])
        writer.writeheader()
        writer.writerows(rows)


def test_monitor_command_alarms_on_a_run_unlike_the_validation_part(tmp_path, capsys):
    card = ModelCard.load(SHIPPED_MODEL / CARD_NAME)
    rows = results_rows(300, 0.5, 60.0, card.thresholds.as_dict())  # every probability uncertain, every score high
    write_csv(tmp_path / "results.csv", rows)
    assert main(["monitor", str(tmp_path / "results.csv"), "--model", str(SHIPPED_MODEL)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ALARM: This site's X-rays differ") and "pneumonia calibrate" in out
    assert "| uncertain_share | 100.0 % (300 of 300)" in out
    assert (
        main(["monitor", str(tmp_path / "results.csv"), "--model", str(SHIPPED_MODEL), "--json", "--last", "50"]) == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["images"] == 50 and not report["alarm"] and "Only 50" in report["advice"]


def test_monitor_command_reads_parquet_and_refuses_results_of_other_thresholds(tmp_path, capsys):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    card = ModelCard.load(SHIPPED_MODEL / CARD_NAME)
    rows = results_rows(300, 0.5, 60.0, card.thresholds.as_dict())
    (tmp_path / "archive").mkdir()
    table = pa.Table.from_pylist([{k: (v if v != "" else None) for k, v in row.items()} for row in rows])
    pq.write_table(table, tmp_path / "archive" / "part-0.parquet")
    assert main(["monitor", str(tmp_path / "archive"), "--model", str(SHIPPED_MODEL), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["alarm"]
    write_csv(tmp_path / "other.csv", results_rows(300, 0.5, 30.0, {"default": 0.5, "screening": 0.4}))
    assert main(["monitor", str(tmp_path / "other.csv"), "--model", str(SHIPPED_MODEL)]) == 2
    assert "--model" in capsys.readouterr().err
