"""Training augmentation and the tf.data input pipeline: stored uint8 squares -> augmented,
normalised batches, through the same `normalize` that serving uses."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from keras import layers

from pneumonia.serving.preprocessing import normalize
from pneumonia.training.config import AUGMENTATIONS


def augmentation(seed: int):
    """Small geometric and photometric changes an X-ray can plausibly have; no flips
    (the heart is on the left)."""
    return keras.Sequential(
        [
            layers.RandomRotation(0.03, fill_mode="constant", seed=seed),  # about +-10 degrees
            layers.RandomTranslation(0.06, 0.06, fill_mode="constant", seed=seed + 1),
            layers.RandomZoom(0.1, fill_mode="constant", seed=seed + 2),
            layers.RandomBrightness(0.1, value_range=(0, 255), seed=seed + 3),
            layers.RandomContrast(0.15, seed=seed + 4),
        ],
        name="augmentation",
    )


def gaussian_blur(sigma: float):
    """(B, S, S, 1) -> the same batch blurred by a separable Gaussian of `sigma` pixels."""
    taps = np.exp(-0.5 * (np.arange(-3, 4) / sigma) ** 2)
    kernel_1d = (taps / taps.sum()).astype("float32")
    kernel_x = tf.constant(kernel_1d.reshape(1, 7, 1, 1))
    kernel_y = tf.constant(kernel_1d.reshape(7, 1, 1, 1))
    return lambda x: tf.nn.conv2d(tf.nn.conv2d(x, kernel_x, 1, "SAME"), kernel_y, 1, "SAME")


def acquisition_shift(seed: int, max_blur: float = 1.0, gamma_range: float = 0.35, max_noise: float = 6.0):
    """(B, S, S, 1) float 0..255 -> the same batch as another machine might have taken it.

    Per image: a blend towards a Gaussian blur (sigma ~1 px) or away from it (an unsharp
    mask), a gamma in [1/(1+g), 1+g], and Gaussian noise of up to `max_noise` grey levels.
    """
    generator = tf.random.Generator.from_seed(seed)
    blur = gaussian_blur(sigma=1.0)

    def shift(x):
        batch = tf.shape(x)[0]
        blurred = blur(x)
        # > 0 blurs, < 0 sharpens (x + |a| (x - blur))
        amount = generator.uniform((batch, 1, 1, 1), -max_blur, max_blur)
        x = tf.clip_by_value(x + amount * (blurred - x), 0.0, 255.0)
        log_gamma = generator.uniform((batch, 1, 1, 1), -np.log1p(gamma_range), np.log1p(gamma_range))
        x = 255.0 * tf.pow(x / 255.0, tf.exp(log_gamma))
        noise = generator.uniform((batch, 1, 1, 1), 0.0, max_noise) * generator.normal(tf.shape(x))
        return tf.clip_by_value(x + noise, 0.0, 255.0)

    return shift


def augmentation_for(name: str, seed: int):
    """The training augmentation called `name` (AUGMENTATIONS): a function of a (B, S, S, 1) batch."""
    standard = augmentation(seed)
    if name == "standard":
        return lambda x: standard(x, training=True)
    if name == "acquisition":
        stronger_contrast = keras.layers.RandomContrast(0.3, seed=seed + 5)
        shift = acquisition_shift(seed + 6)
        return lambda x: shift(stronger_contrast(standard(x, training=True), training=True))
    raise ValueError(f"unknown augmentation {name!r}; choose from {', '.join(AUGMENTATIONS)}")


def make_dataset(pixels, labels, normalization, batch_size, seed, augment=None, shuffle=False):
    """uint8 (N, S, S) + labels -> tf.data of normalized float32 (B, S, S, 3) batches."""
    ds = tf.data.Dataset.from_tensor_slices((pixels, labels.astype("float32")))
    if shuffle:
        ds = ds.shuffle(len(pixels), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    if augment is not None:
        # Augment in 0..255 greyscale (B, S, S, 1), then the shared normalisation.
        ds = ds.map(
            lambda x, y: (augment(tf.cast(x, tf.float32)[..., None])[..., 0], y), num_parallel_calls=tf.data.AUTOTUNE
        )
        ds = ds.map(lambda x, y: (tf.clip_by_value(x, 0.0, 255.0), y))
    ds = ds.map(lambda x, y: (normalize(x, normalization), y), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def class_weights(labels: np.ndarray) -> dict[int, float]:
    """Balanced: each class contributes equally to the loss (the data is about 1 : 2.9)."""
    counts = np.bincount(labels, minlength=2)
    return {i: float(len(labels) / (2 * counts[i])) for i in range(2)}
