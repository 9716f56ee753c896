"""What a maintainer checks by hand, made checkable: ruff's lint and format rules hold, and no
function of the product code or of its scripts (bench/, studies/) is longer than a screen."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from builders import REPO

PRODUCT_CODE = sorted((REPO / "pneumonia").rglob("*.py")) + [REPO / "app.py"]
SCRIPTS = sorted((REPO / "bench").glob("*.py")) + sorted((REPO / "studies").glob("*.py"))
MAX_FUNCTION_LINES = 60


def ruff(*args: str) -> subprocess.CompletedProcess:
    command = [shutil.which("ruff") or str(Path(sys.executable).with_name("ruff")), *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True)


@pytest.fixture(scope="module")
def ruff_installed():
    if not (shutil.which("ruff") or Path(sys.executable).with_name("ruff").exists()):
        pytest.skip("ruff is not installed (requirements-dev.txt installs it)")


def test_ruff_lint_passes(ruff_installed):
    result = ruff("check", "--output-format", "concise", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_is_applied(ruff_installed):
    result = ruff("format", "--check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def long_functions(paths: list[Path], limit: int) -> list[str]:
    found = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > limit:
                    found.append(f"{path.parent.name}/{path.name}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_the_length_check_sees_a_long_function(tmp_path):
    source = tmp_path / "long.py"
    source.write_text("def f():\n" + "    x = 1\n" * 70)
    assert long_functions([source], MAX_FUNCTION_LINES)[0].endswith("f (71 lines)")


def test_no_product_function_is_longer_than_60_lines():
    assert long_functions(PRODUCT_CODE, MAX_FUNCTION_LINES) == []


def test_no_script_function_is_longer_than_60_lines():
    assert long_functions(SCRIPTS, MAX_FUNCTION_LINES) == []


MAX_MODULE_LINES = 400  # a file a reader can hold


def test_no_product_module_is_longer_than_a_reader_can_hold():
    long_modules = [
        f"{path.relative_to(REPO)} ({n} lines)"
        for path in PRODUCT_CODE
        if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    ]
    assert long_modules == []


def test_no_two_package_modules_share_a_file_name_outside_the_command_line():
    """A name says what a module is: two `screening.py` would each need their folder to be told apart."""
    names: dict[str, list[str]] = {}
    for path in PRODUCT_CODE:
        if path.name != "__init__.py" and REPO / "pneumonia" / "cli" not in path.parents and path.parent != REPO:
            names.setdefault(path.name, []).append(str(path.relative_to(REPO)))
    assert {name: paths for name, paths in names.items() if len(paths) > 1} == {}
