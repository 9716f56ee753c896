"""Proxies that can see distribution shift, which an in-distribution validation split cannot.

A validation part carved from `train/` comes from the same machines, series and processing as
the training images, so it says nothing about how the operating point moves on images from
elsewhere. Three cheap proxies:

(a) the full-resolution originals of the Kaggle `val/` split (a different NORMAL series), when
    given;
(b) the validation part of `train/`, recreated exactly as training made it (checked against the
    card's fingerprint), under acquisition-like shifts: gamma, contrast, blur, sharpening,
    noise, JPEG, rotation, a tighter crop, other resampling;
(c) specificity per NORMAL series (`IM-…` and `NORMAL2-IM-…` file names) on that validation part.

Every shift is applied to the decoded greyscale image at its own size, *before* the package's
preprocessing; the model input is then made by `resize_xray` + `normalize`, exactly as for an
upload, so there is no second preprocessing path:

    file ──load_xray──> PIL "L" ──SHIFT──> PIL "L" ──resize_xray──> uint8 ──normalize──> model
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn import metrics as skm

from pneumonia.errors import XrayReadError
from pneumonia.reading.decoding import load_xray
from pneumonia.scoring.metrics import metrics_at_threshold
from pneumonia.training import dataset
from pneumonia.training.dataset import DataError, validation_part
from pneumonia.training.shifts import BASELINE, SHIFTS, apply_shift, model_pixels, shift_seed

THRESHOLD_NAMES = ("default", "screening")


# --- Data --------------------------------------------------------------------------------


class RobustnessError(ValueError):
    """Something the report cannot be made without; the message is meant for a person."""


def decode_all(paths, log=print) -> dict[Path, Image.Image]:
    """path -> decoded greyscale image at its own size; unreadable files are reported and left out."""
    images = {}
    for path in paths:
        try:
            images[Path(path)] = load_xray(path)
        except XrayReadError as err:
            log(f"skipped unreadable image {path}: {err}")
    return images


def originals_files(folder: str | Path) -> dataset.SplitFiles | None:
    """FOLDER/{NORMAL,PNEUMONIA}/ images (the layout of one Kaggle split); None when absent/empty."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    files = dataset.scan_split(folder.parent, folder.name)
    return files if files is not None and files.paths else None


# --- Scoring -----------------------------------------------------------------------------


def _finite(value: float) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def score(labels, probs, thresholds: dict) -> dict:
    """AUC (None with one class), mean probability per class, specificity / recall per threshold."""
    labels = np.asarray(labels, dtype=int)
    probs = np.asarray(probs, dtype=np.float64)
    both = len(set(labels.tolist())) == 2
    row = {
        "n": {name: int((labels == i).sum()) for i, name in enumerate(dataset.CLASS_NAMES)},
        "auc": float(skm.roc_auc_score(labels, probs)) if both else None,
        "normal_mean_p": _finite(probs[labels == 0].mean()) if (labels == 0).any() else None,
        "pneumonia_mean_p": _finite(probs[labels == 1].mean()) if (labels == 1).any() else None,
    }
    for name in THRESHOLD_NAMES:
        m = metrics_at_threshold(labels, probs, thresholds[name])
        row[name] = {
            "threshold": m["threshold"],
            "specificity": m["specificity"] if (labels == 0).any() else None,
            "recall": m["recall"] if (labels == 1).any() else None,
            "confusion_matrix": m["confusion_matrix"],
        }
    return row


def series_rows(
    files: dataset.SplitFiles, probs, thresholds: dict, train_files: dataset.SplitFiles | None
) -> list[dict]:
    """Specificity per NORMAL series on validation, with how many training NORMAL images each has."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(files.labels, dtype=int)
    series = np.asarray([dataset.normal_series(p) for p in files.paths])
    train_counts: dict[str, int] = {}
    if train_files is not None:
        for path, label in zip(train_files.paths, train_files.labels):
            if label == 0:
                train_counts[dataset.normal_series(path)] = train_counts.get(dataset.normal_series(path), 0) + 1
    rows = []
    for name in sorted(set(series[labels == 0].tolist())):
        mask = (labels == 0) & (series == name)
        p = probs[mask]
        rows.append(
            {
                "series": name,
                "n_validation": int(mask.sum()),
                "n_train": train_counts.get(name, 0),
                "normal_mean_p": float(p.mean()),
                **{f"specificity_{t}": float((p < thresholds[t]).mean()) for t in THRESHOLD_NAMES},
            }
        )
    return rows


def summary_row(rows: list[dict]) -> dict:
    """Worst case and mean specificity (and recall) at the default threshold across the shifts."""
    shifted = [r for r in rows if r["shift"] != BASELINE and r["default"]["specificity"] is not None]
    if not shifted:
        return {}
    spec = [r["default"]["specificity"] for r in shifted]
    rec = [r["default"]["recall"] for r in shifted if r["default"]["recall"] is not None]
    worst = min(shifted, key=lambda r: r["default"]["specificity"])
    return {
        "worst_specificity_default": worst["default"]["specificity"],
        "worst_shift": worst["shift"],
        "worst_shift_recall_default": worst["default"]["recall"],
        "mean_specificity_default": float(np.mean(spec)),
        "mean_recall_default": float(np.mean(rec)) if rec else None,
        "min_auc": min((r["auc"] for r in shifted if r["auc"] is not None), default=None),
    }


# --- The run -----------------------------------------------------------------------------

NOTES = [
    "Check (c) splits the validation specificity by NORMAL series the model was trained on; the test of "
    "transfer to an unseen series is a model trained with `train --hold-out-series NORMAL2-IM`, whose card "
    "reports the specificity on the series it never saw (held_out_series).",
    "Shifts are applied to the decoded image at its own size, before the package's own resize and "
    "normalisation; rows are on the validation part of train/, which training chose thresholds on, so the "
    "'none' row is optimistic by construction: read the rows as movements away from it.",
]


def validation_splits(data_dir: str | Path, model_paths: list[str], log=print) -> list[tuple]:
    """Each model's own validation part (the same one when their cards agree), checked before any
    model is loaded so a wrong DATA_DIR fails at once."""
    from pneumonia.serving.classifier import find_card

    splits = []
    for path in model_paths:
        val, info = validation_part(data_dir, find_card(path)[1])
        if "warning" in info:
            log(f"warning: {path}: {info['warning']}")
        splits.append((val, info))
    return splits


def probabilities_of(classifier, images: dict, paths) -> np.ndarray:
    """The classifier's calibrated probabilities for `images[path]` (decoded PIL images), in `paths` order."""
    return classifier.probabilities_from_pixels(
        np.stack([model_pixels(images[p], classifier.image_size) for p in paths])
    )


def probabilities_under_shifts(decoded: dict, classifiers: list, parts: list, log=print) -> dict[str, list]:
    """{shift: [each model's probabilities on its validation part]}; each shift applied to each image once."""
    probs: dict[str, list[np.ndarray]] = {}
    for shift_name in [BASELINE] + [s.name for s in SHIFTS]:
        shifted = {p: apply_shift(shift_name, image, shift_seed(p)) for p, image in decoded.items()}
        probs[shift_name] = []
        for classifier, files in zip(classifiers, parts):
            probs[shift_name].append(probabilities_of(classifier, shifted, files.paths))
        log(f"scored shift {shift_name}")
    return probs


def decoded_originals(originals: str | Path | None, log=print) -> tuple[dataset.SplitFiles | None, dict]:
    originals_set = originals_files(originals) if originals else None
    if originals is None:
        log("originals: not given (--originals FOLDER with NORMAL/ and PNEUMONIA/); skipped")
    elif originals_set is None:
        log(f"originals: {originals} has no NORMAL/ or PNEUMONIA/ images; skipped")
    return originals_set, decode_all(originals_set.paths, log=log) if originals_set else {}


def _originals_entry(classifier, originals_set: dataset.SplitFiles, decoded: dict) -> dict | None:
    if not decoded:
        return None
    paths = [p for p in originals_set.paths if p in decoded]
    labels = [originals_set.labels[originals_set.paths.index(p)] for p in paths]
    probs = probabilities_of(classifier, decoded, paths)
    images = [
        {"file": f"{dataset.CLASS_NAMES[y]}/{p.name}", "probability": float(q)} for p, y, q in zip(paths, labels, probs)
    ]
    return {**score(labels, probs, classifier.thresholds), "images": images}


def _training_part(all_train: dataset.SplitFiles | None, val: dataset.SplitFiles, info: dict):
    """What the model was trained on: train/ less its validation part and any held-out series."""
    if all_train is None:
        return None
    val_set = set(val.paths)
    rest = all_train.subset([i for i, p in enumerate(all_train.paths) if p not in val_set])
    return dataset.split_off_series(rest, info.get("hold_out_series"))[0]


def run(
    data_dir: str | Path,
    model_paths: list[str],
    originals: str | Path | None = None,
    names: list[str] | None = None,
    log=print,
) -> dict:
    """Scores every model on (a) the originals, (b) validation under each shift, (c) per series."""
    from pneumonia.serving.classifier import XrayClassifier

    splits = validation_splits(data_dir, model_paths, log)
    classifiers = [XrayClassifier(path) for path in model_paths]
    names = names or [c.name for c in classifiers]
    shifts = {BASELINE: "no change", **{s.name: s.description for s in SHIFTS}}
    report: dict = {
        "data_dir": str(data_dir),
        "originals": str(originals) if originals else None,
        "shifts": shifts,
        "notes": list(NOTES),
        "models": [],
    }

    # Every validation file is decoded once and kept in memory.
    all_train = dataset.scan_split(data_dir, "train")
    unique_paths = sorted({p for val, _ in splits for p in val.paths})
    log(f"decoding {len(unique_paths)} validation images of {data_dir}/train/ once")
    decoded = decode_all(unique_paths, log=log)
    parts = [val.subset([i for i, p in enumerate(val.paths) if p in decoded]) for val, _ in splits]
    probs = probabilities_under_shifts(decoded, classifiers, parts, log)
    originals_set, originals_decoded = decoded_originals(originals, log)

    for m, (classifier, name, files, (val, info)) in enumerate(zip(classifiers, names, parts, splits)):
        info["n_scored"] = files.counts()
        labels = np.asarray(files.labels, dtype=int)
        scored = [
            {"shift": s, "description": shifts[s], **score(labels, probs[s][m], classifier.thresholds)} for s in shifts
        ]
        report["models"].append(
            {
                "name": name,
                "path": str(model_paths[m]),
                "card_name": classifier.name,
                "thresholds": {t: classifier.thresholds[t] for t in THRESHOLD_NAMES},
                "validation": info,
                "originals": _originals_entry(classifier, originals_set, originals_decoded),
                "shifts": scored,
                "summary": summary_row(scored),
                "series": series_rows(
                    files, probs[BASELINE][m], classifier.thresholds, _training_part(all_train, val, info)
                ),
            }
        )
    return report


# --- Output ------------------------------------------------------------------------------


def _f(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _table(header: str, names: list[str], rows: list[tuple[str, list[str]]]) -> list[str]:
    lines = [f"| {header} | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    lines += [f"| {label} | " + " | ".join(cells) + " |" for label, cells in rows]
    return lines + [""]


def _originals_section(report: dict, models: list[dict], names: list[str]) -> list[str]:
    lines = ["## (a) Full-resolution originals", ""]
    if not any(m["originals"] for m in models):
        return lines + ["Not given or not found: skipped.", ""]
    n = models[0]["originals"]["n"]
    lines += [f"`{report['originals']}`: {n['NORMAL']} NORMAL, {n['PNEUMONIA']} PNEUMONIA.", ""]

    def cells(cell) -> list[str]:
        return [cell(m["originals"]) if m["originals"] else "–" for m in models]

    rows = [
        ("AUC", cells(lambda r: _f(r["auc"]))),
        ("NORMAL mean p", cells(lambda r: _f(r["normal_mean_p"]))),
        ("PNEUMONIA mean p", cells(lambda r: _f(r["pneumonia_mean_p"]))),
    ]
    rows += [
        (f"specificity / recall @ {t}", cells(lambda r, t=t: f"{_f(r[t]['specificity'])} / {_f(r[t]['recall'])}"))
        for t in THRESHOLD_NAMES
    ]
    return lines + _table("metric", names, rows)


def _over_shifts_rows(models: list[dict]) -> list[tuple[str, list[str]]]:
    """The worst and the mean specificity (with recall) at the default threshold across the shifts."""
    worst, mean = [], []
    for m in models:
        summary = m["summary"]
        worst.append(
            f"**{_f(summary.get('worst_specificity_default'))}** / "
            f"{_f(summary.get('worst_shift_recall_default'))} ({summary.get('worst_shift', '–')})"
        )
        mean.append(f"**{_f(summary.get('mean_specificity_default'))}** / {_f(summary.get('mean_recall_default'))}")
    return [
        ("**worst case over shifts** (specificity / recall)", worst),
        ("**mean over shifts** (specificity / recall)", mean),
    ]


def _shifts_section(models: list[dict], names: list[str]) -> list[str]:
    v = models[0]["validation"]
    matches = "; ".join(
        f"{m['name']} {'matches' if m['validation']['fingerprint_matches'] else 'DOES NOT match'} the card"
        for m in models
    )
    lines = [
        "## (b) Validation part of train/ under acquisition shifts",
        "",
        f"Recreated with val_fraction {v['val_fraction']}, seed {v['seed']}: "
        + ", ".join(f"{k} {n}" for k, n in v["n_scored"].items())
        + f"; fingerprint {matches}.",
        "",
    ]
    shifts = models[0]["shifts"]
    label = lambda r: f"{r['shift']}: {r['description']}" if r["shift"] != BASELINE else "none"  # noqa: E731
    tables = (
        (
            "specificity / recall @ default",
            lambda r: f"{_f(r['default']['specificity'])} / {_f(r['default']['recall'])}",
        ),
        (
            "specificity / recall @ screening",
            lambda r: f"{_f(r['screening']['specificity'])} / {_f(r['screening']['recall'])}",
        ),
        ("AUC / NORMAL mean p", lambda r: f"{_f(r['auc'])} / {_f(r['normal_mean_p'])}"),
    )
    for title, cell in tables:
        rows = [(label(r), [cell(m["shifts"][i]) for m in models]) for i, r in enumerate(shifts)]
        if title.endswith("@ default"):
            rows += _over_shifts_rows(models)
        lines += [f"### {title}", ""] + _table("shift", names, rows)
    return lines


def _series_section(models: list[dict], names: list[str]) -> list[str]:
    by_model = [{s["series"]: s for s in m["series"]} for m in models]
    rows = []
    for name in sorted({s["series"] for m in models for s in m["series"]}):
        counts = next(b[name] for b in by_model if name in b)
        cells = [
            f"{_f(b[name]['specificity_default'])} @ default, {_f(b[name]['specificity_screening'])} @ "
            f"screening, mean p {_f(b[name]['normal_mean_p'])}"
            if name in b
            else "–"
            for b in by_model
        ]
        rows.append((f"{name} ({counts['n_validation']} / {counts['n_train']})", cells))
    return ["## (c) Specificity per NORMAL series (validation, no shift)", ""] + _table(
        "series (validation / training NORMAL images)", names, rows
    )


def to_markdown(report: dict) -> str:
    models = report["models"]
    names = [m["name"] for m in models]
    described = "; ".join(
        f"{m['name']} (`{m['path']}`, thresholds default {m['thresholds']['default']:.3f}, "
        f"screening {m['thresholds']['screening']:.3f})"
        for m in models
    )
    lines = ["# Robustness proxies", "", f"Data: `{report['data_dir']}`. Models: {described}.", ""]
    lines += _originals_section(report, models, names)
    lines += _shifts_section(models, names)
    lines += _series_section(models, names)
    lines += ["## Notes", ""] + [f"- {note}" for note in report["notes"]]
    lines += [f"- **{m['name']}: {m['validation']['warning']}.**" for m in models if "warning" in m["validation"]]
    return "\n".join(lines) + "\n"


def write_report(report: dict, out_dir: str | Path) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "robustness.json", out / "robustness.md"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    md_path.write_text(to_markdown(report))
    return json_path, md_path


def main(argv=None) -> int:
    import argparse
    import sys

    from pneumonia.errors import ModelLoadError
    from pneumonia.evaluation.report import model_folder_names
    from pneumonia.serving.classifier import SHIPPED_MODEL_DIR

    parser = argparse.ArgumentParser(
        prog="python -m studies.robustness",
        description="Proxies for distribution shift: originals, the validation part under acquisition shifts, "
        "specificity per NORMAL series",
    )
    parser.add_argument("data_dir", help="Kaggle-layout root; the validation part of train/ is recreated from the card")
    parser.add_argument(
        "--model", action="append", help="model folder or .keras file (repeat to compare; default: the shipped model)"
    )
    parser.add_argument(
        "--originals", help="FOLDER/{NORMAL,PNEUMONIA} of full-resolution images (e.g. ../shared/samples/original-val)"
    )
    parser.add_argument("--out", default="reports/robustness")
    args = parser.parse_args(argv)
    models = args.model or [str(SHIPPED_MODEL_DIR)]
    try:
        report = run(args.data_dir, models, args.originals, names=model_folder_names(models))
    except (RobustnessError, DataError, ModelLoadError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    json_path, md_path = write_report(report, args.out)
    print(to_markdown(report))
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
