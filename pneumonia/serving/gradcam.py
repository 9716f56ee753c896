"""Grad-CAM for the single-sigmoid X-ray models, and the overlay shown beside the X-ray.

The models end in Dense(1) "logit" -> sigmoid "probability". Gradients are taken of the
logit, not of the probability, which saturates (a confident 0.999 has almost no gradient).
The model's explain graph (`pneumonia.serving.keras_graphs`, run by either runtime of
`pneumonia.serving.runtime`) returns the logit, the class-activation map and the pooled features (what
the out-of-distribution gate scores) from one forward pass:

    float32 (1, S, S, 3) ──model──> feature map (1, h, w, c) ──...──> pooled (1, d) ──> logit (1, 1)
                                    cam = sum_c mean_hw(d logit / d feature map)_c * feature map_c

`cam` is signed: positive where the features raise the logit (evidence for PNEUMONIA),
negative where they lower it. Grad-CAM of the negative logit (the evidence for NORMAL) is
therefore ReLU(-cam), so one graph serves both classes and the class is chosen in NumPy
with the same float64 calibration as the label. This module turns the map into pictures.
"""

from __future__ import annotations

import cv2
import numpy as np

MIN_CELLS = 7  # a coarser map cannot point at a lung zone
EPSILON = 1e-12  # keeps a flat (all-zero) map finite


def check_map_size(layer: str, map_size: tuple[int, int]) -> None:
    """Raises ValueError for a Grad-CAM layer too coarse to point at a lung zone."""
    if min(map_size) < MIN_CELLS:
        raise ValueError(
            f"Grad-CAM layer {layer} is {map_size[0]}x{map_size[1]}; at least {MIN_CELLS}x{MIN_CELLS} cells are needed"
        )


def heatmap(cam: np.ndarray, for_pneumonia: bool) -> np.ndarray:
    """Signed cam (h, w) -> Grad-CAM of the chosen class, float32 (h, w) in [0, 1].

    An all-zero map (a flat gradient, or no positive evidence) stays all zero, never NaN.
    """
    evidence = np.maximum(cam if for_pneumonia else -cam, 0.0)  # ReLU
    return (evidence / (evidence.max() + EPSILON)).astype(np.float32)


def display_image(xray, max_side: int = 1024) -> np.ndarray:
    """PIL "L" image -> uint8 (H, W) with its own aspect ratio and long side <= max_side.

    A box-filter `reduce` by a whole factor first (fast, no aliasing), then a bilinear step
    of less than 2x; a single INTER_AREA resize of a 2-megapixel image costs ~5x more.
    """
    factor = max(1, max(xray.size) // max_side)
    grey = np.asarray(xray.reduce(factor) if factor > 1 else xray, dtype=np.uint8)
    scale = max_side / max(grey.shape)
    if scale >= 1:
        return grey
    size = (max(1, round(grey.shape[1] * scale)), max(1, round(grey.shape[0] * scale)))
    return cv2.resize(grey, size, interpolation=cv2.INTER_LINEAR)


def overlay(grey: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """uint8 (H, W) + heatmap (h, w) in [0, 1] -> BGR uint8 (H, W, 3).

    The model saw the X-ray stretched to a square, so stretching the map back to (W, H)
    puts each cell over the part of the X-ray it came from.
    """
    height, width = grey.shape
    heat = cv2.resize(heat, (width, height), interpolation=cv2.INTER_LINEAR)  # (H, W)
    colours = cv2.applyColorMap(np.uint8(np.round(255 * heat)), cv2.COLORMAP_JET)  # (H, W, 3) BGR
    return cv2.addWeighted(colours, alpha, cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR), 1 - alpha, 0)
