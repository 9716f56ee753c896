"""`calibrate`: refit calibration and both thresholds on a labelled sample of a new site."""

from __future__ import annotations

import sys

from pneumonia.cli import fail
from pneumonia.cli.options import add_model_option


def run(args) -> int:
    from pneumonia.errors import ModelLoadError
    from pneumonia.evaluation.recalibration import RecalibrationError, format_operating_figures, recalibrate

    try:
        result = recalibrate(
            args.model, args.site_dir, args.out, args.split, warn=lambda text: print(text, file=sys.stderr)
        )
    except (RecalibrationError, ModelLoadError) as err:
        return fail(err)
    recalibration = result.card.recalibration
    print(format_operating_figures(recalibration.metrics, recalibration.previous_metrics))
    previous, new = recalibration.previous.thresholds, result.card.thresholds
    print(
        f"thresholds (each on its own calibrated scale): default {previous.default:.3f} -> {new.default:.3f}, "
        f"screening {previous.screening:.3f} -> {new.screening:.3f}"
    )
    print(
        f"the model's thresholds came from the rule {previous.rule_name!r} ({previous.chosen_on}); "
        f"they are now refitted on the site sample: {new.rule}"
    )
    print(f"wrote {result.out} (serve it with PNEUMONIA_MODEL_PATH={result.out})")
    return 0


def add(commands, shipped: str) -> None:
    calibrate = commands.add_parser(
        "calibrate",
        help="refit calibration and thresholds on a labelled sample from a new site; writes a new model folder",
    )
    calibrate.add_argument("site_dir", help="SITE_DIR/NORMAL/* and SITE_DIR/PNEUMONIA/* (or see --split)")
    calibrate.add_argument("--split", help="read SITE_DIR/SPLIT/{NORMAL,PNEUMONIA} (a Kaggle-layout root)")
    add_model_option(calibrate, shipped)
    calibrate.add_argument("--out", required=True, help="new model folder to write (must not exist or be empty)")
    calibrate.set_defaults(run=run)
