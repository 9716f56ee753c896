"""A model evaluated on a labelled split of a Kaggle-layout folder: the metrics at both thresholds with
confidence intervals, what the gate refuses there and the metrics on what it accepts, the plots, and a
comparison table when several models are evaluated together."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from pneumonia.errors import ModelLoadError
from pneumonia.scoring.metrics import evaluate_predictions, format_table, write_metrics
from pneumonia.scoring.plots import save_plots
from pneumonia.serving.classifier import XrayClassifier, find_card
from pneumonia.training import dataset
from pneumonia.training.gate_fitting import pixel_stats_of, verdict_counts


class EvaluationError(ValueError):
    """The split cannot be evaluated on; the message says why."""


def evaluate_model(
    model_path: str, files: dataset.SplitFiles, split: str, out: Path, cache_dir=None, log=print
) -> dict:
    """metrics.json and the plots in `out` for one model on `files`; the metrics."""
    classifier = XrayClassifier(model_path)
    pixels, labels, kept = dataset.load_pixels(files, classifier.image_size, cache_dir, log=log)
    if len(set(labels.tolist())) < 2:  # AUC, specificity and the rest need both classes
        raise EvaluationError(
            f"{split}/ needs readable NORMAL and PNEUMONIA images to evaluate on; found {dataset.describe(split, kept)}"
        )
    features, logits = classifier.features_and_logits_of_pixels(pixels)
    probs = classifier.calibrated(logits)
    metrics = evaluate_predictions(labels, probs, classifier.thresholds, classifier.name, split)
    metrics["ood_gate"] = gate_on_split(classifier, kept, features, labels, probs, split, log)
    write_metrics(metrics, out)
    save_plots(labels, probs, metrics, out)
    log(format_table(metrics))
    log(f"wrote {out / 'metrics.json'} and plots\n")
    return metrics


def gate_on_split(classifier, files, features, labels, probs, split: str, log=print) -> dict:
    """How many images of the split the gate refuses or flags, and the metrics on the accepted ones."""
    if classifier.gate is None:
        log(f"out-of-distribution gate: off ({classifier.gate_status})")
        return {"gate": "off", "detail": classifier.gate_status}
    gate = classifier.gate
    stats = pixel_stats_of(files)
    scores = gate.density.distance(features)
    counts = verdict_counts(gate, stats, scores)
    accepted = np.array([gate.verdict(s, d).accepted for s, d in zip(stats, scores)])
    log(
        f"out-of-distribution gate: refused {100 * counts['refused_fraction']:.1f} % "
        f"({sum(counts['refused_by'].values())} of {counts['images']}: {counts['refused_by'] or 'none'}), "
        f"flagged unusual {100 * counts['unusual_fraction']:.1f} %"
    )
    report = {"gate": "on", **counts, "metrics_on_accepted": None}
    if accepted.any() and len(set(labels[accepted].tolist())) == 2:
        report["metrics_on_accepted"] = evaluate_predictions(
            labels[accepted], probs[accepted], classifier.thresholds, classifier.name, f"{split} (accepted by the gate)"
        )
        log("on the images the gate accepted:\n" + format_table(report["metrics_on_accepted"]))
    return report


def _report_name(model_path: str) -> str:
    """The card's name made safe for a folder name, else the model folder's name."""
    try:
        name = find_card(model_path)[1].name
    except ModelLoadError:
        name = ""  # reported when the model is loaded
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or _model_folder(model_path)


def _model_folder(model_path: str) -> str:
    path = Path(model_path).resolve()
    return (path.parent if path.suffix == ".keras" else path).name


def model_folder_names(model_paths: list[str]) -> list[str]:
    """One report folder per --model, unique even when cards share a name (two runs of one
    architecture are both called "custom"): name, else name-folder, else a numbered name."""
    names = [_report_name(m) for m in model_paths]
    chosen = []
    for model_path, name in zip(model_paths, names):
        if names.count(name) > 1:
            name = f"{name}-{_model_folder(model_path)}"
        base, number = name, 2
        while name in chosen:
            name, number = f"{base}-{number}", number + 1
        chosen.append(name)
    return chosen


def comparison_table(results: list[dict], names: list[str] | None = None) -> str:
    rows = [
        ("AUC", lambda m: m["auc"]),
        ("average precision", lambda m: m["average_precision"]),
        ("loss", lambda m: m["loss"]),
    ]
    for name in ("default", "screening"):
        for key in ("threshold", "accuracy", "precision", "recall", "specificity", "f1"):
            rows.append((f"{key} @ {name}", lambda m, n=name, k=key: m["thresholds"][n][k]))
    lines = [
        f"# Comparison on {results[0]['split']}",
        "",
        "| metric | " + " | ".join(names or [m["model"] for m in results]) + " |",
        "|---|" + "---|" * len(results),
    ]
    lines += [f"| {label} | " + " | ".join(f"{get(m):.4f}" for m in results) + " |" for label, get in rows]
    return "\n".join(lines) + "\n"
