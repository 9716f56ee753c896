"""`pneumonia export MODEL_DIR`: the model's two serving graphs as ONNX, beside its `.keras` file.

    explain.onnx   batch 1:   "xray" -> "logit" (1,), "cam" (1, h, w), "features" (1, d)
    forward.onnx   any batch: "xray" -> "features" (N, d), "logits" (N,)
    weights.onnx.data         the weights of both, each tensor stored once (ONNX external data)

The card's `export` section records each file's sha256 and the sha256 of the `.keras` file they were
made from: the `onnx` runtime serves them only while that fingerprint matches (`pneumonia.serving.runtime`).
Before anything is written, both graphs are run by ONNX Runtime on synthetic X-rays and compared
with the traced Keras functions; an export that disagrees is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
from pathlib import Path

import numpy as np

from pneumonia.serving.card import Export, ExportFile, file_sha256, write_card
from pneumonia.serving.runtime import EXPLAIN_FILE, FORWARD_FILE, ONNX_OPSET, WEIGHTS_FILE

# How far the export may differ from Keras and still be served (float32 graphs, reordered sums).
TOLERANCE = {"logit": 1e-4, "cam_relative": 1e-4, "features": 1e-4}
EXTERNAL_MIN_BYTES = 1024  # smaller tensors stay inside the graph file
_FILES = {"explain": EXPLAIN_FILE, "forward": FORWARD_FILE, "weights": WEIGHTS_FILE}


class ExportError(RuntimeError):
    """The model cannot be exported, or its export disagrees with Keras; the message says which."""


def export(model_dir: str | Path, log=print) -> dict:
    """Writes the ONNX files into the model folder and the `export` section into its card; returns it."""
    import keras
    import onnx
    import tensorflow as tf
    import tf2onnx

    from pneumonia.serving.classifier import find_card
    from pneumonia.serving.keras_graphs import convertible_layers, explain_function, forward_function

    keras_path, card = find_card(model_dir)
    folder = keras_path.parent
    model = keras.saving.load_model(keras_path, compile=False)
    size, layer = card.preprocessing.image_size, card.gradcam.layer
    graphs = {"explain": explain_function(model, layer, size), "forward": forward_function(model, size)}
    protos = {}
    for name, function in graphs.items():
        log(f"converting the {name} graph to ONNX (opset {ONNX_OPSET})")
        signature = [function.input_signature[0]]
        with convertible_layers(model):
            protos[name], _ = tf2onnx.convert.from_function(function, input_signature=signature, opset=ONNX_OPSET)
    staging = folder / f".export-{os.getpid()}"  # same file system: the files are renamed into place
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        _write_onnx(protos, staging)
        agreement = _compare_with_keras(graphs, staging, size, log)
        for file in _FILES.values():
            os.replace(staging / file, folder / file)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    section = Export(
        format="ONNX",
        opset=ONNX_OPSET,
        keras_sha256=file_sha256(keras_path),
        files={name: ExportFile(file, file_sha256(folder / file)) for name, file in _FILES.items()},
        gradcam_layer=layer,
        agreement_with_keras=agreement,
        versions={"tensorflow": tf.__version__, "tf2onnx": tf2onnx.__version__, "onnx": onnx.__version__},
    )
    write_card(folder, dataclasses.replace(card, export=section))
    log(f"wrote {', '.join(_FILES.values())} in {folder} and the card's export section")
    return section


def _write_onnx(protos: dict, folder: Path) -> None:
    """The graph files and their shared weights file: each tensor of more than a kilobyte is stored
    once (the explain graph holds every weight of the forward graph)."""
    import onnx
    from onnx import external_data_helper

    stored: dict[bytes, tuple[int, int]] = {}  # sha256 of a tensor's bytes -> (offset, length)
    with (folder / WEIGHTS_FILE).open("wb") as weights:
        for proto in protos.values():
            for tensor in proto.graph.initializer:
                raw = onnx.numpy_helper.to_array(tensor).tobytes()
                if len(raw) < EXTERNAL_MIN_BYTES:
                    continue
                key = hashlib.sha256(raw).digest()
                if key not in stored:
                    stored[key] = (weights.tell(), len(raw))
                    weights.write(raw)
                offset, length = stored[key]
                for field in ("float_data", "int32_data", "int64_data", "double_data"):
                    tensor.ClearField(field)
                tensor.raw_data = raw  # set_external_data asks for it, then the graph file drops it
                external_data_helper.set_external_data(tensor, WEIGHTS_FILE, offset=offset, length=length)
                tensor.data_location = onnx.TensorProto.EXTERNAL
                tensor.ClearField("raw_data")
    for name, proto in protos.items():
        (folder / _FILES[name]).write_bytes(proto.SerializeToString())


def synthetic_inputs(size: int, count: int = 4, seed: int = 0) -> np.ndarray:
    """float32 (count, S, S, 3) around the ImageNet-normalised range: smooth chests and noise."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:size, 0:size] / size
    images = []
    for _ in range(count):
        lungs = np.exp(-(((cols - 0.3) / 0.15) ** 2 + ((rows - 0.5) / 0.3) ** 2))
        lungs += np.exp(-(((cols - 0.7) / 0.15) ** 2 + ((rows - 0.5) / 0.3) ** 2))
        grey = 0.8 - 0.6 * lungs + 0.1 * rng.standard_normal((size, size))
        images.append(np.repeat(((grey - 0.45) / 0.225)[..., None], 3, axis=-1))
    return np.asarray(images, np.float32)


def _compare_with_keras(graphs: dict, folder: Path, size: int, log) -> dict:
    """Runs the ONNX files in `folder` and the Keras functions on the same inputs; raises ExportError when apart."""
    import onnxruntime

    sessions = {}
    for name in ("explain", "forward"):
        try:
            sessions[name] = onnxruntime.InferenceSession(
                str(folder / _FILES[name]), providers=["CPUExecutionProvider"]
            )
        except Exception as err:  # an op tf2onnx left unconverted, for one
            raise ExportError(f"ONNX Runtime cannot load the converted {name} graph: {err}") from None
    inputs = synthetic_inputs(size)
    worst = {"logit": 0.0, "cam_relative": 0.0, "features": 0.0}
    onnx_forward = dict(zip(["features", "logits"], sessions["forward"].run(["features", "logits"], {"xray": inputs})))
    keras_forward = {k: v.numpy() for k, v in graphs["forward"](inputs).items()}
    worst["logit"] = float(np.abs(onnx_forward["logits"] - keras_forward["logits"]).max())
    worst["features"] = float(np.abs(onnx_forward["features"] - keras_forward["features"]).max())
    for image in inputs:
        logit, cam, features = sessions["explain"].run(["logit", "cam", "features"], {"xray": image[None]})
        expected = {k: v.numpy() for k, v in graphs["explain"](image[None]).items()}
        worst["logit"] = max(worst["logit"], float(np.abs(logit - expected["logit"]).max()))
        scale = float(np.abs(expected["cam"]).max()) or 1.0
        worst["cam_relative"] = max(worst["cam_relative"], float(np.abs(cam - expected["cam"]).max()) / scale)
        worst["features"] = max(worst["features"], float(np.abs(features - expected["features"]).max()))
    log("largest difference from Keras: " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))
    apart = [k for k, v in worst.items() if v > TOLERANCE[k]]
    if apart:
        raise ExportError(f"the ONNX export disagrees with Keras beyond {TOLERANCE} in {', '.join(apart)}: {worst}")
    return {"inputs": f"{len(inputs)} synthetic X-rays", **worst}
