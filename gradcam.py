"""Grad-CAM's heatmap and overlay, under the name the project is known by; the code is in
`pneumonia/serving/gradcam.py`, beside the runtime that computes the map."""

from pneumonia.serving.gradcam import check_map_size, display_image, heatmap, overlay

__all__ = ["check_map_size", "display_image", "heatmap", "overlay"]
