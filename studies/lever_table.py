"""The lever table of model/report/levers.md from `python -m studies.robustness` reports.

    .venv/bin/python -m studies.lever_table runs/levers/robustness/robustness.json [more.json ...]

One row a model: validation AUC (the card), the originals (AUC, NORMAL mean probability,
specificity at the default and screening thresholds), the shifted validation part (mean and worst
specificity at the default threshold, mean NORMAL probability over the shifts) and the cost.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pneumonia.serving.card import ModelCard


def lever_row(model: dict) -> str:
    card = ModelCard.load(Path(model["path"]) / "model.json")
    originals, summary = model["originals"], model["summary"]
    shifted = [s for s in model["shifts"] if s["shift"] != "none"]
    normal_p = sum(s["normal_mean_p"] for s in shifted) / len(shifted)
    training = card.training
    cells = [
        f"`{model['path']}`",
        f"{card.validation.auc:.4f}",
        f"{originals['auc']:.3f} / {originals['normal_mean_p']:.3f} / {originals['default']['specificity']:.3f}"
        f" / {originals['screening']['specificity']:.3f}",
        f"{summary['mean_specificity_default']:.3f} / {summary['worst_specificity_default']:.3f}"
        f" ({summary['worst_shift']}) / {normal_p:.3f}",
        f"{training.epochs_run} epochs ({f'best {training.best_epoch}' if training.best_epoch else 'final'}), "
        f"{training.wall_time_s / 60:.0f} min",
    ]
    return "| " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+", help="robustness.json files")
    args = parser.parse_args(argv)
    print(
        "| model | validation AUC | originals: AUC / NORMAL mean p / specificity @ default / @ screening "
        "| shifts: specificity @ default mean / worst / NORMAL mean p | cost (2 CPU cores) |"
    )
    print("|---|---|---|---|---|")
    for report in args.reports:
        for model in json.loads(Path(report).read_text())["models"]:
            print(lever_row(model))
    return 0


if __name__ == "__main__":
    sys.exit(main())
