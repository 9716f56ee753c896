"""The options several commands share, declared once: `--model` (one help text for every command) and
`--runtime` (its choices are the runtime module's RUNTIMES)."""

from __future__ import annotations

import argparse

from pneumonia.serving.classifier import MODEL_PATH_ENV
from pneumonia.serving.runtime import RUNTIME_ENV, RUNTIMES

MODEL_HELP = f"model folder or .keras file (default: ${MODEL_PATH_ENV} when set, else the shipped model)"
RUNTIME_HELP = f"what runs the model (default: ${RUNTIME_ENV}, else onnx when the model's export is current)"


def add_model_option(parser: argparse.ArgumentParser, default: str | None = None, *, repeatable: bool = False) -> None:
    """`--model`, `default` when not given; `repeatable`: a list of every one given (None when none is, and
    the command takes its default itself)."""
    parser.add_argument("--model", action="append" if repeatable else "store", default=default, help=MODEL_HELP)


def add_runtime_option(parser: argparse.ArgumentParser) -> None:
    """`--runtime`, one of RUNTIMES; None leaves the choice to pneumonia.serving.runtime.load_runtime."""
    parser.add_argument("--runtime", choices=RUNTIMES, help=RUNTIME_HELP)
