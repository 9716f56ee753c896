"""studies/drift_monitor.py: the drift monitor's false alarms and detection delay, on drawn scores (the study's
arithmetic) and end to end on the tiny model and synthetic data (nothing from ../shared/)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np

from pneumonia.serving.card import Calibration, Thresholds
from studies import drift_monitor


def drawn_study_data(images: int = 600, seed: int = 0) -> dict:
    """Two 'shifts': none, and one that moves every logit towards 0 and every gate score up."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(images) < 0.7).astype(int)
    logits = np.where(labels == 1, rng.normal(5, 2, images), rng.normal(-5, 2, images))
    scores = rng.normal(30, 5, images)
    patients = np.arange(images) // 2  # two X-rays per patient
    return {
        "shifts": np.asarray(["none", "washed_out"]),
        "logits": np.stack([logits, logits / 4]),
        "scores": np.stack([scores, scores + 8]),
        "patients": patients.astype(str),
        "labels": labels,
    }


CARD = SimpleNamespace(
    calibration=Calibration(1.0, 0.0, 0.1, 0.1),
    thresholds=Thresholds(0.9, 0.6, 0.98),
    ood={"thresholds": {"unusual": 40.0, "rejected": 46.0}},
)


def test_quiet_without_drift_and_quick_under_a_large_one():
    figures = drift_monitor.study(drawn_study_data(), CARD, seed=0, windows=400, splits=10, streams=40)
    assert set(figures["false_alarms_in_part"]) == {100, 200, 500}
    assert all(rate <= 0.05 for rate in figures["false_alarms_in_part"].values())
    assert set(figures["false_alarms_split_half"]) == {100, 200}
    assert all(rate <= 0.05 for rate in figures["false_alarms_split_half"].values())
    shifted = figures["detection"]["washed_out"]
    assert shifted["new_site"]["caught"] == 1.0 and shifted["new_site"]["median"] == drift_monitor.MIN_IMAGES
    assert shifted["after_change"]["caught"] == 1.0 and shifted["after_change"]["p90"] < drift_monitor.WINDOW
    assert figures["detection"]["none"]["new_site"]["caught"] <= 0.1
    assert figures["detection"]["none"]["operating"]["specificity"] > 0.95 and set(shifted["operating"]) == {
        "specificity",
        "sensitivity",
    }
    table = drift_monitor.to_markdown(figures)
    assert "| washed_out |" in table and "| 100 |" in table


def test_main_scores_the_shifts_once_and_prints_the_figures(tiny_model_dir, synthetic_data_dir, tmp_path, capsys):
    out = tmp_path / "drift"
    assert drift_monitor.main([str(synthetic_data_dir), "--model", str(tiny_model_dir), "--out", str(out)]) == 0
    figures = json.loads((out / "figures.json").read_text())
    with np.load(out / "scores.npz") as scored:
        assert scored["logits"].shape == (1 + len(drift_monitor.SHIFTS), figures["images"])
    assert set(figures["detection"]) >= {"none", "crop_80", *drift_monitor.MIXTURES}
    assert "False alarms" in capsys.readouterr().out
