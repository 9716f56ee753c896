"""`python -m pneumonia {train,evaluate,predict,export,fit-ood,calibrate,robustness}`."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's start-up chatter out of the output


def _train(args) -> int:
    from pneumonia.models import InitError
    from pneumonia.training import train
    from pneumonia.training_config import DEFAULT_IMAGE_SIZE, DEFAULT_INIT, TrainConfig

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    config = TrainConfig(
        **{
            **given,
            "out": args.out or f"runs/{args.arch}",
            "init": args.init or DEFAULT_INIT[args.arch],
            "image_size": args.image_size or DEFAULT_IMAGE_SIZE[args.arch],
            "cache_dir": None if args.no_cache else args.cache_dir,
        }
    )
    try:
        card = train(config)
    except InitError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    v = card["validation"]
    print(
        f"validation AUC {v['auc']:.4f}; thresholds: default {card['thresholds']['default']:.3f}, "
        f"screening {card['thresholds']['screening']:.3f}"
    )
    return 0


def _evaluate(args) -> int:
    from pneumonia import dataset
    from pneumonia.classifier import ModelLoadError, XrayClassifier
    from pneumonia.evaluation import evaluate_predictions, format_table, save_plots, write_metrics

    files = dataset.scan_split(args.data_dir, args.split)
    if files is None or not files.paths:
        print(f"error: {args.data_dir} has no {args.split}/NORMAL or {args.split}/PNEUMONIA images", file=sys.stderr)
        return 2
    print(dataset.describe(args.split, files))
    results, folders = [], _model_folder_names(args.model)
    for model_path, folder in zip(args.model, folders):
        try:
            classifier = XrayClassifier(model_path)
        except ModelLoadError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        pixels, labels, kept = dataset.load_pixels(files, classifier.image_size, args.cache_dir, log=print)
        if len(set(labels.tolist())) < 2:  # AUC, specificity and the rest need both classes
            print(
                f"error: {args.data_dir} {args.split}/ needs readable NORMAL and PNEUMONIA images to evaluate on; "
                f"found {dataset.describe(args.split, kept)}",
                file=sys.stderr,
            )
            return 2
        features, logits = classifier.features_and_logits_of_pixels(pixels)
        probs = classifier.calibrated(logits)
        metrics = evaluate_predictions(labels, probs, classifier.thresholds, classifier.name, args.split)
        metrics["ood_gate"] = _gate_on_split(classifier, kept, features, labels, probs, args.split)
        out = Path(args.out) / folder if len(args.model) > 1 else Path(args.out)
        write_metrics(metrics, out)
        save_plots(labels, probs, metrics, out)
        print(format_table(metrics))
        print(f"wrote {out / 'metrics.json'} and plots\n")
        results.append(metrics)
    if len(results) > 1:
        path = Path(args.out) / "comparison.md"
        path.write_text(comparison_table(results, folders))
        print(path.read_text())
    return 0


def _gate_on_split(classifier, files, features, labels, probs, split: str) -> dict:
    """How many images of the split the gate refuses or flags, and the metrics on the accepted ones."""
    from pneumonia.evaluation import evaluate_predictions, format_table
    from pneumonia.fit_ood import pixel_stats_of, verdict_counts

    if classifier.gate is None:
        print(f"out-of-distribution gate: off ({classifier.gate_status})")
        return {"gate": "off", "detail": classifier.gate_status}
    gate = classifier.gate
    stats = pixel_stats_of(files)
    scores = gate.density.distance(features)
    counts = verdict_counts(gate, stats, scores)
    accepted = np.array([(gate.check_pixels(s) or gate.check_score(float(d))).accepted for s, d in zip(stats, scores)])
    print(
        f"out-of-distribution gate: refused {100 * counts['refused_fraction']:.1f} % "
        f"({sum(counts['refused_by'].values())} of {counts['images']}: {counts['refused_by'] or 'none'}), "
        f"flagged unusual {100 * counts['unusual_fraction']:.1f} %"
    )
    report = {"gate": "on", **counts, "metrics_on_accepted": None}
    if accepted.any() and len(set(labels[accepted].tolist())) == 2:
        report["metrics_on_accepted"] = evaluate_predictions(
            labels[accepted], probs[accepted], classifier.thresholds, classifier.name, f"{split} (accepted by the gate)"
        )
        print("on the images the gate accepted:\n" + format_table(report["metrics_on_accepted"]))
    return report


def _report_name(model_path: str) -> str:
    """The card's name made safe for a folder name, else the model folder's name."""
    from pneumonia.classifier import ModelLoadError, find_card

    try:
        name = str(find_card(model_path)[1].get("name") or "")
    except ModelLoadError:
        name = ""  # reported when the model is loaded
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or _model_folder(model_path)


def _model_folder(model_path: str) -> str:
    path = Path(model_path).resolve()
    return (path.parent if path.suffix == ".keras" else path).name


def _model_folder_names(model_paths: list[str]) -> list[str]:
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


GRADCAM_MAX_SIDE = 1024  # overlays written by `predict --gradcam`, as on the result page


def _predict(args) -> int:
    from pneumonia.batch_screening import BatchScreener, CsvRows, find_images
    from pneumonia.classifier import ModelLoadError, XrayClassifier
    from pneumonia.progress import ProgressBar

    try:
        classifier = XrayClassifier(args.model, args.runtime)
    except ModelLoadError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if classifier.gate is None:
        print(f"note: the out-of-distribution gate is off ({classifier.gate_status})", file=sys.stderr)
    found = find_images(args.paths)
    if found.skipped:
        print(
            f"note: skipped {len(found.skipped)} file(s) that are not images by content or name, e.g. "
            f"{found.skipped[0]}",
            file=sys.stderr,
        )
    if not found.files:
        print("error: no image files in " + ", ".join(args.paths), file=sys.stderr)
        return 2
    try:
        csv_file = open(args.csv, "w", newline="", encoding="utf-8") if args.csv else None
    except OSError as err:
        print(f"error: cannot write {args.csv}: {err.strerror}", file=sys.stderr)
        return 2
    batch = BatchScreener(classifier)
    progress = ProgressBar(len(found.files), sys.stderr)
    with csv_file or contextlib.nullcontext():
        table = (
            CsvRows(
                csv_file,
                "path",
                classifier.thresholds,
                classifier.gate is not None,
                ("gradcam",) if args.gradcam else (),
            )
            if csv_file
            else None
        )
        counts = _predict_files(args, batch, found.files, table, progress)
    progress.finish()
    print(
        f"{counts['files']} file(s): {counts['screened']} screened, {counts['refused']} refused by the gate, "
        f"{counts['failed']} unreadable" + (f"; wrote {args.csv}" if args.csv else ""),
        file=sys.stderr,
    )
    return 1 if counts["failed"] else 0


def _predict_files(args, batch, files: list[str], table, progress) -> dict[str, int]:
    """Screens `files` a chunk at a time: a line each on stdout, a CSV row, an overlay PNG."""
    counts = {"files": len(files), "screened": 0, "refused": 0, "failed": 0}
    rows = batch.screen(
        ((path, path) for path in files),
        args.batch_size,
        display_side=GRADCAM_MAX_SIDE if args.gradcam else None,
        with_gradcam=bool(args.gradcam),
    )
    for index, row in enumerate(rows, start=1):
        overlay_path = _write_overlay(args.gradcam, index, row) if args.gradcam else None
        if table is not None:
            table.write(row, *([overlay_path or ""] if args.gradcam else []))
        progress.clear()
        print(_prediction_line(row, batch.classifier, args.json), flush=True)
        progress.advance()
        kind = "screened" if row.probability is not None else "refused" if row.refused else "failed"
        counts[kind] += 1
    return counts


def _write_overlay(folder: str, index: int, row) -> str | None:
    """DIR/NNNNN-<name>.png: Grad-CAM of the default label's class over the X-ray; None when not screened."""
    import cv2

    from gradcam import overlay
    from pneumonia.batch_screening import overlay_file_name

    if row.heat is None:
        return None
    path = Path(folder) / overlay_file_name(index, row.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), overlay(row.display, row.heat)):
        raise OSError(f"could not write {path}")
    return str(path)


def _prediction_line(row, classifier, as_json: bool) -> str:
    """One output line: the probability and labels, or why the file was not screened."""
    image, verdict = row.name, row.verdict
    ood = None if verdict is None else {k: v for k, v in vars(verdict).items() if v is not None}
    if row.probability is None and not row.refused:
        return json.dumps({"path": image, "error": row.error}) if as_json else f"{image}\terror: {row.error}"
    if row.refused:
        if as_json:
            return json.dumps({"path": image, "probability": None, "ood": ood, "error": verdict.message})
        return f"{image}\tnot screened ({verdict.reason}): {verdict.message}"
    probability, labels = row.probability, row.labels
    if as_json:
        return json.dumps(
            {
                "path": image,
                "probability": round(probability, 6),
                "label": labels["default"],
                "screening_label": labels["screening"],
                "thresholds": classifier.thresholds,
                "ood": ood,
            }
        )
    warning = "\tunusual for this model" if verdict is not None and verdict.verdict == "unusual" else ""
    return (
        f"{image}\t{probability:.4f}\tdefault({classifier.thresholds['default']:.3f}): {labels['default']}"
        f"\tscreening({classifier.thresholds['screening']:.3f}): {labels['screening']}{warning}"
    )


def _fit_ood(args) -> int:
    from pneumonia.classifier import ModelLoadError
    from pneumonia.fit_ood import fit_ood, format_gate

    try:
        gate = fit_ood(args.model, args.data_dir, args.cache_dir)
    except ModelLoadError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_gate(gate))
    return 0


def _export(args) -> int:
    from pneumonia.classifier import ModelLoadError
    from pneumonia.export import ExportError, export

    try:
        export(args.model)
    except (ModelLoadError, ExportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def _calibrate(args) -> int:
    from pneumonia.classifier import ModelLoadError
    from pneumonia.recalibration import RecalibrationError, format_operating_figures, recalibrate

    try:
        result = recalibrate(
            args.model, args.site_dir, args.out, args.split, warn=lambda text: print(text, file=sys.stderr)
        )
    except (RecalibrationError, ModelLoadError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    recalibration = result.card["recalibration"]
    print(format_operating_figures(recalibration["metrics"], recalibration["previous_metrics"]))
    previous, new = recalibration["previous"]["thresholds"], result.card["thresholds"]
    print(
        f"thresholds (each on its own calibrated scale): default {previous['default']:.3f} -> {new['default']:.3f}, "
        f"screening {previous['screening']:.3f} -> {new['screening']:.3f}"
    )
    print(f"wrote {result.out} (serve it with PNEUMONIA_MODEL_PATH={result.out})")
    return 0


def _robustness(args) -> int:
    from pneumonia.classifier import SHIPPED_MODEL_DIR, ModelLoadError
    from pneumonia.robustness import RobustnessError, run, to_markdown, write_report

    models = args.model or [str(SHIPPED_MODEL_DIR)]
    try:
        report = run(args.data_dir, models, args.originals, names=_model_folder_names(models))
    except (RobustnessError, ModelLoadError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    json_path, md_path = write_report(report, args.out)
    print(to_markdown(report))
    print(f"wrote {json_path} and {md_path}")
    return 0


def _positive_int(text: str) -> int:
    number = int(text)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {number}")
    return number


def _add_train(commands) -> None:
    from pneumonia.dataset import NORMAL_SERIES
    from pneumonia.training_config import ARCHITECTURES, DEFAULT_IMAGE_SIZE, DEFAULT_INIT, TrainConfig

    default = TrainConfig(data_dir="")
    per_arch = lambda values: ", ".join(f"{v} for {arch}" for arch, v in values.items())  # noqa: E731
    train = commands.add_parser("train", help="train a model on a Kaggle-layout folder")
    train.add_argument("data_dir")
    train.add_argument("--arch", choices=ARCHITECTURES, default=default.arch)
    train.add_argument("--out", help="output folder (default runs/<arch>)")
    train.add_argument(
        "--init",
        help="imagenet, none, or a local DenseNet121 weights file or trained .keras model "
        f"(default: {per_arch(DEFAULT_INIT)})",
    )
    train.add_argument("--image-size", type=int, help=f"input side in pixels (default {per_arch(DEFAULT_IMAGE_SIZE)})")
    for name in ("epochs", "batch_size", "learning_rate", "val_fraction", "seed", "target_sensitivity"):
        value = getattr(default, name)
        train.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    train.add_argument(
        "--patience", type=int, default=default.patience, help="early stopping: epochs without a better validation AUC"
    )
    _add_generalisation_options(train, default)
    train.add_argument(
        "--hold-out-series",
        choices=NORMAL_SERIES,
        help="keep this NORMAL acquisition series out of training and validation and report the "
        "specificity on it in the card (a test of transfer to an unseen series)",
    )
    train.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.keras")
    train.add_argument("--cache-dir", default=default.cache_dir, help="where decoded, resized pixels are kept")
    train.add_argument("--no-cache", action="store_true")
    train.set_defaults(run=_train)


def _add_generalisation_options(train, default) -> None:
    """The levers of the generalisation study (model/report/levers.md)."""
    from pneumonia.preprocessing import CONTRASTS
    from pneumonia.training_config import AUGMENTATIONS

    train.add_argument(
        "--augment",
        choices=AUGMENTATIONS,
        default=default.augment,
        help="standard: rotation, shift, zoom, brightness, contrast; acquisition: also sharpness, "
        "gamma, noise and stronger contrast (what differs between X-ray machines); framing: also "
        "zooming in to a 65 %% field of view (how tightly a chest is framed differs between sites); "
        "normal-framing: zooming in on half of the NORMAL images only (to 70-95 %%)",
    )
    train.add_argument(
        "--match-sharpness",
        action="store_true",
        help="blur or sharpen about half of each class's training images to the other class's "
        "sharpness, so that blur cannot stand in for pneumonia",
    )
    train.add_argument(
        "--contrast",
        choices=CONTRASTS,
        default=default.contrast,
        help="contrast normalisation of the model's square, recorded in the card and applied "
        "everywhere the model is used: clahe (adaptive histogram equalisation) or equalize",
    )
    train.add_argument(
        "--label-smoothing",
        type=float,
        default=default.label_smoothing,
        help="binary cross-entropy label smoothing (0: none)",
    )
    train.add_argument(
        "--mixup",
        type=float,
        default=default.mixup,
        metavar="ALPHA",
        help="blend each training image and its label with a random other one of its batch, by a "
        "share drawn from Beta(ALPHA, ALPHA) (0: no mixup; 0.2-0.4 is usual)",
    )
    train.add_argument(
        "--ema", action="store_true", help="keep an exponential moving average of the weights and validate and save it"
    )


def _add_evaluate(commands) -> None:
    from pneumonia.dataset import SPLITS

    evaluate = commands.add_parser("evaluate", help="metrics, confusion matrices, ROC and PR curves on a split")
    evaluate.add_argument("data_dir")
    evaluate.add_argument("--split", default="test", choices=SPLITS)
    evaluate.add_argument("--model", action="append", help="model folder or .keras file (repeat to compare)")
    evaluate.add_argument("--out", default="reports/evaluation")
    evaluate.add_argument("--cache-dir", default=None, help="keep decoded pixels here between runs")
    evaluate.set_defaults(run=_evaluate)


def _add_predict(commands, shipped: str) -> None:
    from pneumonia.batch_screening import DEFAULT_CHUNK_SIZE

    predict = commands.add_parser("predict", help="probability of pneumonia for image files and folders")
    predict.add_argument(
        "paths",
        nargs="+",
        metavar="PATH",
        help="image files (JPEG, PNG, BMP, TIFF, DICOM) and folders, searched recursively for "
        "files that are images by content or by name",
    )
    predict.add_argument("--model", default=shipped, help="model folder or .keras file (default: the shipped model)")
    predict.add_argument("--json", action="store_true", help="one JSON object per line")
    predict.add_argument(
        "--runtime",
        choices=("onnx", "keras"),
        help="what runs the model (default: PNEUMONIA_RUNTIME, else onnx when the model's export is current)",
    )
    predict.add_argument(
        "--csv",
        metavar="FILE",
        help="also write one CSV row per file: path, probability, label at each threshold, the gate's verdict, error",
    )
    predict.add_argument("--gradcam", metavar="DIR", help="write each screened file's Grad-CAM overlay to DIR as a PNG")
    predict.add_argument(
        "--batch-size",
        type=_positive_int,
        default=DEFAULT_CHUNK_SIZE,
        help="images per model pass (default %(default)s); at most one full-size image is decoded at a time",
    )
    predict.set_defaults(run=_predict)


def _add_model_tools(commands, shipped: str) -> None:
    """fit-ood, calibrate and robustness: what is done to or measured on a trained model."""
    fit_ood = commands.add_parser(
        "fit-ood", help="fit the gate that refuses images that are not chest X-rays, for an existing model"
    )
    fit_ood.add_argument("model", help="model folder or .keras file; ood.npz is written beside it")
    fit_ood.add_argument("data_dir", help="the Kaggle-layout folder the model was trained on (its train/ split)")
    fit_ood.add_argument("--cache-dir", default="cache", help="decoded, resized pixels, shared with train")
    fit_ood.set_defaults(run=_fit_ood)

    export = commands.add_parser(
        "export", help="write the model's explain and forward graphs as ONNX (what the app serves) into its folder"
    )
    export.add_argument("model", help="model folder or .keras file")
    export.set_defaults(run=_export)

    calibrate = commands.add_parser(
        "calibrate",
        help="refit calibration and thresholds on a labelled sample from a new site; writes a new model folder",
    )
    calibrate.add_argument("site_dir", help="SITE_DIR/NORMAL/* and SITE_DIR/PNEUMONIA/* (or see --split)")
    calibrate.add_argument("--split", help="read SITE_DIR/SPLIT/{NORMAL,PNEUMONIA} (a Kaggle-layout root)")
    calibrate.add_argument("--model", default=shipped, help="model folder or .keras file (default: the shipped model)")
    calibrate.add_argument("--out", required=True, help="new model folder to write (must not exist or be empty)")
    calibrate.set_defaults(run=_calibrate)

    robustness = commands.add_parser(
        "robustness",
        help="proxies for distribution shift: originals, validation under "
        "acquisition shifts, specificity per NORMAL series",
    )
    robustness.add_argument(
        "data_dir", help="Kaggle-layout root; the validation part of train/ is recreated from the card"
    )
    robustness.add_argument(
        "--model", action="append", help="model folder or .keras file (repeat to compare; default: the shipped model)"
    )
    robustness.add_argument(
        "--originals", help="FOLDER/{NORMAL,PNEUMONIA} of full-resolution images (e.g. ../shared/samples/original-val)"
    )
    robustness.add_argument("--out", default="reports/robustness")
    robustness.set_defaults(run=_robustness)


def build_parser() -> argparse.ArgumentParser:
    from pneumonia.classifier import SHIPPED_MODEL_DIR

    parser = argparse.ArgumentParser(
        prog="python -m pneumonia",
        description="Pneumonia screening from chest X-rays (research tool, not a medical device).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    _add_train(commands)
    _add_evaluate(commands)
    _add_predict(commands, str(SHIPPED_MODEL_DIR))
    _add_model_tools(commands, str(SHIPPED_MODEL_DIR))
    return parser


def main(argv=None) -> int:
    from pneumonia.classifier import SHIPPED_MODEL_DIR

    args = build_parser().parse_args(argv)
    if args.command == "evaluate" and not args.model:
        args.model = [str(SHIPPED_MODEL_DIR)]
    return args.run(args)
