"""The README and the documentation site (mkdocs.yml, docs/): the README stays short and holds the two
set-up commands CI runs, its results table is the one the model card gives, its links land on pages
of the site, and the site's generated parts (docs/hooks.py) can be generated from this checkout. The
site itself is built by `mkdocs build --strict` in CI (.ci/run), which fails on a broken link."""

from __future__ import annotations

import importlib.util
import re

import pytest
from builders import REPO

README = (REPO / "README.md").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", REPO / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readme_is_short():
    assert len(README.splitlines()) <= 150


def test_the_readme_holds_the_test_command_ci_runs_and_the_app_command():
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    test_command = re.search(r"^# The README's test command, verbatim.\n(.+)$", ci, re.MULTILINE).group(1)
    assert f"```sh\n{test_command}\n```" in README
    app_command = "python3 -m venv .venv && .venv/bin/pip install -r requirements.txt && .venv/bin/gunicorn app:app"
    assert f"```sh\n{app_command}\n```" in README


def test_the_readme_results_table_is_the_model_cards(hooks):
    assert hooks.readme_table() in README, "refresh it with `python docs/hooks.py readme-table`"


def test_the_readme_links_pages_of_the_site():
    nav = (REPO / "mkdocs.yml").read_text(encoding="utf-8")
    for target in re.findall(r"\]\(docs/([^)#]+)", README):
        assert (REPO / "docs" / target).is_file(), target
        assert not target.endswith(".md") or target in nav, f"{target} is not in mkdocs.yml's nav"


def test_the_command_line_reference_covers_every_command(hooks):
    from pneumonia.cli import build_parser

    reference = hooks.cli_reference()
    commands = [words for words, _ in hooks._parsers(build_parser(), [])]
    assert {"predict", "fit-ood", "pacs screen", "pacs watch", "archive"} <= set(commands)
    for words in commands:
        assert f"usage: python -m pneumonia {words}" in reference
    assert str(REPO) not in reference  # no path of the machine that built the pages


def test_the_api_reference_covers_every_operation_of_the_document(hooks):
    from pneumonia.web.api import bp
    from pneumonia.web.openapi import document
    from pneumonia.web.settings import Settings

    reference = hooks.api_reference()
    for path, item in document(Settings(), bp)["paths"].items():
        for method in item:
            assert f"## `{method.upper()} {path}`" in reference


def test_every_generated_part_of_the_pages_can_be_generated(hooks):
    for page in (REPO / "docs").glob("*.md"):
        markdown = page.read_text(encoding="utf-8")
        generated = hooks.on_page_markdown(markdown)
        assert "<!-- generated:" not in generated, page.name


def test_the_screenshot_script_inlines_the_result_pages_stylesheet(client):
    spec = importlib.util.spec_from_file_location("docs_screenshot", REPO / "docs" / "screenshot.py")
    screenshot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(screenshot)
    html = screenshot.styled_result_page(client)  # the README's shot was unstyled once the links got ?v=
    assert "<style>" in html and 'rel="stylesheet"' not in html and "Probability of pneumonia" in html
