"""`python -m pneumonia {train,evaluate,predict}`."""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's start-up chatter out of the output


def _train(args) -> int:
    from pneumonia.models import InitError
    from pneumonia.training import TrainConfig, train

    config = TrainConfig(
        data_dir=args.data_dir, arch=args.arch, out=args.out or f"runs/{args.arch}",
        init=args.init or ("imagenet" if args.arch == "densenet121" else "none"),
        image_size=args.image_size or (128 if args.arch == "densenet121" else 320), epochs=args.epochs,
        batch_size=args.batch_size, learning_rate=args.learning_rate, val_fraction=args.val_fraction,
        seed=args.seed, patience=args.patience, target_sensitivity=args.target_sensitivity,
        resume=args.resume, cache_dir=None if args.no_cache else args.cache_dir,
    )
    try:
        card = train(config)
    except InitError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    v = card["validation"]
    print(f"validation AUC {v['auc']:.4f}; thresholds: default {card['thresholds']['default']:.3f}, "
          f"screening {card['thresholds']['screening']:.3f}")
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
            print(f"error: {args.data_dir} {args.split}/ needs readable NORMAL and PNEUMONIA images to evaluate on; "
                  f"found {dataset.describe(args.split, kept)}", file=sys.stderr)
            return 2
        probs = classifier.probabilities_from_pixels(pixels)
        metrics = evaluate_predictions(labels, probs, classifier.thresholds, classifier.name, args.split)
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


def _model_folder_names(model_paths: list[str]) -> list[str]:
    """One report folder per --model, unique even when cards share a name (two runs of one
    architecture are both called "custom"): the card's name, else the model folder's name,
    else a numbered name."""
    from pneumonia.classifier import find_card, ModelLoadError

    def card_name(model_path: str) -> str:
        try:
            return str(find_card(model_path)[1].get("name") or "")
        except ModelLoadError:
            return ""  # reported when the model is loaded

    def folder_of(model_path: str) -> str:
        path = Path(model_path).resolve()
        return (path.parent if path.suffix == ".keras" else path).name

    names = [re.sub(r"[^A-Za-z0-9._-]+", "_", card_name(m)) or folder_of(m) for m in model_paths]
    chosen = []
    for model_path, name in zip(model_paths, names):
        if names.count(name) > 1:
            name = f"{name}-{folder_of(model_path)}"
        base, number = name, 2
        while name in chosen:
            name, number = f"{base}-{number}", number + 1
        chosen.append(name)
    return chosen


def comparison_table(results: list[dict], names: list[str] | None = None) -> str:
    rows = [("AUC", lambda m: m["auc"]), ("average precision", lambda m: m["average_precision"]),
            ("loss", lambda m: m["loss"])]
    for name in ("default", "screening"):
        for key in ("threshold", "accuracy", "precision", "recall", "specificity", "f1"):
            rows.append((f"{key} @ {name}", lambda m, n=name, k=key: m["thresholds"][n][k]))
    lines = [f"# Comparison on {results[0]['split']}", "",
             "| metric | " + " | ".join(names or [m["model"] for m in results]) + " |",
             "|---|" + "---|" * len(results)]
    lines += [f"| {label} | " + " | ".join(f"{get(m):.4f}" for m in results) + " |" for label, get in rows]
    return "\n".join(lines) + "\n"


def _predict(args) -> int:
    from pneumonia.classifier import ModelLoadError, XrayClassifier
    from pneumonia.preprocessing import XrayReadError

    try:
        classifier = XrayClassifier(args.model)
    except ModelLoadError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    failed = 0
    for image in args.images:
        try:
            probability = classifier.predict_source(image)
        except XrayReadError as err:
            failed += 1
            print(json.dumps({"path": image, "error": str(err)}) if args.json else f"{image}\terror: {err}")
            continue
        labels = classifier.labels(probability)
        if args.json:
            print(json.dumps({"path": image, "probability": round(probability, 6), "label": labels["default"],
                              "screening_label": labels["screening"], "thresholds": classifier.thresholds}))
        else:
            print(f"{image}\t{probability:.4f}\tdefault({classifier.thresholds['default']:.3f}): {labels['default']}"
                  f"\tscreening({classifier.thresholds['screening']:.3f}): {labels['screening']}")
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    from pneumonia.classifier import SHIPPED_MODEL_DIR

    parser = argparse.ArgumentParser(prog="python -m pneumonia",
                                     description="Pneumonia screening from chest X-rays (research tool, not a medical device).")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a model on a Kaggle-layout folder")
    train.add_argument("data_dir")
    train.add_argument("--arch", choices=("densenet121", "custom"), default="densenet121")
    train.add_argument("--out", help="output folder (default runs/<arch>)")
    train.add_argument("--init", help="imagenet, none, or a local DenseNet121 weights file "
                                      "(default: imagenet for densenet121, none for custom)")
    train.add_argument("--image-size", type=int, help="input side in pixels (default 128 for densenet121, 320 for custom)")
    train.add_argument("--epochs", type=int, default=30)
    train.add_argument("--batch-size", type=int, default=32)
    train.add_argument("--learning-rate", type=float, default=1e-3)
    train.add_argument("--val-fraction", type=float, default=0.1)
    train.add_argument("--seed", type=int, default=42)
    train.add_argument("--patience", type=int, default=6, help="early stopping: epochs without a better validation AUC")
    train.add_argument("--target-sensitivity", type=float, default=0.98)
    train.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.keras")
    train.add_argument("--cache-dir", default="cache", help="where decoded, resized pixels are kept between runs")
    train.add_argument("--no-cache", action="store_true")
    train.set_defaults(run=_train)

    evaluate = commands.add_parser("evaluate", help="metrics, confusion matrices, ROC and PR curves on a split")
    evaluate.add_argument("data_dir")
    evaluate.add_argument("--split", default="test", choices=("train", "val", "test"))
    evaluate.add_argument("--model", action="append", help="model folder or .keras file (repeat to compare)")
    evaluate.add_argument("--out", default="reports/evaluation")
    evaluate.add_argument("--cache-dir", default=None, help="keep decoded pixels here between runs")
    evaluate.set_defaults(run=_evaluate)

    predict = commands.add_parser("predict", help="probability of pneumonia for image files")
    predict.add_argument("images", nargs="+")
    predict.add_argument("--model", default=str(SHIPPED_MODEL_DIR), help="model folder or .keras file (default: the shipped model)")
    predict.add_argument("--json", action="store_true", help="one JSON object per line")
    predict.set_defaults(run=_predict)
    return parser


def main(argv=None) -> int:
    from pneumonia.classifier import SHIPPED_MODEL_DIR

    args = build_parser().parse_args(argv)
    if args.command == "evaluate" and not args.model:
        args.model = [str(SHIPPED_MODEL_DIR)]
    return args.run(args)
