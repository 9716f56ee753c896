"""The two architectures, the Grad-CAM layer choice and initial weights (--init)."""

from __future__ import annotations

import hashlib
import inspect
import os
import re
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
from builders import REPO
from keras import layers

from pneumonia.serving.keras_graphs import gradcam_layer_for
from pneumonia.serving.preprocessing import IMAGENET_NORMALIZATION, UNIT_NORMALIZATION
from pneumonia.training.architectures import (
    InitError,
    build_custom_cnn,
    build_densenet121,
    build_model,
    normalization_for,
    resolve_init,
)


@pytest.fixture(scope="module")
def densenet_32():
    return build_densenet121(32)


@pytest.fixture(scope="module")
def custom_32():
    return build_custom_cnn(32)


@pytest.mark.parametrize("which", ["densenet_32", "custom_32"])
def test_both_architectures_end_in_one_sigmoid_unit_after_a_logit_layer(which, request):
    model = request.getfixturevalue(which)
    assert model.input_shape == (None, 32, 32, 3)
    assert model.output_shape == (None, 1)
    logit, probability = model.get_layer("logit"), model.layers[-1]
    assert isinstance(logit, layers.Dense) and logit.units == 1
    assert probability.name == "probability" and probability.activation is keras.activations.sigmoid
    x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype("float32")
    logit_model = keras.Model(model.input, logit.output)
    np.testing.assert_allclose(np.asarray(model(x)), 1 / (1 + np.exp(-np.asarray(logit_model(x)))), atol=1e-5)


def test_custom_cnn_is_the_seed_architecture(custom_32):
    kinds = [type(layer).__name__ for layer in custom_32.layers]
    assert kinds.count("Conv2D") == 2 and kinds.count("SeparableConv2D") == 8
    assert [layer.filters for layer in custom_32.layers if isinstance(layer, layers.SeparableConv2D)] == [
        32,
        32,
        64,
        64,
        128,
        128,
        256,
        256,
    ]
    assert kinds.count("MaxPooling2D") == 5 and kinds.count("BatchNormalization") == 7
    # moving statistics that catch up within ~100 steps (see models.BN_MOMENTUM and test_training)
    assert {layer.momentum for layer in custom_32.layers if isinstance(layer, layers.BatchNormalization)} == {0.9}
    assert [layer.units for layer in custom_32.layers if isinstance(layer, layers.Dense)] == [512, 128, 64, 1]
    after_flatten = custom_32.layers[kinds.index("Flatten") :]
    assert [layer.rate for layer in after_flatten if isinstance(layer, layers.Dropout)] == [0.7, 0.5, 0.3]
    assert [layer.rate for layer in custom_32.layers if isinstance(layer, layers.Dropout)][:2] == [0.2, 0.2]


def test_normalization_per_architecture():
    assert normalization_for("densenet121") == IMAGENET_NORMALIZATION
    assert normalization_for("custom") == UNIT_NORMALIZATION


def test_build_model_checks_architecture_and_init():
    with pytest.raises(InitError, match="--init none"):
        build_model("custom", 32, {"kind": "imagenet", "file": "x.h5"})
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model("resnet", 32, {"kind": "none"})
    assert build_model("custom", 32, {"kind": "none"}).name == "custom_cnn"


@pytest.mark.parametrize("size, layer, cells", [(128, "pool4_relu", 8), (224, "relu", 7)])
def test_densenet_gradcam_layer_has_at_least_7x7_cells(size, layer, cells):
    model = build_densenet121(size)
    name = gradcam_layer_for(model)
    assert name == layer
    assert tuple(model.get_layer(name).output.shape[1:3]) == (cells, cells)


def test_custom_gradcam_layer_is_the_last_map_of_at_least_7x7(custom_32):
    name = gradcam_layer_for(custom_32)
    assert name == "block64_conv2" and tuple(custom_32.get_layer(name).output.shape[1:3]) == (8, 8)
    later = custom_32.layers[[layer.name for layer in custom_32.layers].index(name) + 1 :]
    later_convs = [layer for layer in later if isinstance(layer, layers.SeparableConv2D)]
    assert later_convs and all(layer.output.shape[1] < 7 for layer in later_convs)


def test_gradcam_layer_needs_a_7x7_map():
    inputs = keras.Input((6, 6, 3))
    model = keras.Model(inputs, layers.Dense(1, name="logit")(layers.Flatten()(layers.Conv2D(2, 3)(inputs))))
    with pytest.raises(ValueError, match="7x7"):
        gradcam_layer_for(model)


def test_init_none_and_local_files(tmp_path):
    assert resolve_init("none")["kind"] == "none" and "file" not in resolve_init("none")
    weights = tmp_path / "densenet.h5"
    weights.write_bytes(b"weights")
    init = resolve_init(str(weights))
    assert init["kind"] == "file" and init["file"] == str(weights)
    assert init["sha256"] == hashlib.sha256(b"weights").hexdigest()
    with pytest.raises(InitError, match="no such weights file") as caught:
        resolve_init(str(tmp_path / "missing.h5"))
    assert "--init none" in str(caught.value)


def test_init_imagenet_offline_says_what_to_do_instead(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(keras.utils, "get_file", offline)
    with pytest.raises(InitError) as caught:
        resolve_init("imagenet")
    message = str(caught.value)
    assert "--init none" in message and "--init PATH" in message
    assert "name resolution" in message and "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5" in message


def test_init_imagenet_asks_keras_for_the_file_keras_itself_verifies(monkeypatch, tmp_path):
    """The notop file's checksum must be the one keras.applications.DenseNet121 uses, or a
    good download would be rejected as corrupt."""
    requested = {}
    downloaded = tmp_path / "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5"
    downloaded.write_bytes(b"pretend weights")

    def fake_get_file(fname, origin, **kwargs):
        requested.update(kwargs, fname=fname, origin=origin)
        return str(downloaded)

    monkeypatch.setattr(keras.utils, "get_file", fake_get_file)
    init = resolve_init("imagenet")
    assert init["kind"] == "imagenet" and init["file"] == str(downloaded)
    assert init["sha256"] == hashlib.sha256(b"pretend weights").hexdigest()
    from keras.src.applications import densenet

    keras_call = re.search(
        r'"densenet121_weights_tf_dim_ordering_tf_kernels_notop\.h5",\s*'
        r'DENSENET121_WEIGHT_PATH_NO_TOP,\s*cache_subdir="models",\s*file_hash="([0-9a-f]+)"',
        inspect.getsource(densenet),
    )
    assert keras_call is not None
    assert requested["file_hash"] == keras_call.group(1)
    assert requested["fname"] == "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5"
    assert requested["origin"].endswith(requested["fname"])


@pytest.mark.parametrize("file_format", ["keras3", "legacy_h5"])
def test_init_path_loads_a_densenet121_weights_file(densenet_32, tmp_path, file_format):
    """A DenseNet121 body saved to a file (as the ImageNet notop file is, in the legacy
    format) is what the model starts from with --init PATH."""
    body = keras.applications.DenseNet121(include_top=False, weights=None, input_shape=(32, 32, 3))
    rng = np.random.default_rng(0)
    for layer_name in ("conv1_conv", "conv5_block16_2_conv", "bn"):
        layer = body.get_layer(layer_name)
        layer.set_weights([rng.normal(0, 1, w.shape).astype("float32") for w in layer.get_weights()])
    if file_format == "keras3":
        path = tmp_path / "body.weights.h5"
        body.save_weights(path)
    else:
        import h5py
        from keras.src.legacy.saving import legacy_h5_format

        path = tmp_path / "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5"
        with h5py.File(path, "w") as handle:
            legacy_h5_format.save_weights_to_hdf5_group(handle, body)

    init = resolve_init(str(path))
    model = build_model("densenet121", 32, init)
    for layer_name in ("conv1_conv", "conv5_block16_2_conv", "bn"):
        for loaded, saved, fresh in zip(
            model.get_layer(layer_name).get_weights(),
            body.get_layer(layer_name).get_weights(),
            densenet_32.get_layer(layer_name).get_weights(),
        ):
            np.testing.assert_array_equal(loaded, saved)
            assert not np.array_equal(loaded, fresh)


def test_training_the_custom_cnn_with_pretrained_weights_stops_before_any_download(monkeypatch, tmp_path):
    from pneumonia.training.config import TrainConfig
    from pneumonia.training.fitting import train

    def no_download(*args, **kwargs):
        raise AssertionError("tried to download weights the custom CNN cannot use")

    monkeypatch.setattr(keras.utils, "get_file", no_download)
    with pytest.raises(InitError, match="--init none"):
        train(TrainConfig(data_dir=str(tmp_path), arch="custom", init="imagenet", out=str(tmp_path / "out")))


def test_cli_train_with_imagenet_offline_exits_promptly_with_the_alternatives(tmp_path, synthetic_data_dir):
    """No network: every proxy points at a closed local port, and KERAS_HOME is empty, so
    Keras must try to download (and fails at once)."""
    env = {
        **os.environ,
        "KERAS_HOME": str(tmp_path / "keras_home"),
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "PYTHONPATH": str(REPO),
    }
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "all_proxy"):
        env[name] = "http://127.0.0.1:9"
    env.pop("no_proxy", None)
    env.pop("NO_PROXY", None)
    started = time.monotonic()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pneumonia",
            "train",
            str(synthetic_data_dir),
            "--arch",
            "densenet121",
            "--init",
            "imagenet",
            "--image-size",
            "32",
            "--epochs",
            "1",
            "--out",
            str(tmp_path / "run"),
            "--no-cache",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    elapsed = time.monotonic() - started
    if result.returncode == 0:
        pytest.skip("the ImageNet weights were downloaded after all (network reachable despite the proxy)")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "--init none" in result.stderr and "--init PATH" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "model.json").exists()
    assert not list((tmp_path / "run").glob("**/*.keras"))  # stopped before training anything
    assert elapsed < 120
