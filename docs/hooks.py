"""MkDocs hooks: the pages' generated parts, so that nothing that can drift is typed by hand.

A page asks for a part with a marker line, `<!-- generated: NAME [ARGUMENT] -->`, which `on_page_markdown`
replaces at build time:

- `cli`: every command's `--help`, from the package's argparse parsers (`pneumonia.cli.build_parser`);
- `api`: the JSON API's paths, parameters, responses and schemas, from its OpenAPI document as the app
  generates it (`pneumonia.web.openapi.document` of the API's blueprint with the default settings, what
  `/openapi.json` serves);
- `card SECTION`: figures of the shipped model, from its card `model/model.json`;
- `include PATH [LEVEL]`: a Markdown file of the repository (e.g. `model/report/levers.md`), its top
  heading at LEVEL (default 1).

`python docs/hooks.py readme-table` prints the README's results table from the card (a test checks
that README.md holds it).
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CARD = ROOT / "model" / "model.json"
BASELINE = ROOT / "model" / "report" / "custom" / "metrics.json"
MARKER = re.compile(r"^<!-- generated: (\S+)(?: (.*?))? -->$", re.MULTILINE)


def on_page_markdown(markdown, page=None, config=None, files=None, **_):
    return MARKER.sub(lambda match: generate(match.group(1), match.group(2)), markdown)


def generate(name: str, argument: str | None) -> str:
    if str(ROOT) not in sys.path:  # the package of this checkout, which the references are generated from
        sys.path.insert(0, str(ROOT))
    if name == "cli":
        return cli_reference()
    if name == "api":
        return api_reference()
    if name == "card":
        return CARD_SECTIONS[argument](load_card())
    if name == "include":
        path, _, level = argument.partition(" ")
        return include((ROOT / path).read_text(encoding="utf-8"), int(level or 1))
    raise ValueError(f"unknown generated part {name!r}")


def include(markdown: str, level: int) -> str:
    """`markdown` with its headings moved so that its top heading is at `level` (code blocks left as they are)."""
    lines, fenced = [], False
    for line in markdown.splitlines():
        fenced ^= line.startswith("```")
        if not fenced and line.startswith("#"):
            line = "#" * (level - 1) + line
        lines.append(line)
    return "\n".join(lines) + "\n"


def cell(value) -> str:
    """A value fit for one Markdown table cell."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text.replace("|", "\\|").replace("\n", " ").strip()


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# --- the command line ------------------------------------------------------------------------------


def cli_reference() -> str:
    from pneumonia.cli import build_parser
    from pneumonia.serving.classifier import SHIPPED_MODEL_DIR

    saved = {name: os.environ.get(name) for name in ("COLUMNS", "PNEUMONIA_MODEL_PATH")}
    os.environ["COLUMNS"] = "100"  # argparse wraps at the terminal's width: fix it for the page
    os.environ.pop("PNEUMONIA_MODEL_PATH", None)  # the defaults shown are the shipped model's
    try:
        parts = []
        for title, parser in _parsers(build_parser(), []):
            text = parser.format_help().replace(str(SHIPPED_MODEL_DIR), "model/ (the shipped model)")
            parts.append(f"### `{title}` {{#{title.replace(' ', '-')}}}\n\n```text\n{text.rstrip()}\n```\n")
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return "\n".join(parts)


def _parsers(parser, words: list[str]):
    """(command words, parser) for every command and subcommand under `parser`, in their order."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield " ".join([*words, name]), sub
                yield from _parsers(sub, [*words, name])


# --- the JSON API ----------------------------------------------------------------------------------


def api_reference() -> str:
    from pneumonia.web.api import bp
    from pneumonia.web.openapi import document
    from pneumonia.web.settings import Settings

    spec = document(Settings(), bp)
    parts = [spec["info"].get("description", ""), _limits(spec["info"].get("x-limits", {}))]
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            parts.append(_operation(spec, path, method, operation))
    parts.append("## Schemas\n")
    for name, schema in spec["components"]["schemas"].items():
        parts.append(_schema(name, schema))
    return "\n\n".join(parts)


def _limits(limits: dict) -> str:
    rows = []
    for key, value in limits.items():
        if isinstance(value, dict):
            rows += [[f"`{key}.{sub}`", f"`{cell(val)}`"] for sub, val in value.items()]
        else:
            rows.append([f"`{key}`", f"`{cell(value)}`"])
    return "The default limits, as `info.x-limits` of a server with the default settings states them:\n\n" + table(
        ["limit", "default"], rows
    )


def _operation(spec: dict, path: str, method: str, operation: dict) -> str:
    lines = [
        f"## `{method.upper()} {path}`\n",
        f"**{operation.get('summary', '')}**\n",
        operation.get("description", ""),
    ]
    if operation.get("parameters"):
        rows = [
            [
                f"`{p['name']}`",
                p["in"],
                _type(p.get("schema", {})),
                cell(p.get("schema", {}).get("default", "")),
                p.get("description", ""),
            ]
            for p in operation["parameters"]
        ]
        lines += ["\n**Parameters**\n", table(["name", "in", "type", "default", "description"], rows)]
    body = operation.get("requestBody")
    if body:
        for media, content in body.get("content", {}).items():
            lines += [f"\n**Request body** (`{media}`)\n", _properties(content.get("schema", {}))]
    rows = []
    examples = []
    for status, response in operation.get("responses", {}).items():
        response = _resolve(spec, response)
        kinds = ", ".join(
            f"`{media}` {_type(content.get('schema', {}))}" for media, content in response.get("content", {}).items()
        )
        headers = ", ".join(f"`{name}`" for name in response.get("headers", {}))
        rows.append([status, response.get("description", ""), kinds, headers])
        for media, content in response.get("content", {}).items():
            for example_name, example in content.get("examples", {}).items():
                if "value" in example and status.startswith("2"):
                    value = json.dumps(example["value"], indent=2)
                    examples.append(f"`{status}` `{media}`, {example_name}:\n\n```json\n{value}\n```\n")
    lines += ["\n**Responses**\n", table(["status", "description", "body", "headers"], rows)]
    if examples:
        lines += ["\n**Examples**\n", *examples]
    return "\n".join(lines)


def _resolve(spec: dict, node: dict) -> dict:
    while "$ref" in node:
        where = node["$ref"].removeprefix("#/").split("/")
        node = spec
        for key in where:
            node = node[key]
    return node


def _type(schema: dict) -> str:
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return f"[{name}](#schema-{name.lower()})"
    if "const" in schema:
        return f"`{json.dumps(schema['const'])}`"
    for combinator in ("oneOf", "anyOf", "allOf"):
        if combinator in schema and "type" not in schema and "properties" not in schema:
            options = [_type(option) for option in schema[combinator]]
            return " or ".join(options) if combinator == "anyOf" else f"{combinator}: " + ", ".join(options)
    kind = schema.get("type", "")
    kind = " or ".join(kind) if isinstance(kind, list) else kind
    if kind == "array" and "items" in schema:
        kind = f"array of {_type(schema['items'])}"
    if "enum" in schema:
        kind += " (" + ", ".join(f"`{value}`" for value in schema["enum"]) + ")"
    if "pattern" in schema:
        kind += f" matching `{schema['pattern']}`"
    return kind


def _properties(schema: dict) -> str:
    required = set(schema.get("required", []))
    rows = [
        [f"`{name}`", _type(prop), "yes" if name in required else "", prop.get("description", "")]
        for name, prop in schema.get("properties", {}).items()
    ]
    return table(["field", "type", "required", "description"], rows) if rows else _type(schema) + "\n"


def _schema(name: str, schema: dict) -> str:
    lines = [f"### {name} {{#schema-{name.lower()}}}\n"]
    if schema.get("description"):
        lines.append(schema["description"] + "\n")
    if "properties" in schema:
        lines.append(_properties(schema))
        if "oneOf" in schema:
            lines.append("One of: " + "; ".join(_constraint(option) for option in schema["oneOf"]) + ".\n")
    else:
        lines.append(_type(schema) + "\n")
    return "\n".join(lines)


def _constraint(option: dict) -> str:
    if set(option) == {"required"}:
        return "has " + ", ".join(f"`{name}`" for name in option["required"])
    return _type(option)


# --- the model card --------------------------------------------------------------------------------


def load_card() -> dict:
    return json.loads(CARD.read_text(encoding="utf-8"))


def fmt(value, digits: int = 3) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return "" if value is None else str(value)


def interval(card: dict, metric: str) -> str:
    return _bounds(card.get("validation", {}), metric)


def _bounds(metrics: dict, metric: str) -> str:
    bounds = metrics.get("ci95", {}).get(metric)
    return f" [{fmt(bounds[0], 4)}, {fmt(bounds[1], 4)}]" if bounds else ""


def card_summary(card: dict) -> str:
    preprocessing = card.get("preprocessing", {})
    rows = [
        ["name", card.get("name")],
        ["architecture", card.get("architecture")],
        ["file", f"`model/{card.get('file')}`"],
        ["input", f"{card.get('input_size')} × {card.get('input_size')} px"],
        ["classes", ", ".join(card.get("class_names", []))],
        ["contrast", preprocessing.get("contrast")],
        ["colour", preprocessing.get("colour")],
        ["resize", preprocessing.get("resize")],
        ["bit depth", preprocessing.get("bit_depth")],
        [
            "Grad-CAM layer",
            "{} ({})".format(
                card.get("gradcam", {}).get("layer"), "×".join(map(str, card.get("gradcam", {}).get("map_size", [])))
            ),
        ],
        ["versions", ", ".join(f"{key} {value}" for key, value in card.get("versions", {}).items())],
    ]
    return table(["", "from `model/model.json`"], [row for row in rows if row[1] not in (None, "", "None")])


def card_validation(card: dict) -> str:
    validation = card.get("validation", {})
    counts = validation.get("n", {})
    rows = [
        ["images (" + ", ".join(f"{key} {value}" for key, value in counts.items()) + ")", sum(counts.values())],
        ["AUC [95 % CI]", fmt(validation.get("auc"), 4) + interval(card, "auc")],
        ["average precision", fmt(validation.get("average_precision"), 4)],
        ["loss", fmt(validation.get("loss"), 4)],
    ]
    for name, point in validation.get("thresholds", {}).items():
        matrix = point.get("confusion_matrix", {})
        rows += [
            [f"**{name}** threshold", fmt(point.get("threshold"))],
            [
                f"accuracy / precision / recall / specificity / F1 at {name}",
                " / ".join(fmt(point.get(key)) for key in ("accuracy", "precision", "recall", "specificity", "f1")),
            ],
            [f"confusion matrix at {name}", ", ".join(f"{key} {value}" for key, value in matrix.items())],
        ]
    ci = validation.get("ci95", {})
    rows += [
        [f"95 % CI of {key} (default threshold)", f"[{fmt(b[0])}, {fmt(b[1])}]"]
        for key, b in ci.items()
        if key != "auc"
    ]
    return f"On the {validation.get('split', 'validation split')}:\n\n" + table(["", "value"], rows)


def card_calibration(card: dict) -> str:
    calibration = card.get("calibration", {})
    rows = [
        ["method", calibration.get("method")],
        ["slope, intercept", f"{fmt(calibration.get('slope'), 4)}, {fmt(calibration.get('intercept'), 4)}"],
        [
            "expected calibration error, raw → calibrated",
            f"{fmt(calibration.get('ece_before'))} → {fmt(calibration.get('ece_after'))}",
        ],
    ]
    return table(["calibration", ""], rows)


def card_thresholds(card: dict) -> str:
    thresholds = card.get("thresholds", {})
    rows = [
        ["default", fmt(thresholds.get("default"))],
        ["screening", fmt(thresholds.get("screening"))],
        ["target sensitivity", fmt(thresholds.get("target_sensitivity"), 2)],
        ["rule", f"`{thresholds.get('rule_name')}`: {thresholds.get('rule', '')}"],
        ["chosen on", thresholds.get("chosen_on")],
    ]
    return table(["thresholds", ""], rows)


def card_data(card: dict) -> str:
    data = card.get("data", {})
    rows = [
        [part, ", ".join(f"{key} {value}" for key, value in data.get(part, {}).items())]
        for part in ("train", "validation")
    ]
    rows += [[key, f"`{value}`"] for key, value in data.items() if key not in ("train", "validation")]
    return table(["data", ""], rows)


def card_training(card: dict) -> str:
    training = card.get("training", {})
    rows = [[key, f"`{value}`" if key == "command" else value] for key, value in training.items() if key != "config"]
    config = training.get("config", {})
    text = table(["training", ""], rows)
    if config:
        text += "\nIts settings (`training.config`):\n\n" + table(
            ["setting", "value"], [[f"`{k}`", v] for k, v in config.items()]
        )
    return text


def card_lineage(card: dict) -> str:
    runs = card.get("lineage", [])
    if not runs:
        return "The card has no lineage.\n"
    keys = [key for key in runs[0] if key not in ("command", "train_fingerprint")]
    rows = [[i + 1, *[fmt(run.get(key)) for key in keys]] for i, run in enumerate(runs)]
    commands = "\n".join(f"{i + 1}. `{run.get('command', '')}`" for i, run in enumerate(runs))
    return table(["run", *keys], rows) + "\nTheir commands:\n\n" + commands + "\n"


def card_selection(card: dict) -> str:
    selection = card.get("selection", {})
    return "\n".join(f"- **{key}**: {value}" for key, value in selection.items()) + "\n" if selection else ""


def card_expectations(card: dict) -> str:
    rows = []
    for group, shifts in card.get("expectations", {}).items():
        members = {group: shifts} if "default" in shifts else shifts
        for member, values in members.items():
            if not isinstance(values, dict) or "default" not in values:
                continue
            rows.append(
                [
                    member,
                    *[
                        fmt(values[point].get(key))
                        for point in ("default", "screening")
                        for key in ("specificity", "recall")
                    ],
                ]
            )
    header = ["proxy", "specificity at default", "recall at default", "specificity at screening", "recall at screening"]
    return table(header, rows) if rows else "The card has no `expectations`.\n"


def card_gate(card: dict) -> str:
    ood = card.get("ood", {})
    if not ood:
        return "The card has no gate (`ood`): the model serves with the gate off.\n"
    validation = ood.get("validation", {})
    refused = 100 * validation.get("refused_fraction", 0)
    unusual = 100 * validation.get("unusual_fraction", 0)
    refused_by = ", ".join(f"{reason} {n}" for reason, n in validation.get("refused_by", {}).items())
    rows = [
        [
            "validation part of `train/` (X-rays)",
            validation.get("images"),
            f"{refused:.2f} % ({refused_by}); {unusual:.1f} % flagged unusual",
            "",
        ]
    ]
    for name, result in ood.get("detection", {}).items():
        rows.append(
            [name, result.get("n"), f"{100 * result.get('refused_fraction', 0):.0f} %", fmt(result.get("auroc"))]
        )
    thresholds = ood.get("thresholds", {})
    bounds = ood.get("pixel_bounds", {})
    text = table(["images", "n", "refused", "AUROC of the feature distance vs validation"], rows)
    text += "\nFeature-distance thresholds: " + ", ".join(f"{key} {fmt(value, 2)}" for key, value in thresholds.items())
    text += f" (layer `{ood.get('layer')}`, {ood.get('feature_dim')} features). Pixel bounds: "
    text += ", ".join(f"{key} {fmt(value, 2)}" for key, value in bounds.items() if key != "derivation") + ".\n"
    return text


def card_export(card: dict) -> str:
    export = card.get("export", {})
    if not export:
        return "The card has no `export`: the model serves on the keras runtime.\n"
    rows = [[f"`{part['file']}`", f"`{part['sha256']}`"] for part in export.get("files", {}).values()]
    rows.append(["made from", f"`{export.get('keras_sha256')}`"])
    agreement = export.get("agreement_with_keras", {})
    rows.append(["largest difference from Keras", ", ".join(f"{key} {value}" for key, value in agreement.items())])
    rows.append(
        [
            "converter",
            f"{export.get('format')} opset {export.get('opset')}; "
            + ", ".join(f"{k} {v}" for k, v in export.get("versions", {}).items()),
        ]
    )
    return table(["export", "sha256"], rows)


def card_baseline(card: dict) -> str:
    """The shipped model's validation figures beside the baseline's (model/report/custom/metrics.json)."""
    columns = [(card.get("name", "shipped") + " (shipped)", card.get("validation", {}))]
    if BASELINE.exists():
        columns.append(("custom CNN (baseline)", json.loads(BASELINE.read_text(encoding="utf-8"))))
    rows = [["AUC [95 % CI]", *[fmt(metrics.get("auc"), 4) + _bounds(metrics, "auc") for _, metrics in columns]]]
    for point in ("default", "screening"):
        rows.append(
            [f"{point} threshold", *[fmt(m.get("thresholds", {}).get(point, {}).get("threshold")) for _, m in columns]]
        )
        rows.append(
            [
                f"accuracy / recall / specificity at {point}",
                *[
                    " / ".join(
                        fmt(m.get("thresholds", {}).get(point, {}).get(k))
                        for k in ("accuracy", "recall", "specificity")
                    )
                    for _, m in columns
                ],
            ]
        )
    counts = card.get("validation", {}).get("n", {})
    header = [f"validation ({sum(counts.values())} images)", *[name for name, _ in columns]]
    return table(header, rows)


# The seed's reported figures (ImageNet-pretrained DenseNet121, Kaggle test split of 624 images, the
# threshold chosen on that same split): fixed, so typed once here.
SEED = {"accuracy": 0.9022, "precision": 0.8764, "recall": 0.9821, "auc": 0.935}


def card_seed(card: dict) -> str:
    """The seed's own figures beside this model's independent evaluation (the card's `independent_evaluation`),
    both on the Kaggle test split."""
    independent = card.get("independent_evaluation")
    if not independent:
        return "The card has no `independent_evaluation`.\n"
    points = independent["thresholds"]
    header = [f"Kaggle test split ({independent['images']} images)", "the seed"]
    header += [f"this model, {name} threshold {fmt(points[name]['threshold'])}" for name in ("default", "screening")]
    rows = [["AUC", fmt(SEED["auc"]), fmt(independent["auc"]), fmt(independent["auc"])]]
    for key in ("accuracy", "precision", "recall", "specificity"):
        rows.append(
            [key, fmt(SEED.get(key)) or "–", *[fmt(points[name].get(key)) or "–" for name in ("default", "screening")]]
        )
    method = (
        f"\nThis model: measured on {independent['date']} with `{independent['command']}` ({independent['source']}), "
        f"on {independent['split']}. The seed's threshold was chosen on that same split.\n"
    )
    return table(header, rows) + method


def readme_table(card: dict | None = None) -> str:
    """The README's two short results tables (`python docs/hooks.py readme-table`): the seed beside this model on
    the test split, then the validation figures the thresholds were chosen on, beside the baseline."""
    card = card or load_card()
    return (
        card_seed(card)
        + "\nOn the patient-grouped validation part of `train/`, which the thresholds were chosen on, beside the "
        + "seed's 14-layer custom CNN trained by the same command, schedule and size:\n\n"
        + card_baseline(card)
    )


CARD_SECTIONS = {
    "summary": card_summary,
    "validation": card_validation,
    "calibration": card_calibration,
    "thresholds": card_thresholds,
    "data": card_data,
    "training": card_training,
    "lineage": card_lineage,
    "selection": card_selection,
    "expectations": card_expectations,
    "gate": card_gate,
    "export": card_export,
    "baseline": card_baseline,
    "seed": card_seed,
}


if __name__ == "__main__":
    if sys.argv[1:] != ["readme-table"]:
        sys.exit("usage: python docs/hooks.py readme-table")
    print(readme_table(), end="")
