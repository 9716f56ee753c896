"""`python -m pneumonia calibrate`: refit calibration and thresholds on a new site's sample.

Why: a model's ranking of images often survives a move to another hospital or scanner, but
where its probabilities fall does not. The shipped model, for instance, scored the Kaggle
`val/` NORMAL series (a different acquisition) much higher than the NORMAL images it was
validated on, so at its validation thresholds it flagged half of them. Refitting the Platt
calibration and both thresholds on a small labelled sample from the new site moves the
operating point back without retraining: the `.keras` weights are copied byte for byte.

The rules are the ones `train` uses on its validation part: Platt scaling fitted on the raw
logits; default threshold = max. Youden's J; screening threshold = the highest threshold
reaching the card's target sensitivity, never above the default. The result is a new model
folder (the old one is left alone) whose card keeps the previous values under
`recalibration`, with the site sample's counts, fingerprint and date, and its metrics.

Sample size. Below MIN_PER_CLASS images of either class the command refuses; below
WARN_PER_CLASS it warns. With n images of a class, one image moves sensitivity (or
specificity) by 1/n, and the 98 %-sensitivity screening threshold keeps ceil(0.98 n)
positives: with 20 positives that is all of them, so the threshold is the single lowest-scored
pneumonia image; and a perfect 20/20 only shows sensitivity >= 0.84 (Wilson 95 % lower bound).
Below 20 a threshold rests on one or two images and its interval is wider than the shift it
corrects, so the refit is as likely to make things worse as better. At 100 per class one image
is one percentage point, the screening threshold is set by the 3rd-lowest positive, and a
perfect score shows >= 0.96.
"""

from __future__ import annotations

import datetime as _dt
import os
import shlex
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from pneumonia.scoring.metrics import bootstrap_ci, evaluate_predictions, expected_calibration_error, write_metrics
from pneumonia.serving.card import (
    CARD_NAME,
    Calibration,
    Metrics,
    ModelCard,
    MonitorReference,
    Replaced,
    SiteSample,
    Thresholds,
    platt,
    write_card,
)
from pneumonia.serving.card import (
    Recalibration as RecalibrationRecord,
)
from pneumonia.serving.classifier import XrayClassifier, find_card
from pneumonia.serving.drift import monitor_reference
from pneumonia.training import dataset
from pneumonia.training.operating_points import choose_thresholds, fit_platt

MIN_PER_CLASS = 20  # refuse below: see the module docstring
WARN_PER_CLASS = 100  # warn below
WEAK_AUC = 0.75  # warn below: recalibration moves thresholds, it cannot restore a lost ranking
SITE_REPORT = "site"  # DIR/report/site/: the site sample's metrics.json


class RecalibrationError(ValueError):
    """A refusal: the message is for a person; nothing has been written."""


@dataclass
class Recalibration:
    card: ModelCard
    out: Path
    warning: str | None


def site_files(site_dir: str | Path, split: str | None = None) -> dataset.SplitFiles:
    """SITE_DIR/{NORMAL,PNEUMONIA}/*, or SITE_DIR/SPLIT/{NORMAL,PNEUMONIA}/* with `split`."""
    root = Path(site_dir).resolve()
    files = dataset.scan_split(root, split) if split else dataset.scan_split(root.parent, root.name)
    where = root / split if split else root
    if files is None or not files.paths:
        raise RecalibrationError(
            f"{where} has no NORMAL/ or PNEUMONIA/ images "
            "(expected SITE_DIR/NORMAL/* and SITE_DIR/PNEUMONIA/*, or --split NAME)"
        )
    return files


def sample_size_warning(counts: dict[str, int]) -> str | None:
    """Refuses below MIN_PER_CLASS images of a class; a warning below WARN_PER_CLASS, else None."""
    small = {name: n for name, n in counts.items() if n < MIN_PER_CLASS}
    if small:
        raise RecalibrationError(
            "too few images to recalibrate on: "
            + ", ".join(f"{k} {v}" for k, v in counts.items())
            + f"; at least {MIN_PER_CLASS} of each class are needed (below that each threshold is set by one or two "
            f"images: with {min(small.values())} a single image moves sensitivity or specificity by "
            f"{100 / max(1, min(small.values())):.1f} points)"
        )
    few = {name: n for name, n in counts.items() if n < WARN_PER_CLASS}
    if few:
        return (
            f"small site sample ({', '.join(f'{k} {v}' for k, v in few.items())}; fewer than {WARN_PER_CLASS} "
            f"per class): one image moves sensitivity or specificity by more than one point, so the thresholds "
            f"are uncertain; see the 95 % intervals and collect more images when you can"
        )
    return None


def raw_logits(classifier: XrayClassifier, pixels: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """uint8 (N, S, S) -> the model's raw logits (N,), before any calibration."""
    return classifier.features_and_logits_of_pixels(pixels, batch_size)[1]


def refit_calibration(labels: np.ndarray, logits: np.ndarray) -> dict:
    """Platt (slope, intercept) on the site logits; refuses a model that ranks the site backwards."""
    slope, intercept = fit_platt(labels, logits)
    if slope <= 0:
        raise RecalibrationError(
            f"the model ranks this site's images backwards (Platt slope {slope:.3f} <= 0): "
            "recalibration cannot fix that; the model needs retraining for this site"
        )
    return {"slope": slope, "intercept": intercept}


def refit_thresholds(labels: np.ndarray, probs: np.ndarray, target_sensitivity: float) -> dict:
    """Training's rules: default maximises Youden's J; screening reaches the target, never above default."""
    return choose_thresholds(labels, probs, target_sensitivity)


def site_metrics(labels, probs, thresholds: dict, model_name: str, split: str) -> dict:
    """evaluate_predictions (its ci95 is at the default threshold), plus 95 % intervals at each threshold."""
    metrics = evaluate_predictions(labels, probs, thresholds, model_name, split)
    metrics["ci95_by_threshold"] = {name: bootstrap_ci(labels, probs, t) for name, t in thresholds.items()}
    return metrics


def command_line(site_dir, model, out, split: str | None) -> str:
    """The command as typed, with absolute paths cut to their last part (cards travel)."""

    def short(path) -> str:
        return Path(path).name if Path(path).is_absolute() else str(path)

    args = ["python", "-m", "pneumonia", "calibrate", short(site_dir), "--model", short(model), "--out", short(out)]
    return shlex.join(args + (["--split", split] if split else []))


# Card figures measured at the thresholds (what the proxies expect at a new site, the unseen series, the
# independent evaluation): a recalibration keeps them with the old thresholds under `previous`, not beside the new ones.
MEASURED_AT_THE_THRESHOLDS = ("expectations", "held_out_series", "independent_evaluation")


def recalibrated_card(
    card: ModelCard,
    calibration: dict,
    thresholds: dict,
    *,
    site_name: str,
    files: dataset.SplitFiles,
    metrics: dict,
    previous_metrics: dict,
    ece: dict,
    warning: str | None,
    command: str,
    monitor: MonitorReference | None = None,
) -> ModelCard:
    """The old card with the new calibration and thresholds (and the drift monitor's reference, on the site
    sample), the old ones under `recalibration`."""
    counts = files.counts()
    n = sum(counts.values())
    previous = Replaced(
        calibration=card.calibration,
        thresholds=card.thresholds,
        recalibration=card.recalibration,  # a recalibrated model recalibrated again keeps its history
        monitor=card.monitor,
        **{name: getattr(card, name) or None for name in MEASURED_AT_THE_THRESHOLDS},
    )
    new_calibration = Calibration(
        slope=calibration["slope"],
        intercept=calibration["intercept"],
        ece_before=ece["before"],
        ece_after=ece["after"],
        method=f"Platt scaling, sigmoid(slope * logit + intercept), refitted on the logits of the site sample "
        f"{site_name} ({n} images); ECE before = with the previous calibration, on that sample",
    )
    new_thresholds = Thresholds(
        default=thresholds["default"],
        screening=thresholds["screening"],
        target_sensitivity=card.thresholds.target_sensitivity,
        chosen_on=f"site sample {site_name} ({n} images); calibrated probabilities",
        rule_name="site sample",
    )
    recalibration = RecalibrationRecord(
        previous=previous,
        site_sample=SiteSample(site_name, counts, dataset.fingerprint(files), _dt.date.today().isoformat()),
        metrics=Metrics.of(metrics),
        previous_metrics=Metrics.of(previous_metrics),
        warning=warning,
        command=command,
        note="metrics are on the same sample the calibration and thresholds were fitted on: optimistic; "
        "the model weights are unchanged",
    )
    return replace(
        card,
        calibration=new_calibration,
        thresholds=new_thresholds,
        recalibration=recalibration,
        monitor=monitor,
        **dict.fromkeys(MEASURED_AT_THE_THRESHOLDS),
    )


def site_reference(classifier, features, logits, calibration: dict, thresholds: dict, files, split_name: str):
    """The drift monitor's reference on the site sample, at its new calibration and thresholds: the monitor then
    compares the site's screenings with the sample its thresholds were fitted on."""
    gate = classifier.gate
    return monitor_reference(
        logits,
        None if gate is None else gate.density.distance(features),
        (calibration["slope"], calibration["intercept"]),
        thresholds,
        None if gate is None else gate.thresholds,
        f"{split_name}, {len(logits)} images",
        groups=[dataset.patient_id(path) for path in files.paths],
    )


def write_model_folder(keras_path: Path, card: ModelCard, out: Path, metrics: dict) -> None:
    """OUT/ = the .keras file (byte-identical), report/, every other file of the model folder
    except the card, the new card and report/site/metrics.json. Written to a hidden sibling
    folder first and renamed into place, so a failure leaves no half-written model behind."""
    source = keras_path.parent
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        for item in sorted(source.iterdir()):
            if item.is_file() and item.name != CARD_NAME:
                shutil.copy2(item, staging / item.name)  # the .keras file and sidecars (ood.npz, ...)
        # checkpoints/ and other folders are training leftovers: not part of a served model.
        if (source / "report").is_dir():
            shutil.copytree(source / "report", staging / "report")
        write_metrics(metrics, staging / "report" / SITE_REPORT)
        write_card(staging, replace(card, file=keras_path.name))
        if out.exists():
            out.rmdir()  # checked empty by check_output_folder
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def check_output_folder(out: Path, keras_path: Path) -> None:
    """Refuses to write into the model's own folder or into a folder that holds anything."""
    if out.resolve() == keras_path.parent.resolve():
        raise RecalibrationError(f"--out {out} is the model's own folder: write the recalibrated model to a new folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RecalibrationError(f"--out {out} already exists and is not empty: choose a new folder")


def recalibrate(
    model_path: str | Path, site_dir: str | Path, out: str | Path, split: str | None = None, log=print, warn=print
) -> Recalibration:
    """The whole command: refuses (RecalibrationError, nothing written) or writes OUT/."""
    out = Path(out)
    keras_path, old_card = find_card(model_path)
    check_output_folder(out, keras_path)
    files = site_files(site_dir, split)
    site_name = (Path(site_dir).resolve() / split).name if split else Path(site_dir).resolve().name
    sample_size_warning(files.counts())  # refuse before loading anything
    classifier = XrayClassifier(model_path)
    pixels, labels, kept = dataset.load_pixels(files, classifier.image_size, None, log=log)  # logs what it skips
    warnings = [sample_size_warning(kept.counts())]

    features, logits = classifier.features_and_logits_of_pixels(pixels)
    calibration = refit_calibration(labels, logits)
    probs = platt(logits, calibration["slope"], calibration["intercept"])
    previous_probs = classifier.calibrated(logits)
    thresholds = refit_thresholds(labels, probs, old_card.thresholds.target_sensitivity)
    split_name = f"site sample {site_name}"
    metrics = site_metrics(labels, probs, thresholds, classifier.name, split_name)
    previous_metrics = site_metrics(
        labels,
        previous_probs,
        classifier.thresholds,
        classifier.name,
        f"{split_name}, previous calibration and thresholds",
    )
    if metrics["auc"] < WEAK_AUC:
        warnings.append(
            f"the model separates this site's classes poorly (AUC {metrics['auc']:.3f}): "
            "recalibration moves the thresholds but cannot restore the ranking"
        )
    warning = " ".join(w for w in warnings if w) or None
    if warning:
        warn(f"warning: {warning}")
    ece = {
        "before": expected_calibration_error(labels, previous_probs),
        "after": expected_calibration_error(labels, probs),
    }
    card = recalibrated_card(
        old_card,
        calibration,
        thresholds,
        site_name=site_name,
        files=kept,
        metrics=metrics,
        previous_metrics=previous_metrics,
        ece=ece,
        warning=warning,
        command=command_line(site_dir, model_path, out, split),
        monitor=site_reference(classifier, features, logits, calibration, thresholds, kept, split_name),
    )
    write_model_folder(keras_path, card, out, metrics)
    return Recalibration(card, out, warning)


def format_operating_figures(metrics: Metrics, previous: Metrics | None = None) -> str:
    """AUC and, at each threshold, accuracy / sensitivity / specificity with 95 % bootstrap intervals."""

    def cell(value, interval) -> str:
        return f"{value:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]"

    ci = metrics.ci95_by_threshold
    lines = [
        f"{metrics.split}: n = {sum(metrics.n.values())} (" + ", ".join(f"{k} {v}" for k, v in metrics.n.items()) + ")",
        f"AUC {cell(metrics.auc, metrics.ci95['auc'])}",
        f"{'threshold':<18}{'accuracy':<22}{'sensitivity':<22}{'specificity':<22}",
    ]
    for name, m in metrics.thresholds.items():
        lines.append(
            f"{name + ' ' + format(m.threshold, '.3f'):<18}{cell(m.accuracy, ci[name]['accuracy']):<22}"
            f"{cell(m.recall, ci[name]['recall']):<22}{cell(m.specificity, ci[name]['specificity']):<22}"
        )
    if previous:
        lines.append("before (previous calibration and thresholds, same sample):")
        for name, m in previous.thresholds.items():
            lines.append(
                f"{name + ' ' + format(m.threshold, '.3f'):<18}{m.accuracy:<22.3f}"
                f"{m.recall:<22.3f}{m.specificity:<22.3f}"
            )
    lines.append("(95 % bootstrap intervals; measured on the sample the thresholds were chosen on, so optimistic)")
    return "\n".join(lines)
