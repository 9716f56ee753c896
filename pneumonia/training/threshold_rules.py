"""Threshold rules: where the two operating thresholds come from, chosen on the validation part alone or
across it and a set of acquisition shifts of it (shifts.py), so that they hold at a site whose images
differ from train/'s (model/report/levers.md, "Threshold rules").

    probabilities of the validation part, clean and under each shift of the rule's set
        ──default: Youden's J of the clean part, or J averaged over / worst across the set──> default
        ──screening: the highest threshold whose sensitivity reaches the target on every member──> screening

The screening threshold is never above the default, so its label is always the more sensitive one.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from pneumonia.reading.decoding import load_xray
from pneumonia.scoring.metrics import evaluate_predictions, write_metrics
from pneumonia.scoring.plots import save_plots
from pneumonia.serving.card import Metrics, ModelCard, Thresholds, write_card
from pneumonia.serving.classifier import XrayClassifier
from pneumonia.serving.preprocessing import resize_xray
from pneumonia.training import dataset
from pneumonia.training.config import ThresholdRule
from pneumonia.training.operating_points import thresholds_from_roc
from pneumonia.training.shifts import BASELINE, apply_shift, shift_seed


def youden_at(labels: np.ndarray, probs: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """J = sensitivity + specificity - 1 at each candidate threshold (PNEUMONIA when p >= t)."""
    labels = np.asarray(labels, dtype=int)
    positives, negatives = np.sort(probs[labels == 1]), np.sort(probs[labels == 0])
    sensitivity = 1.0 - np.searchsorted(positives, candidates, side="left") / len(positives)
    specificity = np.searchsorted(negatives, candidates, side="left") / len(negatives)
    return sensitivity + specificity - 1.0


def thresholds_by_rule(labels, probs_by_shift: dict[str, np.ndarray], rule: ThresholdRule, target: float) -> dict:
    """{"default", "screening"} from the validation labels and the calibrated probabilities of the
    clean part (BASELINE) and of each shift of the rule's set."""
    labels = np.asarray(labels, dtype=int)
    members = [np.asarray(probs_by_shift[name], dtype=np.float64) for name in (BASELINE, *rule.shifts)]
    if rule.default == "youden":
        default = thresholds_from_roc(labels, members[0], target)[0]
    else:
        candidates = np.unique(np.concatenate(members))
        curves = np.stack([youden_at(labels, probs, candidates) for probs in members])  # (members, candidates)
        combined = curves.mean(axis=0) if rule.default == "mean" else curves.min(axis=0)
        best = len(combined) - 1 - int(np.argmax(combined[::-1]))  # ties: the highest threshold, as on one ROC
        default = float(candidates[best])
    screening = min(thresholds_from_roc(labels, probs, target)[1] for probs in members)
    return {"default": default, "screening": min(default, screening)}


# What the pages show beside the validation figures: how the thresholds fare on images that chose
# nothing (the Kaggle val/ split, another NORMAL series) and on tighter-framed chests.
EXPECTATION_SHIFTS = ("crop_90", "crop_80")


def probabilities_under_shifts(probabilities_of_pixels, paths, names, image_size: int) -> dict[str, np.ndarray]:
    """{shift: calibrated probabilities of `paths`} for BASELINE and each of `names`; each file decoded once."""
    images = [load_xray(path, image_size) for path in paths]
    return {
        name: probabilities_of_pixels(
            np.stack(
                [
                    resize_xray(apply_shift(name, image, shift_seed(path)), image_size)
                    for path, image in zip(paths, images)
                ]
            )
        )
        for name in (BASELINE, *names)
    }


def rates_at(labels, probs, thresholds: dict) -> dict:
    """{threshold name: {"specificity", "recall"}} (None for a class the images do not have)."""
    labels, probs = np.asarray(labels, dtype=int), np.asarray(probs, dtype=np.float64)
    return {
        name: {
            "specificity": float((probs[labels == 0] < t).mean()) if (labels == 0).any() else None,
            "recall": float((probs[labels == 1] >= t).mean()) if (labels == 1).any() else None,
        }
        for name, t in thresholds.items()
    }


def apply_threshold_rule(model_dir: Path, data_dir: str | Path, rule: ThresholdRule, log=print) -> ModelCard:
    """Chooses the model's thresholds by `rule` on its recreated validation part (and the rule's shifts),
    records the rule, the validation figures at the new thresholds and what the proxies expect at a new
    site, and rewrites the card and the validation report. The calibration is left as it is."""
    classifier = XrayClassifier(model_dir)
    card = classifier.card
    files, info = dataset.validation_part(data_dir, card)
    if not info["fingerprint_matches"]:
        raise dataset.DataError(f"{data_dir}: {info['warning']}")
    log(f"thresholds by the rule {rule.name}: scoring the validation part under {len(rule.shifts) + 2} shifts")
    probs = probabilities_under_shifts(
        classifier.probabilities_from_pixels, files.paths, (*rule.shifts, *EXPECTATION_SHIFTS), classifier.image_size
    )
    chosen = thresholds_by_rule(files.labels, probs, rule, card.thresholds.target_sensitivity)
    shifted = f" and under {', '.join(rule.shifts)}" if rule.shifts else ""
    thresholds = Thresholds(
        **chosen,
        target_sensitivity=card.thresholds.target_sensitivity,
        chosen_on=f"validation part of train/ (patient-grouped){shifted}; calibrated probabilities",
        rule=rule.description,
        rule_name=rule.name,
    )
    metrics = evaluate_predictions(files.labels, probs[BASELINE], chosen, card.name, card.validation.split)
    held_out = unseen_series_record(data_dir, classifier, chosen)
    if held_out:
        log(
            f"held-out series {held_out['series']}: {held_out['n_normal']} NORMAL images, mean p "
            f"{held_out['normal_mean_p']:.3f}, specificity {held_out['specificity']['default']:.3f} @ default, "
            f"{held_out['specificity']['screening']:.3f} @ screening"
        )
    card = replace(
        card,
        thresholds=thresholds,
        validation=Metrics.of(metrics),
        expectations=site_expectations(data_dir, classifier, probs, files, chosen),
        held_out_series=held_out,
    )
    write_card(model_dir, card)
    write_metrics(metrics, Path(model_dir) / "report")
    save_plots(files.labels, probs[BASELINE], metrics, Path(model_dir) / "report")
    return card


def site_expectations(data_dir, classifier, probs: dict, files, thresholds: dict) -> dict:
    """The Kaggle val/ split's and the framing shifts' specificity and recall at each threshold."""
    expected = {
        "framing": {name: rates_at(files.labels, probs[name], thresholds) for name in EXPECTATION_SHIFTS},
    }
    originals = dataset.scan_split(data_dir, "val")
    if originals is not None and len(set(originals.labels)) == 2:
        originals_probs = probabilities_under_shifts(
            classifier.probabilities_from_pixels, originals.paths, (), classifier.image_size
        )[BASELINE]
        expected["originals"] = {"n": originals.counts(), **rates_at(originals.labels, originals_probs, thresholds)}
    return expected


def unseen_series_record(data_dir, classifier, thresholds: dict) -> dict | None:
    """How the NORMAL images of the series training held out fare at `thresholds` (chosen without
    them): the specificity a new site's normal X-rays would get. None without a held-out series."""
    unseen = dataset.unseen_series(data_dir, classifier.card)
    if unseen is None:
        return None
    probs = probabilities_under_shifts(classifier.probabilities_from_pixels, unseen.paths, (), classifier.image_size)[
        BASELINE
    ]
    rates = rates_at(unseen.labels, probs, thresholds)
    return {
        "series": classifier.card.training.config.hold_out_series,
        "n_normal": len(probs),
        "normal_mean_p": float(probs.mean()),
        "thresholds": {name: float(t) for name, t in thresholds.items()},
        "specificity": {name: rates[name]["specificity"] for name in thresholds},
    }
