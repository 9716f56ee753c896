"""Which threshold rule serves a new site best: every rule of `pneumonia/training/threshold_rules.py`
chosen on a model's validation part (and its shift set), then scored on what did not choose it.

    python -m studies.threshold_rules ../shared/data/chest_xray --model model \
        --originals ../shared/samples/original-val --out reports/threshold-rules

Scored on: the originals (a NORMAL series the validation part has few of, at full resolution), the
shifts no rule is chosen on (HELD_OUT_SHIFTS), for a rule chosen on one shift set the shifts of the
other sets, and for a model trained with `--hold-out-series` the NORMAL images of the series it never
saw, in training or in choosing a threshold. Writes rules.json and rules.md (the table in model/report/levers.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from pneumonia.errors import ModelLoadError
from pneumonia.serving.classifier import SHIPPED_MODEL_DIR, XrayClassifier
from pneumonia.training.config import HELD_OUT_SHIFTS, RULES, SHIFT_SETS
from pneumonia.training.dataset import DataError, unseen_series, validation_part
from pneumonia.training.shifts import BASELINE
from pneumonia.training.threshold_rules import rates_at, thresholds_by_rule
from studies.robustness import (
    RobustnessError,
    decode_all,
    decoded_originals,
    probabilities_of,
    probabilities_under_shifts,
)


def rates(labels, probs, threshold: float) -> dict:
    """Specificity and sensitivity (recall) at `threshold`, as the card reports them; Youden's J."""
    at = rates_at(labels, probs, {"t": threshold})["t"]
    both = at["specificity"] is not None and at["recall"] is not None
    return {**at, "j": at["specificity"] + at["recall"] - 1 if both else None}


def over_shifts(labels, probs_by_shift: dict, names, thresholds: dict) -> dict:
    """Mean specificity, recall and J at the default threshold over `names`; the worst screening recall."""
    at_default = [rates(labels, probs_by_shift[n], thresholds["default"]) for n in names]
    at_screening = [rates(labels, probs_by_shift[n], thresholds["screening"]) for n in names]
    return {
        "default_specificity": float(np.mean([r["specificity"] for r in at_default])),
        "default_recall": float(np.mean([r["recall"] for r in at_default])),
        "default_j": float(np.mean([r["j"] for r in at_default])),
        "screening_specificity": float(np.mean([r["specificity"] for r in at_screening])),
        "screening_worst_recall": float(min(r["recall"] for r in at_screening)),
    }


def score_rules(
    labels, probs_by_shift: dict, originals: tuple | None, target: float, unseen_normals=None
) -> list[dict]:
    """One row per rule; `unseen_normals`: the probabilities of a held-out series' NORMAL images, or None."""
    rows = []
    for rule in RULES:
        thresholds = thresholds_by_rule(labels, probs_by_shift, rule, target)
        other_sets = [s for name, group in SHIFT_SETS.items() if "+" not in name for s in group if s not in rule.shifts]
        row = {
            "rule": rule.name,
            "thresholds": thresholds,
            "validation": {name: rates(labels, probs_by_shift[BASELINE], t) for name, t in thresholds.items()},
            "held_out_shifts": over_shifts(labels, probs_by_shift, HELD_OUT_SHIFTS, thresholds),
            "other_sets": over_shifts(labels, probs_by_shift, other_sets, thresholds) if other_sets else None,
        }
        if originals is not None:
            row["originals"] = {name: rates(*originals, t) for name, t in thresholds.items()}
        if unseen_normals is not None:
            normal = np.zeros(len(unseen_normals), int)
            row["held_out_series"] = {
                name: rates(normal, unseen_normals, t)["specificity"] for name, t in thresholds.items()
            }
        rows.append(row)
    return rows


def _f(value) -> str:
    return "–" if value is None else f"{value:.3f}"


def to_markdown(rows: list[dict], model: str) -> str:
    unseen = all("held_out_series" in row for row in rows)
    lines = [
        f"Threshold rules for `{model}` (chosen on the validation part and the rule's shift set; scored elsewhere)",
        "",
        "| rule | default / screening | originals: spec / recall @ default; spec / recall @ screening "
        "| held-out shifts: spec / recall / J @ default; spec / worst recall @ screening | other sets: J @ default |"
        + (" held-out series: spec @ default / screening |" if unseen else ""),
        "|---|---|---|---|---|" + ("---|" if unseen else ""),
    ]
    for row in rows:
        held, original, other = row["held_out_shifts"], row.get("originals"), row["other_sets"]
        originals_cell = (
            f"{_f(original['default']['specificity'])} / {_f(original['default']['recall'])}; "
            f"{_f(original['screening']['specificity'])} / {_f(original['screening']['recall'])}"
            if original
            else "–"
        )
        lines.append(
            f"| {row['rule']} | {row['thresholds']['default']:.3f} / {row['thresholds']['screening']:.3f} "
            f"| {originals_cell} | {_f(held['default_specificity'])} / {_f(held['default_recall'])} / "
            f"{_f(held['default_j'])}; {_f(held['screening_specificity'])} / {_f(held['screening_worst_recall'])} "
            f"| {_f(other['default_j']) if other else '–'} |"
            + (
                f" {_f(row['held_out_series']['default'])} / {_f(row['held_out_series']['screening'])} |"
                if unseen
                else ""
            )
        )
    return "\n".join(lines) + "\n"


def run(data_dir: str, model: str, originals: str | None, log=print) -> list[dict]:
    classifier = XrayClassifier(model)
    files, info = validation_part(data_dir, classifier.card)
    if "warning" in info:
        log(f"warning: {info['warning']}")
    decoded = decode_all(files.paths, log=log)
    readable = files.subset([i for i, path in enumerate(files.paths) if path in decoded])
    labels = np.array(readable.labels)
    probs = probabilities_under_shifts(decoded, [classifier], [readable], log)
    probs_by_shift = {name: values[0] for name, values in probs.items()}
    originals_set, originals_decoded = decoded_originals(originals or str(Path(data_dir) / "val"), log)
    scored = None
    if originals_decoded:
        paths = [p for p in originals_set.paths if p in originals_decoded]
        scored = (
            [originals_set.labels[originals_set.paths.index(p)] for p in paths],
            probabilities_of(classifier, originals_decoded, paths),
        )
    unseen, unseen_probs = unseen_series(data_dir, classifier.card), None
    if unseen is not None:
        unseen_decoded = decode_all(unseen.paths, log=log)
        unseen_probs = probabilities_of(classifier, unseen_decoded, [p for p in unseen.paths if p in unseen_decoded])
    target = classifier.card.thresholds.target_sensitivity
    return score_rules(labels, probs_by_shift, scored, target, unseen_probs)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m studies.threshold_rules", description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", help="Kaggle-layout root; the validation part of train/ is recreated from the card")
    parser.add_argument("--model", default=str(SHIPPED_MODEL_DIR))
    parser.add_argument("--originals", help="FOLDER/{NORMAL,PNEUMONIA} (default: DATA_DIR/val)")
    parser.add_argument("--out", default="reports/threshold-rules")
    args = parser.parse_args(argv)
    try:
        rows = run(args.data_dir, args.model, args.originals)
    except (RobustnessError, DataError, ModelLoadError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rules.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / "rules.md").write_text(to_markdown(rows, args.model))
    print(to_markdown(rows, args.model))
    print(f"wrote {out / 'rules.json'} and {out / 'rules.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
