"""Sharpness by class and NORMAL series: the mean edge strength (`training.edge_strength`, mean
absolute horizontal grey-level step) of the model-sized pixels the training code sees.

    .venv/bin/python -m studies.edge_strength ../shared/data/chest_xray --originals ../shared/samples/original-val

The figures behind `--match-sharpness` in model/report/levers.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from pneumonia.serving.preprocessing import xray_pixels
from pneumonia.training import dataset
from pneumonia.training.fitting import edge_strength


def strengths(pixels: np.ndarray) -> np.ndarray:
    """uint8 (N, S, S) -> (N,) edge strengths."""
    return edge_strength(pixels.astype("float32")[..., None]).numpy()


def describe(name: str, values: np.ndarray) -> str:
    p10, p50, p90 = np.percentile(values, [10, 50, 90])
    return f"| {name} | {len(values)} | {values.mean():.2f} | {p10:.2f} / {p50:.2f} / {p90:.2f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--originals", help="a folder with NORMAL/ and PNEUMONIA/ full-size images")
    parser.add_argument("--cache-dir", default="cache")
    args = parser.parse_args()
    files = dataset.scan_split(args.data_dir, "train")
    pixels, labels, files = dataset.load_pixels(files, args.image_size, args.cache_dir)
    values = strengths(pixels)
    series = np.array([dataset.normal_series(p) if y == 0 else dataset.PNEUMONIA for p, y in zip(files.paths, labels)])
    print(f"| train/ at {args.image_size} px | images | mean | 10th / 50th / 90th percentile |")
    print("|---|---|---|---|")
    for name in [*dataset.NORMAL_SERIES, dataset.PNEUMONIA]:
        print(describe(name, values[series == name]))
    if args.originals:
        for name in dataset.CLASS_NAMES:
            paths = sorted(p for p in (Path(args.originals) / name).iterdir() if p.is_file())
            print(describe(f"originals {name}", strengths(np.stack([xray_pixels(p, args.image_size) for p in paths]))))


if __name__ == "__main__":
    main()
