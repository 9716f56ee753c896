"""What decoding a large JPEG at a DCT scale changes: the probability, the labels, the time.

    .venv/bin/python -m bench.draft_decoding [--model model/] [--images ../shared/samples]

Each full-size JPEG under --images is decoded at its own size and as the product decodes it
(`decode_xray(..., model_side)`: the smallest DCT scale leaving both sides >= DRAFT_MARGIN x the
model square), reduced to the model's square and scored; prints per image the two sizes and
probabilities, then the largest and mean change, the labels that flip at either threshold, and
the median decode + resize time of the image nearest 2 megapixels both ways.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def median_ms(run, repeats: int = 30) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return 1000 * float(np.median(times))


def main(argv: list[str] | None = None) -> int:
    from pneumonia.reading.decoding import decode_xray
    from pneumonia.serving.classifier import XrayClassifier
    from pneumonia.serving.preprocessing import model_input, resize_xray

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(REPO / "model"))
    parser.add_argument("--images", default=str(REPO.parent / "shared" / "samples"))
    args = parser.parse_args(argv)
    files = sorted(Path(args.images).rglob("*.jpeg"))
    if not files:
        print(f"no JPEGs under {args.images}", file=sys.stderr)
        return 2
    classifier = XrayClassifier(args.model)
    side = classifier.image_size

    def probability(image) -> float:
        inputs = model_input(resize_xray(image, side), classifier.preprocessing)[None]
        return float(classifier.calibrated(classifier.features_and_logits(inputs)[1])[0])

    changes, flips, pixels = [], 0, {}
    for path in files:
        (full, stats), drafted = decode_xray(path), decode_xray(path, side)[0]
        pixels[path] = stats.pixels
        p_full, p_drafted = probability(full), probability(drafted)
        changes.append(abs(p_full - p_drafted))
        flips += sum((p_full >= t) != (p_drafted >= t) for t in classifier.thresholds.values())
        print(f"{path.name:34s} {full.size} -> {drafted.size}  p {p_full:.4f} -> {p_drafted:.4f}")
    print(f"{len(files)} images: largest |change| {max(changes):.4f}, mean {np.mean(changes):.4f}, label flips {flips}")
    nearest = min(files, key=lambda p: abs(pixels[p] - 2_000_000))
    data = nearest.read_bytes()
    for label, model_side in (("full size", None), ("DCT scale", side)):
        ms = median_ms(lambda model_side=model_side: resize_xray(decode_xray(data, model_side)[0], side))
        print(f"decode + resize of {nearest.name} ({label}): {ms:.2f} ms (median of 30)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
