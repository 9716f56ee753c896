"""studies/int8_quantisation.py: the tiny model's export quantised to int8, scored against float32 and
timed. Synthetic data only (nothing from ../shared/)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from studies import int8_quantisation

pytest.importorskip("onnxruntime.quantization")


def test_study_scores_int8_against_float32(tiny_model_dir, synthetic_data_dir, tmp_path, capsys):
    out = tmp_path / "int8"
    code = int8_quantisation.main([str(synthetic_data_dir), "--model", str(tiny_model_dir), "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    result = json.loads((out / "int8.json").read_text())
    assert (out / "int8.md").read_text() in printed
    assert {p.name for p in out.glob("*.int8.onnx")} == {"explain.int8.onnx", "forward.int8.onnx"}
    validation = result["validation"]
    assert validation["n"] > 0 and "originals" not in result
    for runtime in ("float32", "int8"):
        assert 0 <= validation[runtime]["auc"] <= 1
        for threshold in ("default", "screening"):
            assert set(validation[runtime][threshold]) == set(int8_quantisation.FIGURES)
    # Quantised, yet the same model: probabilities and the CAM's shape stay close.
    assert validation["logit_diff_max"] > 0 and validation["probability_diff_max"] < 0.05
    cam = result["cam"]
    assert cam["images"] == min(32, validation["n"]) and 0 <= cam["cam_not_finite"] <= cam["images"]
    if cam["cam_not_finite"] < cam["images"]:
        assert np.isfinite(cam["cam_relative_diff_max"]) and np.isfinite(cam["logit_diff_max"])
    gate = validation["gate"]
    assert sum(gate["verdicts_float32"].values()) == sum(gate["verdicts_int8"].values()) == validation["n"]
    assert 0 <= gate["verdicts_changed"] <= validation["n"] and gate["distance_relative_diff_max"] >= 0
    for timing in result["timings"].values():
        assert timing["float32"] > 0 and timing["int8"] > 0


def test_study_refuses_a_folder_without_train(tiny_model_dir, tmp_path, capsys):
    assert int8_quantisation.main([str(tmp_path), "--model", str(tiny_model_dir), "--out", str(tmp_path / "o")]) == 2
    assert "error:" in capsys.readouterr().err
