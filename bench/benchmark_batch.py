"""Batch screening: images per second batched against one at a time, and the peak memory of a
100-file batch, in the package (what `predict PATH...` runs) and through the web app.

    .venv/bin/python -m bench.benchmark_batch --model model/ --files 100 --out bench-results/

Files: the full-size JPEGs of --images (default ../shared/samples: Kaggle originals, 0.06 to 7.3 megapixels),
repeated to --files; without them, synthetic 2000x1600 JPEGs. Modes, all on the same files:

- one at a time: BatchScreener with chunks of 1 (no batching), on the first --single files;
- batched: BatchScreener with chunks of 8, 16 and 32, on all files, on the runtime the model loads
  with (PNEUMONIA_RUNTIME, --runtime) and, where TensorFlow is installed, on the keras runtime too;
- memory: the peak resident set (RSS, sampled every 2 ms in a thread) above the RSS just before,
  while a batch of all files is screened, against decoding all of them first (what a batch that
  held every decoded image would take); and the same for POST /api/predict/batch and the page's
  POST /predict (Grad-CAM and thumbnails for every file) through Flask's test client. Each runs
  in its own interpreter after a one-chunk warm-up (TensorFlow's buffers for a chunk are then
  there; they stay, whatever the number of files), with glibc's malloc set as gunicorn.conf.py
  sets it in a worker (large blocks mapped and unmapped), so freed images leave the RSS.
"""

from __future__ import annotations

import argparse
import ctypes
import io
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO.parent / "shared" / "samples"
MIB = 1024 * 1024


def sample_files(count: int, scratch: Path, folder: Path = SAMPLES) -> list[Path]:
    """The JPEGs under `folder` (../shared/samples) repeated to `count`, else synthetic full-size ones."""
    found = sorted(folder.rglob("*.jpeg")) if folder.is_dir() else []
    if not found:
        from PIL import Image

        rng = np.random.default_rng(0)
        scratch.mkdir(parents=True, exist_ok=True)
        for i in range(8):
            found.append(scratch / f"synthetic-{i}.jpeg")
            pixels = np.clip(rng.normal(120, 40, (1600, 2000)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(found[-1], quality=90)
    return [found[i % len(found)] for i in range(count)]


def malloc_as_deployed() -> None:
    """gunicorn.conf.py post_fork: a fixed 1 MiB mmap threshold and two arenas (glibc only)."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    mallopt(-3, 1024 * 1024)  # M_MMAP_THRESHOLD
    mallopt(-8, 2)  # M_ARENA_MAX


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    """`with PeakRss() as peak:` ... then peak.above_start_mib: the highest RSS seen above the start."""

    def __init__(self, every_s: float = 0.002):
        self.every_s, self.start, self.peak = every_s, 0, 0
        self._stop = threading.Event()

    def __enter__(self):
        self.start = self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(self.every_s):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def above_start_mib(self) -> float:
        return round((self.peak - self.start) / MIB, 1)


def timed(run, images: int) -> dict:
    started = time.perf_counter()
    run()
    seconds = time.perf_counter() - started
    return {"images": images, "seconds": round(seconds, 2), "images_per_s": round(images / seconds, 2)}


def load_batch(model: str, warm_up: list[tuple[str, Path]], chunk: int, runtime: str | None = None):
    from pneumonia.serving.classifier import XrayClassifier
    from pneumonia.serving.screening import BatchScreener

    batch = BatchScreener(XrayClassifier(model, runtime))  # as `predict` loads it
    list(batch.screen(warm_up, chunk))  # the runtime's buffers for a chunk: there whatever the number of files
    return batch


def throughput(model: str, files: list[Path], single: int, runtime: str | None) -> dict:
    sources = [(str(path), path) for path in files]
    batch = load_batch(model, sources[:32], 32, runtime)
    results = {"runtime": batch.classifier.runtime.name}
    results |= {
        f"batched_{chunk}": timed(lambda chunk=chunk: list(batch.screen(sources, chunk)), len(files))
        for chunk in (8, 16, 32)
    }
    results["one_at_a_time"] = timed(lambda: list(batch.screen(sources[:single], 1)), single)
    return results


def keras_throughput(model: str, files: list[Path]) -> dict:
    """batched_16 on the keras runtime (TensorFlow), for comparison; skipped without TensorFlow."""
    try:
        import keras  # noqa: F401
    except ImportError:
        return {"skipped": "TensorFlow is not installed"}
    sources = [(str(path), path) for path in files]
    batch = load_batch(model, sources[:16], 16, "keras")
    return {"batched_16": timed(lambda: list(batch.screen(sources, 16)), len(files))}


def memory_batch(model: str, files: list[Path]) -> dict:
    sources = [(str(path), path) for path in files]
    batch = load_batch(model, sources[:16], 16)
    with PeakRss() as peak:
        result = timed(lambda: list(batch.screen(sources, 16)), len(files))
    return {**result, "peak_rss_above_start_mib": peak.above_start_mib}


def memory_decode_all(model: str, files: list[Path]) -> dict:
    from pneumonia.reading.decoding import decode_xray

    with PeakRss() as peak:
        decoded = [decode_xray(path)[0] for path in files]
    return {
        "peak_rss_above_start_mib": peak.above_start_mib,
        "decoded_pixels_mib": round(sum(x.width * x.height for x in decoded) / MIB, 1),
    }


def memory_web(model: str, files: list[Path], url: str) -> dict:
    """One POST of all files (Flask's test client, no network); the multipart body is encoded
    before the measurement starts, so only the server's side of the request is measured."""
    from werkzeug.test import EnvironBuilder

    from pneumonia.web import create_app

    body_mib = sum(path.stat().st_size for path in files) / MIB
    app = create_app({"MODEL_PATH": model, "TESTING": True, "MAX_CONTENT_LENGTH": int(body_mib * MIB) + MIB})
    client = app.test_client()

    def encoded(paths: list[Path]) -> tuple[bytes, str]:
        form = {"file": [(io.BytesIO(path.read_bytes()), f"{i:03d}.jpeg") for i, path in enumerate(paths)]}
        environ = EnvironBuilder(method="POST", data=form).get_environ()
        return environ["wsgi.input"].read(), environ["CONTENT_TYPE"]

    def post(body_and_type: tuple[bytes, str]) -> None:
        response = client.post(url, data=body_and_type[0], content_type=body_and_type[1])
        assert response.status_code == 200, response.status_code

    post(encoded(files[:8]))  # warm-up: one chunk
    body = encoded(files)
    with PeakRss() as peak:
        result = timed(lambda: post(body), len(files))
    return {**result, "request_body_mib": round(body_mib, 1), "peak_rss_above_start_mib": peak.above_start_mib}


MODES = {
    "throughput": lambda args, files: throughput(args.model, files, min(args.single, len(files)), args.runtime),
    "throughput_keras": lambda args, files: keras_throughput(args.model, files),
    "memory_batch": lambda args, files: memory_batch(args.model, files),
    "memory_decode_all": lambda args, files: memory_decode_all(args.model, files),
    "memory_api": lambda args, files: memory_web(args.model, files, "/api/predict/batch"),
    "memory_page_with_gradcam": lambda args, files: memory_web(args.model, files, "/predict"),
}


def run_modes_apart(argv: list[str]) -> dict:
    """Each mode in a fresh interpreter: no mode's freed memory hides another's peak."""
    results = {}
    for mode in MODES:
        done = subprocess.run(
            [sys.executable, "-m", "bench.benchmark_batch", *argv, "--mode", mode],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        if done.returncode:
            raise SystemExit(f"mode {mode} failed:\n{done.stderr[-3000:]}")
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(REPO / "model"))
    parser.add_argument("--files", type=int, default=100)
    parser.add_argument("--single", type=int, default=25, help="files for the one-at-a-time modes")
    parser.add_argument("--out", default=str(REPO / "bench-results"))
    parser.add_argument(
        "--images", type=Path, default=SAMPLES, help="a folder of JPEGs to repeat (default: %(default)s)"
    )
    parser.add_argument("--mode", choices=MODES, help="run one mode and print its JSON (default: all, each apart)")
    parser.add_argument("--runtime", choices=("onnx", "keras"), help="what runs the model (default: as the app picks)")
    args = parser.parse_args(argv)
    malloc_as_deployed()
    files = sample_files(args.files, Path(args.out) / "batch-synthetic", args.images)
    if args.mode:
        print(json.dumps(MODES[args.mode](args, files)))
        return 0
    report = {
        "files": args.files,
        "distinct_files": len(set(files)),
        "model": args.model,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "node": platform.node()},
        "date": time.strftime("%Y-%m-%d %H:%M"),
        **run_modes_apart(sys.argv[1:] if argv is None else argv),
    }
    print(json.dumps(report, indent=2))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "benchmark_batch.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
