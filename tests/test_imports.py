"""The project's module graph, read from the source: no module imports one that imports it back (at
module level or inside a function), so each can be read, tested and loaded on its own; and no layer
imports one it must not (LAYER_RULES), so the serving install and the web app never need training,
evaluation, the command line, the studies or the benchmarks, and training never needs the evaluation
workflows built on it."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
from builders import REPO

SOURCES = sorted(
    [
        *(REPO / "pneumonia").rglob("*.py"),
        *(REPO / "studies").rglob("*.py"),
        *(REPO / "bench").rglob("*.py"),
        REPO / "app.py",
        REPO / "gradcam.py",
    ]
)


def module_name(path: Path) -> str:
    relative = path.relative_to(REPO).with_suffix("")
    parts = relative.parts[:-1] if relative.name == "__init__" else relative.parts
    return ".".join(parts)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The project modules `path` imports anywhere in its body."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in known}
    return found - {module_name(path)}


def import_graph() -> dict[str, set[str]]:
    known = {module_name(path) for path in SOURCES}
    return {module_name(path): imported_modules(path, known) for path in SOURCES}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A list of modules that import each other in a ring, or None."""
    state: dict[str, str] = {}

    def visit(node: str, trail: list[str]) -> list[str] | None:
        state[node] = "open"
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return trail[trail.index(target) :] + [target]
            if target not in state and (cycle := visit(target, trail + [target])):
                return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


# --- Layers ------------------------------------------------------------------------------------

# The web app: a client of the package's layers that ships inside it, so that an installed package serves.
WEB = "pneumonia.web"

# The entry points: `python -m pneumonia`, the WSGI module (importing it loads the model) and the
# top-level Grad-CAM module import the layers, never the other way round.
ENTRY_POINTS = ("pneumonia.__main__", "app", "gradcam")
# The scripts run from a checkout (`python -m studies.NAME`, `python -m bench.NAME`): clients of the
# package, never imported by it.
SCRIPTS = ("studies", "bench")
# What the serving install (requirements.txt) does not have: training and evaluation need TensorFlow,
# scoring scikit-learn, SciPy and matplotlib (requirements-train.txt), and the command line imports them.
BEYOND_SERVING = (
    "pneumonia.scoring",
    "pneumonia.training",
    "pneumonia.evaluation",
    "pneumonia.cli",
    *SCRIPTS,
    *ENTRY_POINTS,
)
# The PACS client and its runs: they need dicomweb-client and requests, which the serving install lacks.
PACS_CLIENT = ("pneumonia.pacs.dicomweb", "pneumonia.pacs.runs")

# (layer prefix, the prefixes its modules must not import). A prefix names a module and the modules
# under it: "pneumonia.serving" is pneumonia/serving/__init__.py and every pneumonia.serving.* module.
LAYER_RULES: list[tuple[str, tuple[str, ...]]] = [
    # bytes -> pixels: only pneumonia.errors, pneumonia.labels and pneumonia.reading.*
    ("pneumonia.reading", ("pneumonia.serving", WEB, *BEYOND_SERVING)),
    # what the reading modules import must keep to the same rule, or it would bring the rest in
    ("pneumonia.errors", ("pneumonia.serving", WEB, *BEYOND_SERVING)),
    ("pneumonia.labels", ("pneumonia.serving", WEB, *BEYOND_SERVING)),
    # the model at serving time: reading, errors, labels and serving
    ("pneumonia.serving", (WEB, *BEYOND_SERVING)),
    # the PACS client: reading, serving, errors and labels, as the web app
    ("pneumonia.pacs", (WEB, *BEYOND_SERVING)),
    # what the web app takes of it (DICOM results): the result objects, never the client (requests and
    # dicomweb-client are not in the serving install)
    ("pneumonia.pacs.reports", PACS_CLIENT),
    # the Ray Data archive run: reading, serving, errors and labels, never the command line
    ("pneumonia.archive", (WEB, *BEYOND_SERVING)),
    # scoring (metrics and plots of probabilities against labels): errors and labels only, so that
    # training, evaluation and the studies all stand on it
    (
        "pneumonia.scoring",
        (
            "pneumonia.reading",
            "pneumonia.serving",
            "pneumonia.pacs",
            "pneumonia.archive",
            WEB,
            *(layer for layer in BEYOND_SERVING if layer != "pneumonia.scoring"),
        ),
    ),
    # training: anything of the package below it (reading, serving, scoring), never the evaluation
    # workflows built on a trained model, the command line or the scripts (and not the web app, which
    # is a client of these layers, not one of them)
    ("pneumonia.training", ("pneumonia.evaluation", "pneumonia.cli", WEB, *SCRIPTS, *ENTRY_POINTS)),
    # evaluation (report, recalibration): training and what lies below it, never the command line
    ("pneumonia.evaluation", ("pneumonia.cli", WEB, *SCRIPTS, *ENTRY_POINTS)),
    # thin commands over everything of the package (the web app too), never the scripts
    ("pneumonia.cli", (*SCRIPTS, *ENTRY_POINTS)),
    ("pneumonia.__main__", (*SCRIPTS, "app", "gradcam")),
    # the two kinds of script stand apart: a benchmark measures the product, a study the lever study's questions
    ("studies", ("bench", *ENTRY_POINTS)),
    ("bench", ("studies", *ENTRY_POINTS)),
    # the web app and the top-level modules: reading, serving, errors, labels, web; the web app also
    # pacs.reports for DICOM results (pneumonia/web/dicom_results.py), never the PACS client or the archive
    (WEB, ("pneumonia.archive", *PACS_CLIENT, *BEYOND_SERVING)),
    ("app", BEYOND_SERVING),
    ("gradcam", BEYOND_SERVING),
]


def under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def forbidden_imports(graph: dict[str, set[str]], rules=LAYER_RULES) -> list[str]:
    """One line per import a rule forbids: 'importer imports imported (layer must not import prefix)'."""
    found = []
    for importer, imported in sorted(graph.items()):
        for layer, banned in rules:
            if not under(importer, layer):
                continue
            for target in sorted(imported):
                for prefix in banned:
                    if under(target, prefix):
                        found.append(f"{importer} imports {target} ({layer} must not import {prefix})")
    return found


def test_the_cycle_finder_finds_a_ring():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_holds_the_subpackages_the_scripts_and_the_top_level_modules():
    graph = import_graph()
    for module in (
        "pneumonia.reading.decoding",
        "pneumonia.serving.classifier",
        "pneumonia.cli.predict",
        "pneumonia.web.api",
    ):
        assert module in graph
    assert graph["app"] == {WEB}
    assert "pneumonia.serving.gradcam" in graph["gradcam"]
    assert "pneumonia.training.operating_points" in graph["studies.ensemble_proxy"]
    assert "pneumonia.pacs.runs" in graph["bench.benchmark_pacs"]


def test_no_module_of_the_project_imports_itself_back():
    graph = import_graph()
    assert graph["pneumonia.reading.decoding"] >= {"pneumonia.reading.dicom"}  # the graph sees real imports
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_layer_checker_names_a_forbidden_import_on_a_synthetic_graph():
    graph = {
        "pneumonia.serving.screening": {"pneumonia.reading.decoding", "pneumonia.training.dataset"},
        "pneumonia.reading.decoding": {"pneumonia.errors"},
        "pneumonia.training.dataset": {"pneumonia.serving.preprocessing"},
        "pneumonia.web.pages": {"pneumonia.serving.screening"},
        "pneumonia.web.debug": {"studies.robustness"},
        "studies.robustness": {"pneumonia.training.dataset", "pneumonia.cli"},
        "pneumonia.training.fitting": {"pneumonia.scoring.metrics", "pneumonia.evaluation.report"},
        "pneumonia.scoring.plots": {"pneumonia.scoring.metrics", "pneumonia.training.config"},
    }
    assert forbidden_imports(graph) == [
        "pneumonia.scoring.plots imports pneumonia.training.config "
        "(pneumonia.scoring must not import pneumonia.training)",
        "pneumonia.serving.screening imports pneumonia.training.dataset "
        "(pneumonia.serving must not import pneumonia.training)",
        "pneumonia.training.fitting imports pneumonia.evaluation.report "
        "(pneumonia.training must not import pneumonia.evaluation)",
        "pneumonia.web.debug imports studies.robustness (pneumonia.web must not import studies)",
    ]
    # a prefix is a module and what lies under it, not a string prefix
    assert forbidden_imports({"pneumonia.web.api": {"apply", "gradcam_tools"}}) == []


def test_every_module_falls_under_a_layer_rule():
    layers = [layer for layer, _ in LAYER_RULES]
    # the root package runs before any of its modules, so it must import nothing of the project
    loose = [module for module in import_graph() if module != "pneumonia" and not any(under(module, p) for p in layers)]
    assert loose == [], f"modules no rule in LAYER_RULES covers (give each a layer): {loose}"
    assert import_graph()["pneumonia"] == set(), "pneumonia/__init__.py runs on every import of the package"


def test_no_layer_imports_one_it_must_not():
    forbidden = forbidden_imports(import_graph())
    assert forbidden == [], "forbidden imports (LAYER_RULES in tests/test_imports.py):\n" + "\n".join(forbidden)


@pytest.mark.parametrize("module", ["pneumonia.reading.dicom", "pneumonia.reading.decoding", "pneumonia.errors"])
def test_the_reading_modules_import_alone(module):
    """In a fresh interpreter the module imports, and brings in no project module outside reading,
    errors and labels (nor TensorFlow)."""
    probe = (
        f"import json, sys, {module}; "
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('pneumonia', 'studies', 'app', 'gradcam', 'tensorflow', 'keras'))))"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    allowed = ("pneumonia.reading", "pneumonia.errors", "pneumonia.labels")
    assert [m for m in loaded if m != "pneumonia" and not any(under(m, prefix) for prefix in allowed)] == []
