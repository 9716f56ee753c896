"""The drift monitor (pneumonia/serving/drift.py), measured: how often it alarms when nothing has changed,
and after how many images it alarms when something has.

Everything here is on the validation part of train/ (recreated from the card, its fingerprint checked),
never on a test split:

1. **False alarms.** The reference is the card's (the whole validation part); windows of n images are drawn
   at random from the same part, without replacement, and the share of windows that alarm is counted. That
   check is optimistic (each window is a subset of the reference), so a second one is harder: the validation
   part is split in two by patient, the reference is built from one half and windows are drawn, with
   replacement, from the other; repeated over many random splits.
2. **Detection delay.** Each shift proxy of `pneumonia/training/shifts.py` (blur, contrast, framing, noise,
   ...; the ones `studies/robustness.py` uses) is applied to every validation image before the package's
   preprocessing, and a site whose images are all shifted is simulated: images arrive in random order and
   the monitor is checked after each one, from its minimum on; the delay is the number of images at the
   first alarm. Mixtures: half of the images shifted, and a mix of several shifts in equal parts.

    python -m studies.drift_monitor ../shared/data/chest_xray [--model model] [--out runs/drift-monitor]

prints the figures (markdown) and writes them as JSON; the model's scores under each shift are cached in OUT.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from pneumonia.training import dataset
from pneumonia.training.shifts import BASELINE, SHIFTS, apply_shift, model_pixels, shift_seed

MIXTURES = {
    "half crop_80": {"crop_80": 0.5, BASELINE: 0.5},
    "half blur_r2": {"blur_r2": 0.5, BASELINE: 0.5},
    "half contrast_0.8": {"contrast_0.8": 0.5, BASELINE: 0.5},
    "blur, contrast, crop, noise": {"blur_r1": 0.25, "contrast_0.8": 0.25, "crop_80": 0.25, "noise_s5": 0.25},
}


def scores_under_shifts(data_dir, model_path, cache: Path, log=print) -> dict:
    """{"shifts": names, "logits": (S, N), "scores": (S, N) gate distances, "patients": (N,)}, cached."""
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as stored:
            return {name: stored[name] for name in stored.files}
    from pneumonia.reading.decoding import load_xray
    from pneumonia.serving.classifier import XrayClassifier

    classifier = XrayClassifier(model_path)
    val, info = dataset.validation_part(data_dir, classifier.card)
    if not info["fingerprint_matches"]:
        raise SystemExit(f"error: {info['warning']}")
    decoded = {path: load_xray(path) for path in val.paths}
    names = [BASELINE] + [shift.name for shift in SHIFTS]
    logits, scores = [], []
    for name in names:
        pixels = np.stack(
            [model_pixels(apply_shift(name, decoded[p], shift_seed(p)), classifier.image_size) for p in val.paths]
        )
        features, shift_logits = classifier.features_and_logits_of_pixels(pixels)
        logits.append(shift_logits)
        scores.append(classifier.gate.density.distance(features))
        log(f"scored {name}")
    result = {
        "shifts": np.asarray(names),
        "logits": np.stack(logits),
        "scores": np.stack(scores),
        "patients": np.asarray([dataset.patient_id(p) for p in val.paths]),
        "labels": np.asarray(val.labels),
    }
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **result)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m studies.drift_monitor", description=__doc__.split("\n\n")[0])
    parser.add_argument("data_dir")
    parser.add_argument("--model", default="model")
    parser.add_argument("--out", default="runs/drift-monitor")
    args = parser.parse_args(argv)
    out = Path(args.out)
    data = scores_under_shifts(args.data_dir, args.model, out / "scores.npz", log=lambda m: print(m, file=sys.stderr))
    print(json.dumps({"shifts": data["shifts"].tolist(), "images": int(data["logits"].shape[1])}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
