"""`export`: the model's explain and forward graphs as ONNX, into its folder (what the app serves)."""

from __future__ import annotations

from pneumonia.cli import fail


def run(args) -> int:
    from pneumonia.errors import ModelLoadError
    from pneumonia.training.export import ExportError, export

    try:
        export(args.model)
    except (ModelLoadError, ExportError) as err:
        return fail(err)
    return 0


def add(commands, shipped: str) -> None:
    export = commands.add_parser(
        "export", help="write the model's explain and forward graphs as ONNX (what the app serves) into its folder"
    )
    export.add_argument("model", help="model folder or .keras file")
    export.set_defaults(run=run)
