"""pneumonia/serving/runtime.py: which runtime serves, what a missing, stale or corrupt export says at
start-up (never a 500 on a request), the same answers on both, and serving without TensorFlow."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from builders import REAL_XRAYS, REPO, SHIPPED_MODEL, probability_of, upload, xray_jpeg

from pneumonia.serving.classifier import ModelLoadError, XrayClassifier
from pneumonia.serving.runtime import RUNTIME_ENV, SPINNING_DEFAULT, SPINNING_ENV, WEIGHTS_FILE

# What only training, evaluation plots and studies need: the serving path must not import them.
TRAINING_ONLY = ("tensorflow", "keras", "tf2onnx", "onnx", "sklearn", "scipy", "matplotlib", "h5py")


def copy_model(source, tmp_path, name="model"):
    return shutil.copytree(source, tmp_path / name, ignore=shutil.ignore_patterns("checkpoints"))


def edit_card(folder, change) -> None:
    card = json.loads((folder / "model.json").read_text())
    change(card)
    (folder / "model.json").write_text(json.dumps(card))


def test_auto_serves_the_current_export_and_keras_without_one(ungated_model_dir, gap_model_dir, monkeypatch):
    monkeypatch.delenv(RUNTIME_ENV, raising=False)
    exported = XrayClassifier(ungated_model_dir)
    assert exported.runtime.name == "onnx" and exported.serving()["export_sha256"]
    plain = XrayClassifier(gap_model_dir)  # saved without `train`: no export
    assert plain.runtime.name == "keras" and "has no ONNX export" in plain.serving()["note"]
    monkeypatch.setenv(RUNTIME_ENV, "keras")
    assert XrayClassifier(ungated_model_dir).runtime.name == "keras"


def test_both_runtimes_give_the_same_answers_through_the_app(ungated_model_dir):
    from pneumonia.web import create_app

    data = xray_jpeg(400, 320, seed=3)
    bodies = {}
    for runtime in ("onnx", "keras"):
        client = create_app({"MODEL_PATH": str(ungated_model_dir), "RUNTIME": runtime, "TESTING": True}).test_client()
        assert client.get("/healthz").get_json()["serving"]["runtime"] == runtime
        response = client.post("/api/predict", data=upload(data))
        assert response.status_code == 200, response.get_data(as_text=True)
        bodies[runtime] = response.get_json()
    assert bodies["onnx"]["probability"] == pytest.approx(bodies["keras"]["probability"], abs=1e-5)
    assert bodies["onnx"]["label"] == bodies["keras"]["label"]
    assert bodies["onnx"]["gradcam"] == bodies["keras"]["gradcam"]


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda folder: edit_card(folder, lambda c: c["export"].update(keras_sha256="0" * 64)), "made from another"),
        (lambda folder: (folder / WEIGHTS_FILE).write_bytes(b"truncated"), "not the one the card records"),
        (lambda folder: (folder / WEIGHTS_FILE).unlink(), "is missing"),
        (lambda folder: edit_card(folder, lambda c: c.pop("export")), "has no ONNX export"),
    ],
    ids=["stale", "corrupt", "missing-file", "no-export"],
)
def test_asking_for_onnx_with_a_bad_export_is_a_start_up_message_naming_export(
    ungated_model_dir, tmp_path, damage, message
):
    from pneumonia.web import create_app

    folder = copy_model(ungated_model_dir, tmp_path)
    damage(folder)
    with pytest.raises(ModelLoadError, match=message) as raised:
        XrayClassifier(folder, runtime="onnx")
    assert "pneumonia export" in str(raised.value)
    client = create_app({"MODEL_PATH": str(folder), "RUNTIME": "onnx", "TESTING": True}).test_client()
    health = client.get("/healthz")
    assert health.status_code == 503 and message in health.get_json()["reason"]
    response = client.post("/api/predict", data=upload(xray_jpeg()))
    assert response.status_code == 503 and "pneumonia export" in response.get_json()["error"]
    # Unasked, a bad export falls back to Keras and says why.
    assert XrayClassifier(folder).runtime.name == "keras"


def test_an_export_onnx_runtime_cannot_load_is_a_start_up_message(ungated_model_dir, tmp_path):
    """A graph file the card's fingerprint vouches for, yet not ONNX: ONNX Runtime's refusal, named."""
    from pneumonia.serving.card import file_sha256

    folder = copy_model(ungated_model_dir, tmp_path)
    explain = folder / "explain.onnx"
    explain.write_bytes(b"\x08\x07not a protobuf graph")
    edit_card(folder, lambda c: c["export"]["files"]["explain"].update(sha256=file_sha256(explain)))
    with pytest.raises(ModelLoadError, match="ONNX Runtime could not load .*explain.onnx"):
        XrayClassifier(folder, runtime="onnx")


def test_spinning_is_a_setting_and_a_wrong_value_is_named(ungated_model_dir, monkeypatch):
    monkeypatch.delenv(SPINNING_ENV, raising=False)
    default = XrayClassifier(ungated_model_dir, runtime="onnx").runtime
    assert default.spinning is SPINNING_DEFAULT
    monkeypatch.setenv(SPINNING_ENV, "1" if not SPINNING_DEFAULT else "0")
    other = XrayClassifier(ungated_model_dir, runtime="onnx").runtime
    assert other.spinning is not SPINNING_DEFAULT
    for runtime in (default, other):  # what ONNX Runtime was told: spin or not, and never between calls
        for session in runtime.sessions.values():
            options = session.get_session_options()
            assert options.get_session_config_entry("session.intra_op.allow_spinning") == str(int(runtime.spinning))
            assert options.get_session_config_entry("session.force_spinning_stop") == "1"
    inputs = np.zeros((1, default.image_size, default.image_size, 3), np.float32)
    assert default.explain(inputs)[0] == pytest.approx(other.explain(inputs)[0], abs=1e-6)
    monkeypatch.setenv(SPINNING_ENV, "sometimes")
    with pytest.raises(ModelLoadError, match="PNEUMONIA_RUNTIME_SPINNING=sometimes: say 1 or 0"):
        XrayClassifier(ungated_model_dir, runtime="onnx")


def test_an_unknown_runtime_is_named(ungated_model_dir):
    with pytest.raises(ModelLoadError, match="PNEUMONIA_RUNTIME=tpu: choose one of onnx, keras"):
        XrayClassifier(ungated_model_dir, runtime="tpu")


def test_the_model_page_says_which_runtime_serves(shipped_app):
    page = shipped_app.test_client().get("/model").get_data(as_text=True)
    assert 'id="runtime">onnx<' in page and "checked at start-up" in page


BLOCK_TRAINING_ONLY = textwrap.dedent(
    f"""
    import sys
    for name in {TRAINING_ONLY!r}:
        sys.modules[name] = None  # `import name` now raises ImportError, as in the slim install
    sys.path.insert(0, "tests")  # builders
    """
)


def run_without_training_packages(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCK_TRAINING_ONLY + textwrap.dedent(code)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_app_serves_the_shipped_model_without_tensorflow():
    result = run_without_training_packages(
        f"""
        from builders import upload
        from app import app
        client = app.test_client()
        health = client.get("/healthz").get_json()
        assert health["ready"] and health["serving"]["runtime"] == "onnx", health
        response = client.post("/api/predict", data=upload(open({str(REAL_XRAYS[1])!r}, "rb").read()))
        assert response.status_code == 200, response.get_data(as_text=True)
        assert response.get_json()["gradcam_jpeg"]
        batch = client.post("/api/predict/batch", data={{"file": [(open({str(REAL_XRAYS[0])!r}, "rb"), "a.jpeg")]}})
        assert batch.status_code == 200 and batch.get_json()[0]["status"] == 200, batch.get_data(as_text=True)
        assert client.get("/model").status_code == 200
        print("served", response.get_json()["probability"])
        """
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "served" in result.stdout


def test_predict_runs_without_tensorflow(tmp_path):
    table = tmp_path / "rows.csv"
    result = run_without_training_packages(
        f"""
        from pneumonia.cli import main
        raise SystemExit(main(["predict", *{[str(p) for p in REAL_XRAYS]!r}, "--csv", {str(table)!r}, "--json"]))
        """
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == len(REAL_XRAYS) and all(0 <= line["probability"] <= 1 for line in lines)
    shipped = XrayClassifier(SHIPPED_MODEL, runtime="keras")
    expected = [probability_of(shipped, path) for path in REAL_XRAYS]
    np.testing.assert_allclose([line["probability"] for line in lines], expected, atol=1e-5)
    assert len(table.read_text().splitlines()) == len(REAL_XRAYS) + 1


def test_asking_for_keras_without_tensorflow_says_what_to_install(ungated_model_dir):
    result = run_without_training_packages(
        f"""
        from pneumonia.serving.classifier import ModelLoadError, XrayClassifier
        try:
            XrayClassifier({str(ungated_model_dir)!r}, runtime="keras")
        except ModelLoadError as err:
            print(err)
        """
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "needs TensorFlow" in result.stdout and "requirements-train.txt" in result.stdout
