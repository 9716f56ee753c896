"""The averaged-logit ensemble of issue #8 on the robustness proxies, before building it into the
product: each model's calibrated log-odds averaged, the average Platt-calibrated and thresholded on
the shared validation part by the training rules, then scored as `python -m studies.robustness`
scores one model (the 8 + 8 originals and the validation part under every shift).

    .venv/bin/python -m studies.ensemble_proxy ../shared/data/chest_xray --model model --model runs/levers/base \
        --originals ../shared/samples/original-val
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from pneumonia.serving.card import platt
from pneumonia.serving.classifier import XrayClassifier
from pneumonia.training.operating_points import choose_thresholds, fit_platt
from studies.robustness import (
    BASELINE,
    decode_all,
    decoded_originals,
    probabilities_of,
    probabilities_under_shifts,
    score,
    summary_row,
    validation_splits,
)


def log_odds(probs) -> np.ndarray:
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p))


def averaged(member_probs: list[np.ndarray]) -> np.ndarray:
    """Each member's calibrated probabilities (N,) -> the mean of their log-odds (N,)."""
    return np.mean([log_odds(p) for p in member_probs], axis=0)


def ensemble_rows(labels, probs_by_shift: dict[str, list], target_sensitivity: float) -> tuple[dict, list[dict]]:
    """Calibration and thresholds from the unshifted validation part; one `score` row per shift."""
    slope, intercept = fit_platt(labels, averaged(probs_by_shift[BASELINE]))
    calibrated = {s: platt(averaged(p), slope, intercept) for s, p in probs_by_shift.items()}
    thresholds = choose_thresholds(labels, calibrated[BASELINE], target_sensitivity)
    rows = [{"shift": s, **score(labels, p, thresholds)} for s, p in calibrated.items()]
    return {"slope": slope, "intercept": intercept, **thresholds}, rows


def print_row(name: str, row: dict) -> None:
    print(
        f"| {name} | {row['auc']:.3f} | {row['normal_mean_p']:.3f} | {row['default']['specificity']:.3f} "
        f"| {row['screening']['specificity']:.3f} |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir")
    parser.add_argument("--model", action="append", required=True, help="model folder (two or more)")
    parser.add_argument("--originals")
    args = parser.parse_args(argv)

    splits = validation_splits(args.data_dir, args.model)
    if any(val.paths != splits[0][0].paths for val, _ in splits):
        raise SystemExit("the models were validated on different parts of train/: no shared validation set")
    val = splits[0][0]
    classifiers = [XrayClassifier(path) for path in args.model]
    decoded = decode_all(val.paths)
    labels = np.asarray(val.labels, dtype=int)
    probs = probabilities_under_shifts(decoded, classifiers, [val] * len(classifiers))
    fitted, rows = ensemble_rows(labels, probs, classifiers[0].card.thresholds.target_sensitivity)
    print(f"ensemble of {', '.join(args.model)}: {fitted}")
    print("| shift | AUC | NORMAL mean p | specificity @ default | @ screening |\n|---|---|---|---|---|")
    for row in rows:
        print_row(row["shift"], row)
    summary = summary_row(rows)
    shifted = [r["normal_mean_p"] for r in rows if r["shift"] != BASELINE]
    print(f"summary: {summary}; NORMAL mean p over shifts {np.mean(shifted):.3f}")

    originals, originals_images = decoded_originals(args.originals)
    if originals:
        member = [probabilities_of(c, originals_images, originals.paths) for c in classifiers]
        calibrated = platt(averaged(member), fitted["slope"], fitted["intercept"])
        thresholds = {t: fitted[t] for t in ("default", "screening")}
        print_row("originals", score(np.asarray(originals.labels, dtype=int), calibrated, thresholds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
