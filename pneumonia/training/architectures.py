"""The two architectures: DenseNet121 (the product) and the seed's 14-layer custom CNN.

Both end in Dense(1) named "logit" and a sigmoid named "probability": one sigmoid unit,
with the logit reachable for Grad-CAM and calibration.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import keras
from keras import layers

from pneumonia.serving.preprocessing import IMAGENET_NORMALIZATION, UNIT_NORMALIZATION
from pneumonia.training.config import ARCHITECTURES


class InitError(RuntimeError):
    """The requested initial weights cannot be had; the message says what to do instead."""


def normalization_for(arch: str) -> dict:
    """DenseNet121 keeps ImageNet statistics so `--init imagenet` and a local file just work."""
    return IMAGENET_NORMALIZATION if arch == "densenet121" else UNIT_NORMALIZATION


def _classifier_head(features, dropout: float = 0.0):
    if dropout:
        features = layers.Dropout(dropout, name="head_dropout")(features)
    logit = layers.Dense(1, name="logit")(features)
    return layers.Activation("sigmoid", dtype="float32", name="probability")(logit)


def _imagenet_weights_or_stop() -> str:
    """Fetches the Keras DenseNet121 notop file, or stops with the alternatives."""
    try:
        return keras.utils.get_file(
            "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5",
            "https://storage.googleapis.com/tensorflow/keras-applications/densenet/"
            "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5",
            cache_subdir="models",
            file_hash="30ee3e1110167f948a6b9946edeeb738",  # as keras.applications.DenseNet121 checks it
        )
    except Exception as err:  # no network, proxy, DNS: all end the same way
        raise InitError(
            "Could not download the ImageNet weights for DenseNet121 "
            f"({type(err).__name__}: {err}).\n"
            "Use one of:\n"
            "  --init none         train from random initialisation\n"
            "  --init PATH         a local DenseNet121 weights file "
            "(densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5), or a trained .keras model to start from"
        ) from None


def check_init_fits(arch: str, init: str) -> None:
    """The custom CNN starts from random weights or from a trained custom CNN (a warm start); checked
    before anything is downloaded."""
    if arch == "custom" and init != "none" and not init.endswith(".keras"):
        raise InitError("The custom CNN has no pretrained weights: use --init none (or a trained custom .keras).")


def resolve_init(init: str, arch: str = "densenet121") -> dict:
    """'imagenet' | 'none' | a path -> what the card records: kind, and file + sha256."""
    check_init_fits(arch, init)
    if init == "none":
        return {"kind": "none", "description": "random initialisation (no pretrained weights)"}
    if init == "imagenet":
        path = Path(_imagenet_weights_or_stop())
        kind, description = "imagenet", "ImageNet weights downloaded by Keras"
    else:
        path = Path(init)
        if not path.is_file():
            raise InitError(f"--init {init}: no such weights file. Use --init none, imagenet or a path to a file.")
        kind, description = "file", f"local weights file {path.name}"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return {"kind": kind, "description": description, "file": str(path), "sha256": digest}


def build_densenet121(image_size: int, weights_file: str | None = None) -> keras.Model:
    inputs = keras.Input((image_size, image_size, 3), name="xray")
    backbone = keras.applications.DenseNet121(include_top=False, weights=None, input_tensor=inputs)
    if weights_file and not str(weights_file).endswith(".keras"):
        backbone.load_weights(weights_file)
    features = layers.GlobalAveragePooling2D(name="avg_pool")(backbone.output)
    model = keras.Model(inputs, _classifier_head(features), name="densenet121")
    return warm_started(model, weights_file)


def warm_started(model: keras.Model, weights_file: str | None) -> keras.Model:
    """`model` with the weights of a trained model of this package (head included) when `weights_file`
    is a `.keras` file. Convolution weights do not depend on the input size, so it may have been
    trained at another size."""
    if weights_file and str(weights_file).endswith(".keras"):
        model.set_weights(keras.saving.load_model(weights_file, compile=False).get_weights())
    return model


# The custom CNN's BatchNormalization moving averages. Keras' default 0.99 needs ~1,000 steps to
# forget its initial moving variance of 1, while this network's first activations have variances
# of 1e-3..1e-5 (greyscale X-rays scaled to 0..1): until then every inference-mode output is
# squeezed to one value, and on the Kaggle data validation accuracy sat at the class prior and
# validation loss rose for the first epochs while the training AUC was 0.98. 0.9 (PyTorch's
# default, momentum=0.1 there) tracks the batch statistics within ~100 steps.
BN_MOMENTUM = 0.9


def build_custom_cnn(image_size: int) -> keras.Model:
    """The seed's baseline, block for block (BatchNormalization momentum: see BN_MOMENTUM)."""
    inputs = keras.Input((image_size, image_size, 3), name="xray")
    x = layers.Conv2D(16, 3, activation="relu", padding="same")(inputs)
    x = layers.Conv2D(16, 3, activation="relu", padding="same")(x)
    x = layers.MaxPooling2D()(x)
    for filters in (32, 64, 128, 256):
        x = layers.SeparableConv2D(filters, 3, activation="relu", padding="same")(x)
        x = layers.SeparableConv2D(filters, 3, activation="relu", padding="same", name=f"block{filters}_conv2")(x)
        x = layers.BatchNormalization(momentum=BN_MOMENTUM)(x)
        x = layers.MaxPooling2D()(x)
        if filters >= 128:
            x = layers.Dropout(0.2)(x)
    x = layers.Flatten()(x)
    for units, rate in ((512, 0.7), (128, 0.5), (64, 0.3)):
        x = layers.Dense(units, activation="relu")(x)
        x = layers.BatchNormalization(momentum=BN_MOMENTUM)(x)
        x = layers.Dropout(rate)(x)
    return keras.Model(inputs, _classifier_head(x), name="custom_cnn")


def build_model(arch: str, image_size: int, init: dict) -> keras.Model:
    if arch == "densenet121":
        return build_densenet121(image_size, init.get("file"))
    if arch == "custom":
        check_init_fits(arch, init.get("file", init["kind"]))
        return warm_started(build_custom_cnn(image_size), init.get("file"))
    raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHITECTURES)}")
