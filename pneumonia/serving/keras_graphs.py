"""The two graphs a model is served by, traced from its Keras file with TensorFlow.

    explain  float32 (1, S, S, 3) -> logit (1,), signed Grad-CAM (1, h, w), pooled features (1, d)
    forward  float32 (N, S, S, 3) -> pooled features (N, d), logits (N,)

`pneumonia export` converts both to ONNX (what the app serves with ONNX Runtime); the `keras`
runtime runs these same traced functions, so both runtimes compute one definition.

Grad-CAM (the keras.io recipe, of the logit rather than the saturating probability):

    feature map A (1, h, w, c) ──rest of the model──> pooled (1, d) ──Dense──> logit (1, 1)
    weights_c = mean_hw(d logit / d A)_c                          (1, c)
    cam = sum_c weights_c * A_c                                   (1, h, w), signed

Why the layers are swapped while tracing: tf2onnx has no conversion for the gradient ops
TensorFlow emits for ReLU (`ReluGrad`), 2x2 average pooling (`AvgPoolGrad`), max pooling
(`MaxPoolGrad`), a depthwise convolution (`DepthwiseConv2dNativeBackpropInput`, in the custom
CNN's separable convolutions), and at some input sizes a convolution's input gradient (its
`ShapeN`). A ReLU with its gradient written out (`dy * (x > 0)`), the poolings written as reshape
+ mean / max, and stride-1 "same" convolutions whose input gradient is written as the convolution
with the kernel flipped (and, for a full convolution, its channels swapped) compute the same
values and differentiate into ops ONNX has.
"""

from __future__ import annotations

import contextlib

import keras
import tensorflow as tf
from keras import layers


@tf.custom_gradient
def _relu(x):
    def gradient(dy):
        return dy * tf.cast(x > 0, dy.dtype)

    return tf.nn.relu(x), gradient


def _pool_2x2(reduce):
    def pool(x, *args, **kwargs):  # valid 2x2 pooling, stride 2: (N, H, W, C) -> (N, H//2, W//2, C)
        height, width, channels = x.shape[1] // 2, x.shape[2] // 2, x.shape[3]
        if (2 * height, 2 * width) != tuple(x.shape[1:3]):  # odd sides: valid pooling drops the last row, column
            x = x[:, : 2 * height, : 2 * width]
        return reduce(tf.reshape(x, [-1, height, 2, width, 2, channels]), axis=[2, 4])

    return pool


def _is_2x2_pool(layer) -> bool:
    return tuple(layer.pool_size) == (2, 2) and tuple(layer.strides) == (2, 2) and layer.padding == "valid"


def _depthwise_same(x, kernel):
    """Depthwise convolution, stride 1, "same" padding, odd kernel (kh, kw, C, 1), with its input gradient."""

    @tf.custom_gradient
    def depthwise(x):
        def gradient(dy):
            return tf.nn.depthwise_conv2d(dy, kernel[::-1, ::-1], [1, 1, 1, 1], "SAME")

        return tf.nn.depthwise_conv2d(x, kernel, [1, 1, 1, 1], "SAME"), gradient

    return depthwise(x)


def _conv_same(x, kernel):
    """Convolution, stride 1, "same" padding, odd kernel (kh, kw, C_in, C_out), with its input gradient."""

    @tf.custom_gradient
    def conv(x):
        def gradient(dy):
            return tf.nn.conv2d(dy, tf.transpose(kernel[::-1, ::-1], [0, 1, 3, 2]), 1, "SAME")

        return tf.nn.conv2d(x, kernel, 1, "SAME"), gradient

    return conv(x)


def _is_plain_conv(layer) -> bool:
    """A Conv2D whose "same" stride-1 form is exact: for a 1x1 kernel "valid" is the same."""
    return (
        type(layer) is layers.Conv2D
        and all(k % 2 == 1 for k in layer.kernel_size)
        and tuple(layer.strides) == (1, 1)
        and tuple(layer.dilation_rate) == (1, 1)
        and layer.groups == 1
        and layer.data_format == "channels_last"
        and (layer.padding == "same" or tuple(layer.kernel_size) == (1, 1))
    )


def _conv_call(layer):
    def call(x, *args, **kwargs):  # (N, H, W, C) -> (N, H, W, filters)
        y = _conv_same(x, tf.convert_to_tensor(layer.kernel))
        if layer.use_bias:
            y = y + layer.bias
        return layer.activation(y) if layer.activation is not None else y

    return call


def _is_plain_separable(layer) -> bool:
    return (
        isinstance(layer, layers.SeparableConv2D)
        and tuple(layer.strides) == (1, 1)
        and tuple(layer.dilation_rate) == (1, 1)
        and layer.padding == "same"
        and layer.depth_multiplier == 1
        and all(k % 2 == 1 for k in layer.kernel_size)
    )


def _separable_call(layer):
    def call(x, *args, **kwargs):  # (N, H, W, C) -> (N, H, W, filters)
        y = _depthwise_same(x, tf.convert_to_tensor(layer.depthwise_kernel))
        y = tf.nn.conv2d(y, layer.pointwise_kernel, 1, "VALID")
        if layer.use_bias:
            y = y + layer.bias
        return layer.activation(y) if layer.activation is not None else y

    return call


@contextlib.contextmanager
def convertible_layers(model: keras.Model):
    """Within the block the model's ReLUs and 2x2 poolings trace into convertible ops (see above)."""
    patched = []
    for layer in model.layers:
        if getattr(layer, "activation", None) is keras.activations.relu:
            patched.append((layer, "activation", layer.activation))
            layer.activation = _relu
        if _is_plain_separable(layer) or _is_plain_conv(layer):
            patched.append((layer, "call", None))
            layer.call = (_separable_call if _is_plain_separable(layer) else _conv_call)(layer)
        elif isinstance(layer, (layers.AveragePooling2D, layers.MaxPooling2D)) and _is_2x2_pool(layer):
            reduce = tf.reduce_mean if isinstance(layer, layers.AveragePooling2D) else tf.reduce_max
            patched.append((layer, "call", None))
            layer.call = _pool_2x2(reduce)
    try:
        yield
    finally:
        for layer, attribute, original in patched:
            if original is None:
                del layer.__dict__[attribute]
            else:
                setattr(layer, attribute, original)


def features_and_logit_model(model: keras.Model) -> keras.Model:
    """The model's input -> [pooled features that feed the logit (N, d), logit (N, 1)].

    `input`, not `inputs`: called with a plain array, a one-element input list warns on every call.
    """
    logit = model.get_layer("logit")
    return keras.Model(model.input, [logit.input, logit.output])


def explain_function(model: keras.Model, layer: str, image_size: int):
    """The traced explain graph: one input "xray", outputs "logit", "cam" and "features"."""
    logit_layer = model.get_layer("logit")
    grad_model = keras.Model(model.input, [model.get_layer(layer).output, logit_layer.input, logit_layer.output])

    @tf.function(input_signature=[tf.TensorSpec((1, image_size, image_size, 3), tf.float32, name="xray")])
    def explain(xray):
        with tf.GradientTape() as tape:
            feature_map, pooled, logit = grad_model(xray, training=False)  # (1, h, w, c), (1, d), (1, 1)
        grads = tape.gradient(logit, feature_map)  # (1, h, w, c)
        weights = tf.reduce_mean(grads, axis=(1, 2))  # (1, c)
        # (1, h, w); multiply + sum: an einsum did not convert to OpenVINO
        cam = tf.reduce_sum(feature_map * weights[:, None, None, :], axis=-1)
        return {"logit": tf.reshape(logit, [1]), "cam": cam, "features": pooled}

    with convertible_layers(model):
        explain.get_concrete_function()
    return explain


def forward_function(model: keras.Model, image_size: int):
    """The traced forward graph: "xray" (any batch) -> "features" (N, d), "logits" (N,)."""
    feature_model = features_and_logit_model(model)

    @tf.function(input_signature=[tf.TensorSpec((None, image_size, image_size, 3), tf.float32, name="xray")])
    def forward(xray):
        features, logits = feature_model(xray, training=False)
        return {"features": features, "logits": tf.reshape(logits, [-1])}

    forward.get_concrete_function()
    return forward


def gradcam_layer_for(model: keras.Model) -> str:
    """The last activated feature map with at least 7x7 cells.

    DenseNet121 at 224 px: the final 7x7 `relu`; at 128 px that map is 4x4, so the 8x8
    `pool4_relu` (dense block 4's input) is taken. 1x1 transition convolutions are skipped:
    they only mix the channels of the activation before them.
    """
    best = None
    for layer in model.layers:
        shape = getattr(getattr(layer, "output", None), "shape", None)
        if shape is None or len(shape) != 4 or shape[1] < 7 or shape[2] < 7:
            continue
        is_conv = isinstance(layer, (layers.Conv2D, layers.SeparableConv2D)) and max(layer.kernel_size) > 1
        if is_conv or isinstance(layer, (layers.Activation, layers.ReLU, layers.Concatenate)):
            best = layer.name
    if best is None:
        raise ValueError("model has no feature map of at least 7x7")
    return best
