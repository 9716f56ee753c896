"""What the serving install weighs, as a PaaS (Heroku: slug at most 250 MB packed) would build it.

    .venv/bin/python -m bench.serving_footprint [--out bench-results/footprint.json]

In a fresh virtualenv in a temporary folder (made by this interpreter, so the project's Python), it
runs `pip install -r requirements.txt` (pip's cache is used: the time is that of a warm or cold
cache as the machine has it), then reports the MB installed in its site-packages, the 10 largest
distributions, and the size packed as tar+gzip (level 6, as a slug is) of the repository's tracked
files (`git ls-files`: no .venv, no .git) alone and with the venv. The slug a buildpack makes also
holds the Python runtime itself, which is not counted here (the venv links to this interpreter).
It checks that `import tensorflow` fails in that venv and that `import app` (which loads the shipped
model) works there from the repository root, and how long that takes. The venv is deleted at the end.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MB = 1e6

# Run in the fresh venv from the repository root: what `import app` loaded, and its peak RSS.
APP_PROBE = """
import json, resource
import app
screener = app.app.extensions["screener"]
print(json.dumps({
    "runtime": screener.classifier.runtime.name if screener else None,
    "model_error": app.app.extensions["model_error"],
    "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
}))
"""


class ByteCounter:
    """A write-only file that keeps only the count of what is written to it."""

    def __init__(self):
        self.bytes = 0

    def write(self, data) -> int:
        self.bytes += len(data)
        return len(data)

    def flush(self) -> None:
        pass


def tracked_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    # lexists: a file deleted but not yet committed is not in a slug built from this tree either.
    return [REPO / name for name in listed.decode().split("\0") if name and os.path.lexists(REPO / name)]


def packed_mb(files: list[Path], venv: Path | None = None) -> float:
    """MB of the files (and the venv, where a buildpack puts it) as one tar.gz at level 6."""
    counter = ByteCounter()
    with gzip.GzipFile(fileobj=counter, mode="wb", compresslevel=6) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        for path in files:
            tar.add(path, arcname=f"app/{path.relative_to(REPO)}", recursive=False)
        if venv is not None:
            tar.add(venv, arcname="app/.heroku/python")  # symlinks stay links, as in the venv
    return round(counter.bytes / MB, 1)


def installed_sizes(site_packages: Path) -> tuple[float, list[tuple[str, float]]]:
    """MB of all of site-packages, and MB per distribution (the files its RECORD lists), largest first."""
    total = sum(p.lstat().st_size for p in site_packages.rglob("*") if p.is_file() or p.is_symlink())
    per_dist = Counter()
    for record in site_packages.glob("*.dist-info/RECORD"):
        name = record.parent.name.split("-")[0]
        for line in record.read_text().splitlines():
            path = site_packages / line.rsplit(",", 2)[0]
            if path.is_file():
                per_dist[name] += path.stat().st_size
    return round(total / MB, 1), [(name, round(size / MB, 1)) for name, size in per_dist.most_common()]


def measure() -> dict:
    with tempfile.TemporaryDirectory(prefix="serving_venv_") as tmp:
        venv = Path(tmp) / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        python = venv / "bin" / "python"
        started = time.monotonic()
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-r", "requirements.txt"],
            cwd=REPO,
            check=True,
        )
        pip_s = time.monotonic() - started
        (site_packages,) = venv.glob("lib/python*/site-packages")
        installed_mb, per_dist = installed_sizes(site_packages)

        # As the dyno runs it: no PYTHONPATH or project settings from this shell, the shipped model.
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env = {k: v for k, v in env.items() if not k.startswith("PNEUMONIA_")}
        tf = subprocess.run([str(python), "-c", "import tensorflow"], cwd=REPO, env=env, capture_output=True, text=True)
        started = time.monotonic()
        probe = subprocess.run([str(python), "-c", APP_PROBE], cwd=REPO, env=env, capture_output=True, text=True)
        import_s = time.monotonic() - started
        loaded = json.loads(probe.stdout.splitlines()[-1]) if probe.returncode == 0 else {}

        files = tracked_files()
        return {
            "python": sys.version.split()[0],
            "pip_install_s": round(pip_s, 1),
            "site_packages_mb": installed_mb,
            "top_distributions_mb": per_dist[:10],
            "repo_tracked_files": len(files),
            "repo_packed_mb": packed_mb(files),
            "slug_packed_mb": packed_mb(files, venv),
            "tensorflow_import_fails": tf.returncode != 0,
            "tensorflow_error": (tf.stderr.strip().splitlines() or [""])[-1],
            "import_app_ok": probe.returncode == 0 and loaded.get("model_error") is None,
            "import_app_s": round(import_s, 1),
            **loaded,
            **({} if probe.returncode == 0 else {"import_app_error": probe.stderr[-2000:]}),
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the figures to this JSON file")
    args = parser.parse_args(argv)
    result = measure()
    rows = [
        ("pip install -r requirements.txt", f"{result['pip_install_s']} s"),
        ("site-packages installed", f"{result['site_packages_mb']} MB"),
        *((f"  {name}", f"{mb} MB") for name, mb in result["top_distributions_mb"]),
        (f"repository ({result['repo_tracked_files']} tracked files), tar.gz", f"{result['repo_packed_mb']} MB"),
        ("slug: repository + venv, tar.gz", f"{result['slug_packed_mb']} MB (limit 250)"),
        ("import tensorflow fails", f"{result['tensorflow_import_fails']} ({result['tensorflow_error']})"),
        (
            "import app (shipped model)",
            f"{'ok' if result['import_app_ok'] else 'FAILED'} in {result['import_app_s']} s, "
            f"runtime {result.get('runtime')}, peak RSS {result.get('peak_rss_mib')} MiB",
        ),
    ]
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")
    if not result["import_app_ok"]:
        print(result.get("import_app_error") or result.get("model_error"), file=sys.stderr)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0 if result["import_app_ok"] and result["tensorflow_import_fails"] else 1


if __name__ == "__main__":
    sys.exit(main())
