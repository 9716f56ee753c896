"""`evaluate`: metrics, confusion matrices, ROC and PR curves of one or more models on a labelled split."""

from __future__ import annotations

from pathlib import Path

from pneumonia.cli import fail
from pneumonia.cli.options import add_model_option


def run(args) -> int:
    from pneumonia.errors import ModelLoadError
    from pneumonia.evaluation.report import EvaluationError, comparison_table, evaluate_model, model_folder_names
    from pneumonia.training import dataset

    files = dataset.scan_split(args.data_dir, args.split)
    if files is None or not files.paths:
        return fail(f"{args.data_dir} has no {args.split}/NORMAL or {args.split}/PNEUMONIA images")
    print(dataset.describe(args.split, files))
    models = args.model or [args.default_model]
    results, folders = [], model_folder_names(models)
    for model_path, folder in zip(models, folders):
        out = Path(args.out) / folder if len(models) > 1 else Path(args.out)
        try:
            results.append(evaluate_model(model_path, files, args.split, out, args.cache_dir))
        except ModelLoadError as err:
            return fail(err)
        except EvaluationError as err:
            return fail(f"{args.data_dir} {err}")
    if len(results) > 1:
        path = Path(args.out) / "comparison.md"
        path.write_text(comparison_table(results, folders))
        print(path.read_text())
    return 0


def add(commands, shipped: str) -> None:
    from pneumonia.training.dataset import SPLITS

    evaluate = commands.add_parser(
        "evaluate", help="metrics, confusion matrices, ROC and PR curves on a split (repeat --model to compare models)"
    )
    evaluate.add_argument("data_dir")
    evaluate.add_argument("--split", default="test", choices=SPLITS)
    add_model_option(evaluate, repeatable=True)
    evaluate.add_argument("--out", default="reports/evaluation")
    evaluate.add_argument("--cache-dir", default=None, help="keep decoded pixels here between runs")
    evaluate.set_defaults(run=run, default_model=shipped)
