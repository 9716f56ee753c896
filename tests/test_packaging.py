"""The wheel, installed as a user installs it: built from the working tree, put with its dependencies
(requirements.txt, the slim serving set) into a fresh virtual environment, and run from `/` with no
PYTHONPATH and no PNEUMONIA_* settings, so that nothing of the checkout can stand in for what the
wheel lacks. `pneumonia predict` and gunicorn on `pneumonia.web:create_app()` must then find the shipped model, the
templates and the static files inside the installed packages.

Slow (a ~60 MB wheel, a fresh venv and its ~20 packages: about a minute with pip's cache warm);
skipped when the package registry cannot be reached."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import warnings
import zipfile
from html.parser import HTMLParser
from pathlib import Path

import pytest
import requests
from builders import REAL_XRAYS, REPO, SHIPPED_MODEL, free_port

with warnings.catch_warnings():  # xdist_group is pytest-xdist's mark, unknown under `-p no:xdist`
    warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
    # one worker builds the wheel and the venv (module fixtures) for all the tests here
    pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("packaging")]

# Left out of the copy the wheel is built from: what .gitignore leaves out of the checkout at its top level.
NOT_SOURCE = {".git", ".venv", ".venv-serving", "build", "dist", "runs", "cache", "reports", "bench-results", ".whl"}
# What pip prints when it cannot reach an index (as opposed to a requirement that does not resolve).
NETWORK_ERRORS = (
    "NewConnectionError",
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Name or service not known",
    "Network is unreachable",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ProxyError",
    "Could not fetch URL",
)


def user_environment() -> dict[str, str]:
    """This process's environment without what would point the installed code back at the checkout
    or at another model: PYTHONPATH, PYTHONHOME, VIRTUAL_ENV and every PNEUMONIA_* setting."""
    dropped = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")
    return {k: v for k, v in os.environ.items() if k not in dropped and not k.startswith("PNEUMONIA_")}


def run(command, timeout: int = 300, env: dict | None = None, cwd="/") -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(part) for part in command],
        cwd=cwd,
        env=env or user_environment(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def copy_working_tree(destination: Path) -> Path:
    """The checkout's files as they are now, without the virtual environments, caches and earlier
    builds. Building in the checkout itself would write build/ and *.egg-info/ there, and
    setuptools's build/lib keeps files deleted since the last build, which would then ship."""

    def ignore(folder: str, names: list[str]) -> set[str]:
        top = Path(folder) == REPO
        return {
            n
            for n in names
            if n in ("__pycache__", ".pytest_cache") or n.endswith(".egg-info") or top and n in NOT_SOURCE
        }

    return Path(shutil.copytree(REPO, destination, ignore=ignore))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    source = copy_working_tree(work / "source")
    started = time.perf_counter()
    result = run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", work / "dist", source],
        cwd=work,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (built,) = (work / "dist").glob("pneumonia_screening-*.whl")
    print(f"\nwheel built in {time.perf_counter() - started:.1f} s: {built.name}, {built.stat().st_size / 1e6:.0f} MB")
    return built


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh virtual environment on the dev venv's base interpreter, with the wheel and its
    dependencies installed from the package registry."""
    venv = tmp_path_factory.mktemp("installed") / "venv"
    base_python = getattr(sys, "_base_executable", None) or sys.executable
    started = time.perf_counter()
    created = run([base_python, "-m", "venv", venv], timeout=120)
    assert created.returncode == 0, created.stdout + created.stderr
    installed = run([venv / "bin" / "python", "-m", "pip", "install", wheel], timeout=1200)
    output = installed.stdout + installed.stderr
    if installed.returncode != 0 and any(marker in output for marker in NETWORK_ERRORS):
        pytest.skip(
            "the package registry cannot be reached, so the wheel's dependencies cannot be installed:\n"
            + output[-2000:]
        )
    assert installed.returncode == 0, output
    print(f"\nvenv created and wheel installed with its dependencies in {time.perf_counter() - started:.1f} s")
    return venv


@pytest.fixture(scope="module")
def xrays(tmp_path_factory) -> list[Path]:
    """The committed chest X-rays (tests/data: a NORMAL and a PNEUMONIA radiograph, which the shipped
    model's gate accepts; the synthetic drawings of builders.py it refuses), copied out of the checkout."""
    folder = tmp_path_factory.mktemp("xrays")
    assert len(REAL_XRAYS) == 2, REAL_XRAYS
    return [Path(shutil.copy(path, folder / path.name)) for path in REAL_XRAYS]


def test_the_wheel_carries_every_module_the_shipped_model_the_templates_and_the_static_files(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {path.relative_to(REPO).as_posix() for path in (REPO / "pneumonia").rglob("*.py")}
    expected |= {
        path.relative_to(REPO).as_posix()
        for folder in ("pneumonia/web/templates", "pneumonia/web/static")
        for path in (REPO / folder).rglob("*")
        if path.is_file()
    }
    expected |= {
        f"pneumonia/shipped_model/{p.relative_to(SHIPPED_MODEL).as_posix()}"
        for p in SHIPPED_MODEL.rglob("*")
        if p.is_file()
    }
    assert sorted(expected - names) == [], "files of the checkout missing from the wheel (pyproject.toml)"
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"pneumonia"}, "the wheel installs one package; app.py and gradcam.py belong to the checkout"
    assert not [name for name in names if name.startswith(("studies/", "tests/", "bench/"))], (
        "the wheel ships no studies, tests or benchmarks"
    )
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/entry_points.txt")))
    assert "pneumonia = pneumonia.cli:main" in entry_points.decode()


def test_the_installed_package_is_the_wheels_and_finds_the_model_it_ships(venv):
    probe = (
        "import pneumonia, pneumonia.web; "
        "from pneumonia.serving.classifier import SHIPPED_MODEL_DIR, default_model_path; "
        "print(pneumonia.__file__, pneumonia.web.__file__, SHIPPED_MODEL_DIR, default_model_path())"
    )
    result = run([venv / "bin" / "python", "-c", probe])
    assert result.returncode == 0, result.stderr
    site_packages = next((venv / "lib").glob("python3*/site-packages"))
    package, web, shipped, default = map(Path, result.stdout.split())
    assert package.is_relative_to(site_packages) and web.is_relative_to(site_packages), result.stdout
    assert shipped == default == site_packages / "pneumonia" / "shipped_model", result.stdout


def test_the_serving_install_has_no_tensorflow(venv):
    result = run([venv / "bin" / "python", "-c", "import tensorflow"])
    assert result.returncode != 0 and "No module named 'tensorflow'" in result.stderr, result.stdout + result.stderr


def test_installed_predict_prints_a_probability_for_each_xray_from_the_root_folder(venv, xrays):
    started = time.perf_counter()
    result = run([venv / "bin" / "pneumonia", "predict", *xrays], timeout=300)
    print(f"\npneumonia predict on {len(xrays)} X-rays: {time.perf_counter() - started:.1f} s")
    assert result.returncode == 0, result.stdout + result.stderr
    probability = {}
    for path in xrays:
        line = re.search(rf"^{re.escape(str(path))}\t([01]\.\d+)\t", result.stdout, re.MULTILINE)
        assert line, f"no probability line for {path}:\n{result.stdout}\n{result.stderr}"
        probability[path.name] = float(line.group(1))
    assert f"{len(xrays)} file(s): {len(xrays)} screened, 0 refused" in result.stderr, result.stderr
    normal, pneumonia = (probability[p.name] for p in sorted(xrays, key=lambda p: not p.name.startswith("normal")))
    assert 0 <= normal < pneumonia <= 1, probability  # the shipped model, not some stand-in


def test_installed_export_web_writes_the_static_site_without_node(venv, tmp_path):
    """The in-browser screener from the wheel alone: onnxruntime-web is in it (static/vendor), no npm step."""
    result = run([venv / "bin" / "pneumonia", "export-web", tmp_path / "site"], timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("index.html", "model/screener.json", "model/weights.onnx.data", "static/vendor/ort.wasm.min.js"):
        assert (tmp_path / "site" / name).is_file(), name


def test_pneumonia_model_path_still_wins_over_the_shipped_model(venv, xrays, tmp_path):
    missing = tmp_path / "no-such-model"
    result = run(
        [venv / "bin" / "pneumonia", "predict", xrays[0]],
        env={**user_environment(), "PNEUMONIA_MODEL_PATH": str(missing)},
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert str(missing) in result.stderr, result.stderr


class StylesheetLinks(HTMLParser):
    def __init__(self):
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        if tag == "link" and "stylesheet" in (attributes.get("rel") or "").split() and attributes.get("href"):
            self.hrefs.append(attributes["href"])


def wait_until_ready(process: subprocess.Popen, url: str, log: Path, seconds: float = 120) -> dict:
    deadline = time.time() + seconds
    while True:
        try:
            answer = requests.get(f"{url}/healthz", timeout=5)
            if answer.status_code == 200:
                return answer.json()
        except requests.RequestException:
            pass
        assert process.poll() is None, f"gunicorn exited with {process.returncode}:\n{log.read_text()}"
        assert time.time() < deadline, f"gunicorn did not answer /healthz 200 within {seconds} s:\n{log.read_text()}"
        time.sleep(0.3)


def checkout_document() -> dict:
    """The OpenAPI document this checkout's code generates, with the default settings."""
    from pneumonia.web.api import bp
    from pneumonia.web.openapi import document
    from pneumonia.web.settings import Settings

    return document(Settings(), bp)


def test_installed_web_app_serves_the_page_its_stylesheet_and_the_api_from_the_root_folder(venv, xrays, tmp_path):
    port, log = free_port(), tmp_path / "gunicorn.log"
    url = f"http://127.0.0.1:{port}"
    # The shipped settings travel in the package (gthread, 32 threads, the timeout, the allocator tuning).
    config = ["-c", "python:pneumonia.web.gunicorn_conf", "--bind", f"127.0.0.1:{port}", "--no-control-socket"]
    command = [venv / "bin" / "gunicorn", *config, "pneumonia.web:create_app()"]
    started = time.perf_counter()
    with open(log, "w") as log_file:
        process = subprocess.Popen(
            [str(part) for part in command], cwd="/", env=user_environment(), stdout=log_file, stderr=subprocess.STDOUT
        )
    try:
        health = wait_until_ready(process, url, log)
        assert "Using worker: gthread" in log.read_text()
        print(f"\ngunicorn pneumonia.web:create_app() ready in {time.perf_counter() - started:.1f} s")
        assert health["ready"] is True and health["serving"]["runtime"] == "onnx", health

        page = requests.get(f"{url}/", timeout=30)
        assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html"), page.headers
        assert "research" in page.text.lower()
        links = StylesheetLinks()
        links.feed(page.text)
        assert links.hrefs, "the page links no stylesheet"
        stylesheet = requests.get(requests.compat.urljoin(f"{url}/", links.hrefs[0]), timeout=30)
        assert stylesheet.status_code == 200, (links.hrefs[0], stylesheet.status_code)
        assert stylesheet.headers["Content-Type"].startswith("text/css"), stylesheet.headers
        assert stylesheet.text.strip()

        with open(xrays[0], "rb") as image:
            answer = requests.post(
                f"{url}/api/predict", files={"file": (xrays[0].name, image, "image/jpeg")}, timeout=120
            )
        assert answer.status_code == 200, f"{answer.status_code} {answer.text[:500]}\n{log.read_text()[-3000:]}"
        assert answer.headers["Content-Type"].startswith("application/json")
        probability = answer.json()["probability"]
        assert isinstance(probability, float) and 0 <= probability <= 1, answer.json()
        document = requests.get(f"{url}/openapi.json", timeout=30).json()  # generated from the installed code
        assert set(document["paths"]) == set(checkout_document()["paths"])  # the wheel holds every operation
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
