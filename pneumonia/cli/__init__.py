"""`python -m pneumonia {train,evaluate,predict,fit-ood,export,export-web,calibrate,pacs,archive,monitor}`: one
module per command, each a parser and a `run(args)` that calls the library and turns its errors into exit codes."""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's start-up chatter out of the output

COMMANDS = (
    "train",
    "evaluate",
    "predict",
    "fit_ood",
    "export",
    "export_web",
    "calibrate",
    "pacs",
    "archive",
    "monitor",
)


class CommandFailed(Exception):
    """A command that stops with the exit status `code`, its message already printed."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


def positive_int(text: str) -> int:
    number = int(text)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {number}")
    return number


def fail(message) -> int:
    """Exit status 2 with `error: message` on stderr: what every command does for a usage or input error."""
    print(f"error: {message}", file=sys.stderr)
    return 2


def load_classifier(model, runtime):
    """The model to screen with (its gate's absence noted on stderr); exit status 2 when it cannot be loaded."""
    from pneumonia.errors import ModelLoadError
    from pneumonia.serving.classifier import XrayClassifier

    try:
        classifier = XrayClassifier(model, runtime)
    except ModelLoadError as err:
        raise CommandFailed(fail(err)) from None
    if classifier.gate is None:
        print(f"note: the out-of-distribution gate is off ({classifier.gate_status})", file=sys.stderr)
    return classifier


def build_parser() -> argparse.ArgumentParser:
    import importlib

    from pneumonia.serving.classifier import default_model_path

    parser = argparse.ArgumentParser(
        prog="python -m pneumonia",
        description="Pneumonia screening from chest X-rays (research tool, not a medical device).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"pneumonia.cli.{name}").add(commands, str(default_model_path()))
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except CommandFailed as stop:
        return stop.code
