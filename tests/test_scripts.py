"""Every script of bench/ and studies/ imports and runs: its `main`, on tiny data the tests build, with
the smallest arguments it takes, exits 0 and prints or writes what it should. A script that needs what
this machine lacks (Orthanc, Ray, Chromium, a package index) is skipped saying so; one that takes more
than seconds (it starts interpreters, servers or a browser) is marked slow. Scripts with their own
tests under tests/studies/ are run there (RUN_ELSEWHERE)."""

from __future__ import annotations

import importlib
import json
import shutil
import socket
import sys

import pytest
from builders import REAL_XRAYS, REPO

SCRIPTS = sorted(
    f"{path.parent.name}.{path.stem}"
    for folder in ("bench", "studies")
    for path in (REPO / folder).glob("*.py")
    if path.stem != "__init__"
)
# The studies whose tests call their main (with the data their figures need).
RUN_ELSEWHERE = {
    "studies.drift_monitor": "tests/studies/test_drift_monitor_study.py",
    "studies.int8_quantisation": "tests/studies/test_int8_quantisation.py",
    "studies.robustness": "tests/studies/test_robustness.py",
    "studies.lever_table": "tests/studies/test_robustness.py",  # on the report the robustness test writes
}
XRAY_FOLDER = REAL_XRAYS[0].parent  # tests/data: two real X-ray JPEGs
RUN_HERE: set[str] = set()


def runs(module: str):
    """Marks a test as the smoke run of `module` (test_every_script_has_a_smoke_run counts them)."""
    RUN_HERE.add(module)
    return lambda test: test


def run_main(module: str, argv: list, monkeypatch) -> int | None:
    """`python -m MODULE ARGV...` in this process: the script's main(argv)."""
    argv = [str(arg) for arg in argv]
    monkeypatch.setattr(sys, "argv", [f"python -m {module}", *argv])
    main = importlib.import_module(module).main
    return main(argv)


def test_every_script_has_a_smoke_run():
    assert "bench.benchmark_batch" in SCRIPTS and "studies.threshold_rules" in SCRIPTS
    assert sorted(RUN_HERE | set(RUN_ELSEWHERE)) == SCRIPTS
    for module, test_file in RUN_ELSEWHERE.items():
        assert f"{module.split('.')[1]}.main(" in (REPO / test_file).read_text(), test_file


@pytest.mark.parametrize("module", SCRIPTS)
def test_the_script_imports_and_explains_its_arguments(module, monkeypatch, capsys):
    if module == "bench.benchmark_pacs":
        pytest.importorskip("dicomweb_client", reason="the pacs extra (requirements-pacs.txt) is not installed")
    with pytest.raises(SystemExit) as exited:
        run_main(module, ["--help"], monkeypatch)
    assert exited.value.code == 0 and "usage:" in capsys.readouterr().out


# --- Seconds each, in the default run ------------------------------------------------------------


@runs("bench.draft_decoding")
def test_draft_decoding_compares_both_decodings_of_each_jpeg(tiny_model_dir, monkeypatch, capsys):
    assert run_main("bench.draft_decoding", ["--model", tiny_model_dir, "--images", XRAY_FOLDER], monkeypatch) == 0
    printed = capsys.readouterr().out
    assert f"{len(REAL_XRAYS)} images: largest |change|" in printed
    assert "(full size)" in printed and "(DCT scale)" in printed


@runs("bench.benchmark_training")
def test_benchmark_training_times_a_step(monkeypatch, capsys):
    argv = ["--arch", "custom", "--image-size", 32, "--batch-size", 4, "--steps", 1]
    assert run_main("bench.benchmark_training", [*argv, "--variants", "graph (train's default)"], monkeypatch) == 0
    assert "s/step" in capsys.readouterr().out


@runs("bench.benchmark_batch")
def test_benchmark_batch_runs_a_mode_and_all_modes_apart(tiny_model_dir, tmp_path, monkeypatch, capsys):
    common = ["--model", tiny_model_dir, "--files", 2, "--single", 1, "--images", XRAY_FOLDER, "--out", tmp_path]
    assert run_main("bench.benchmark_batch", [*common, "--mode", "throughput"], monkeypatch) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["one_at_a_time"]["images"] == 1 and result["batched_8"]["images"] == 2


@pytest.mark.slow  # six interpreters, each loading the model
def test_benchmark_batch_writes_every_mode(tiny_model_dir, tmp_path, monkeypatch):
    common = ["--model", tiny_model_dir, "--files", 2, "--single", 1, "--images", XRAY_FOLDER, "--out", tmp_path]
    assert run_main("bench.benchmark_batch", common, monkeypatch) == 0
    report = json.loads((tmp_path / "benchmark_batch.json").read_text())
    assert set(importlib.import_module("bench.benchmark_batch").MODES) <= set(report)


@runs("studies.threshold_rules")
def test_threshold_rules_study_scores_every_rule(tiny_model_dir, synthetic_data_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "rules"
    argv = [synthetic_data_dir, "--model", tiny_model_dir, "--out", out]
    assert run_main("studies.threshold_rules", argv, monkeypatch) == 0
    rules = json.loads((out / "rules.json").read_text())
    from pneumonia.training.config import RULES

    assert [row["rule"] for row in rules] == [rule.name for rule in RULES]
    assert (out / "rules.md").read_text() in capsys.readouterr().out


@runs("studies.ensemble_proxy")
def test_ensemble_proxy_scores_the_average_of_its_members(tiny_model_dir, synthetic_data_dir, monkeypatch, capsys):
    argv = [synthetic_data_dir, "--model", tiny_model_dir, "--model", tiny_model_dir]
    assert run_main("studies.ensemble_proxy", argv, monkeypatch) == 0
    printed = capsys.readouterr().out
    assert f"ensemble of {tiny_model_dir}, {tiny_model_dir}" in printed and "summary:" in printed


# --- Slow, or needing what a machine may lack -------------------------------------------------------


@runs("bench.benchmark_archive")
@pytest.mark.slow  # `predict` and `archive` in their own interpreters, a local Ray
def test_benchmark_archive_compares_archive_with_predict(tmp_path, monkeypatch):
    pytest.importorskip("ray", reason="the archive extra (requirements-archive.txt) is not installed")
    argv = ["--files", 4, "--actors", 1, "--rows-per-file", 2, "--images", XRAY_FOLDER, "--out", tmp_path]
    assert run_main("bench.benchmark_archive", argv, monkeypatch) == 0
    result = json.loads((tmp_path / "archive.json").read_text())
    assert result["files"] == 4 and result["archive_1"]["max_probability_difference"] < 1e-5


@runs("bench.benchmark_pacs")
@pytest.mark.slow  # an Orthanc, and `pacs screen` in its own interpreter
def test_benchmark_pacs_screens_what_it_stored(tmp_path, monkeypatch):
    pytest.importorskip("highdicom", reason="pacs needs highdicom: pip install -r requirements-pacs.txt")
    from pneumonia.pacs import local_orthanc

    if reason := local_orthanc.missing():
        pytest.skip(reason)
    argv = ["--images", 2, "--per-study", 1, "--xrays", XRAY_FOLDER, "--out", tmp_path]
    assert run_main("bench.benchmark_pacs", argv, monkeypatch) == 0
    assert json.loads((tmp_path / "pacs.json").read_text())["images"] == 2


@runs("bench.browser_screening")
@pytest.mark.slow  # two headless Chromium sessions on the shipped model
@pytest.mark.skipif(
    not (shutil.which("chromium") or shutil.which("chromium-browser")) or not shutil.which("chromedriver"),
    reason="the browser benchmark needs Chromium and its driver: apt-get install chromium chromium-driver",
)
def test_browser_screening_times_both_modes(tmp_path, monkeypatch):
    out = tmp_path / "browser.json"
    assert run_main("bench.browser_screening", ["--images", 2, "--out", out], monkeypatch) == 0
    results = json.loads(out.read_text())
    assert set(results) == {"app /device/", "static site"}
    assert all(mode["images_after_the_first"] == 1 for mode in results.values())


def package_index_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=3).close()
    except OSError:
        return False
    return True


@runs("bench.serving_footprint")
@pytest.mark.slow  # a fresh virtualenv with the serving requirements installed into it
def test_serving_footprint_installs_the_serving_requirements(tmp_path, monkeypatch):
    if not package_index_reachable():
        pytest.skip("the footprint benchmark installs requirements.txt from the package index, which is unreachable")
    out = tmp_path / "footprint.json"
    assert run_main("bench.serving_footprint", ["--out", out], monkeypatch) == 0
    assert json.loads(out.read_text())["tensorflow_import_fails"]


@runs("bench.benchmark_upload")
@pytest.mark.slow  # gunicorn, and the naive Keras path
def test_benchmark_upload_times_each_stage(ungated_model_dir, tmp_path, monkeypatch):
    # ungated: the tiny model's gate, fitted on drawings, refuses a real X-ray (422)
    argv = ["--model", ungated_model_dir, "--image", REAL_XRAYS[0], "--out", tmp_path / "upload.json"]
    argv += ["--repeats", 1, "--naive-repeats", 1, "--clients", 1, "--requests", 2, "--threads", 1]
    assert run_main("bench.benchmark_upload", argv, monkeypatch) == 0
    results = json.loads((tmp_path / "upload.json").read_text())
    assert {"end_to_end_p50_over_bare_p50", "uploads_per_s_over_bare_per_s", "met"} <= results["ratios"].keys()
    assert results["throughput"]["requests"] == 2 and results["fast_path_http_ms"]["model_gradcam"]["p50"] > 0


@runs("bench.load")
@pytest.mark.slow  # gunicorn under a flood of uploads
def test_load_floods_the_app(tiny_model_dir, tmp_path, monkeypatch):
    argv = ["flood", "--clients", 1, "--seconds", 2, "--model", tiny_model_dir, "--image", REAL_XRAYS[0]]
    assert run_main("bench.load", [*argv, "--out", tmp_path / "flood.json"], monkeypatch) == 0
    assert json.loads((tmp_path / "flood.json").read_text())


@runs("bench.bombs")
def test_bombs_are_refused_in_a_batch_and_one_alone(monkeypatch, capsys):
    assert run_main("bench.bombs", ["--batch"], monkeypatch) == 0
    batch = json.loads(capsys.readouterr().out)
    assert batch["status"] == 200 and batch["files"] == [400] * 10
    assert run_main("bench.bombs", ["--one", "png 16-bit 7700x7700"], monkeypatch) == 0
    assert json.loads(capsys.readouterr().out)["answer"].startswith("refused: ")


@runs("bench.sandbox_overhead")
def test_sandbox_overhead_times_both_sides(monkeypatch, capsys):
    argv = ["--image", str(REAL_XRAYS[0]), "--repeats", "3", "--display-side", "0"]
    assert run_main("bench.sandbox_overhead", argv, monkeypatch) == 0
    assert "the sandbox costs" in capsys.readouterr().out


@runs("bench.cpu_clocks")
def test_cpu_clocks_reads_both_clocks(monkeypatch, capsys):
    argv = ["--image", str(REAL_XRAYS[0]), "--seconds", "0.2", "--busy", "1", "--every", "1000"]
    assert run_main("bench.cpu_clocks", argv, monkeypatch) == 0
    assert "the kernel's clock" in capsys.readouterr().out


@runs("bench.onnx_layout")
def test_onnx_layout_compares_both_layouts(tiny_model_dir, monkeypatch, capsys):
    assert run_main("bench.onnx_layout", ["--model", tiny_model_dir, "--rounds", "2", "--batch", "2"], monkeypatch) == 0
    assert "without the transform" in capsys.readouterr().out
