"""studies/robustness.py: the proxies report (`python -m studies.robustness`) over models, shifts, the
originals and the NORMAL series. Synthetic data only (nothing from ../shared/)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from builders import write_synthetic_dataset

from studies import lever_table, robustness

SHIFT_NAMES = [s.name for s in robustness.SHIFTS]


@pytest.fixture(scope="module")
def originals_dir(tmp_path_factory):
    """FOLDER/{NORMAL,PNEUMONIA}: larger synthetic 'originals', 3 per class."""
    root = tmp_path_factory.mktemp("originals")
    write_synthetic_dataset(root, per_class=3, splits=("val",), seed=4, size=160)
    return root / "val"


def test_cli_writes_one_row_per_shift(tiny_model_dir, synthetic_data_dir, originals_dir, tmp_path, capsys):
    out = tmp_path / "report"
    code = robustness.main(
        [
            str(synthetic_data_dir),
            "--model",
            str(tiny_model_dir),
            "--model",
            str(tiny_model_dir),
            "--originals",
            str(originals_dir),
            "--out",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    report = json.loads((out / "robustness.json").read_text())
    markdown = (out / "robustness.md").read_text()
    assert markdown in printed
    assert len(report["models"]) == 2
    first, second = report["models"]
    assert first["name"] != second["name"] and f"| {first['name']} | {second['name']} |" in markdown
    assert [row["shift"] for row in first["shifts"]] == [robustness.BASELINE] + SHIFT_NAMES
    for row in first["shifts"]:
        assert math.isfinite(row["auc"]) and 0 <= row["auc"] <= 1
        assert 0 <= row["normal_mean_p"] <= 1 and 0 <= row["pneumonia_mean_p"] <= 1
        for threshold in ("default", "screening"):
            assert 0 <= row[threshold]["specificity"] <= 1 and 0 <= row[threshold]["recall"] <= 1
        assert f"| {row['shift'] if row['shift'] != 'none' else 'none'}" in markdown
    assert first["shifts"] == second["shifts"]  # the same model scores the same shifted images identically
    summary = first["summary"]
    specs = [r["default"]["specificity"] for r in first["shifts"][1:]]
    assert summary["worst_specificity_default"] == min(specs)
    assert summary["mean_specificity_default"] == pytest.approx(np.mean(specs))
    assert "worst case over shifts" in markdown and "mean over shifts" in markdown
    assert first["validation"]["fingerprint_matches"]
    originals = first["originals"]
    assert originals["n"] == {"NORMAL": 3, "PNEUMONIA": 3} and len(originals["images"]) == 6
    assert math.isfinite(originals["auc"])
    assert [s["series"] for s in first["series"]] == ["IM"] and first["series"][0]["n_train"] > 0
    assert "--hold-out-series" in markdown  # the notes say how to test transfer to an unseen series
    # studies.lever_table: one row of levers.md per model of the report
    assert lever_table.main([str(out / "robustness.json")]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(f"| `{tiny_model_dir}`")]
    assert len(rows) == 2


def test_cli_skips_missing_originals_with_a_message(tiny_model_dir, synthetic_data_dir, tmp_path, capsys):
    out = tmp_path / "report"
    code = robustness.main(
        [
            str(synthetic_data_dir),
            "--model",
            str(tiny_model_dir),
            "--originals",
            str(tmp_path / "absent"),
            "--out",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    assert "has no NORMAL/ or PNEUMONIA/ images; skipped" in printed
    assert json.loads((out / "robustness.json").read_text())["models"][0]["originals"] is None


def test_cli_reports_a_missing_train_split(tiny_model_dir, tmp_path, capsys):
    code = robustness.main([str(tmp_path), "--model", str(tiny_model_dir), "--out", str(tmp_path / "r")])
    assert code == 2
    assert "no train/NORMAL" in capsys.readouterr().err
