"""Latency of one upload, split by stage, against the bare model pass and the naive keras.io Grad-CAM
path; then requests per second with concurrent clients against gunicorn on loopback, and RSS per worker.

    .venv/bin/python -m bench.benchmark_upload --model model/ --out bench-results/

The bare pass is the model's explain graph (explain.onnx: logit, Grad-CAM and features) on ONNX
Runtime in this process, 2 threads, nothing else: the floor an upload cannot go under. It runs
before gunicorn starts and again after it stops, and its samples are pooled, so a change of the
machine's load during the run weighs on both sides. It runs twice, as ONNX Runtime comes (its pool
threads spin between operators) and with spinning off (the app's default), and the faster of the two
is the reference. Printed against it (issue 30's targets): the upload's p50 end to end / the bare p50
(at most 1.6), the uploads a second from --clients clients / the bare passes a second (at least 0.75),
and the largest answer (at most 100 KB).

Stages of the fast path come from the server's own `timing_ms` (decode, preprocess, model +
Grad-CAM, overlay + encode); "HTTP" is what the client measured minus the server's total.
The naive path (keras.io "Grad-CAM class activation visualization") runs in this process on
the same image: `model.predict`, then a second Grad-CAM model built and run under a
GradientTape, then a matplotlib jet overlay at full size saved as PNG.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO.parent / "shared" / "samples"
TARGET_PIXELS = 2_000_000
BARE_THREADS = 2
# Issue 30: an upload's p50 at most 1.6x the bare pass's, uploads/s at least 0.75x its rate, answers <= 100 KB.
TARGETS = {"latency_ratio_max": 1.6, "throughput_ratio_min": 0.75, "answer_kb_max": 100}


def pick_image(path: str | None) -> tuple[bytes, str]:
    """--image, else the ../shared/samples JPEG nearest 2 megapixels, else a synthetic one."""
    from PIL import Image

    if path:
        return Path(path).read_bytes(), path
    candidates = sorted(SAMPLES.glob("*/*/*.jpeg")) if SAMPLES.is_dir() else []
    if candidates:
        best = min(candidates, key=lambda p: abs(np.prod(Image.open(p).size) - TARGET_PIXELS))
        return best.read_bytes(), str(best.relative_to(REPO.parent))
    y, x = np.mgrid[0:1200, 0:1700] / 1200
    rng = np.random.default_rng(0)
    image = 90 + 60 * np.exp(-((x - 0.7) ** 2 + (y - 0.5) ** 2) / 0.2) + rng.normal(0, 8, x.shape)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=92)
    return buffer.getvalue(), "synthetic 1700x1200 JPEG"


def percentiles(values) -> dict[str, float]:
    return {"p50": round(float(np.percentile(values, 50)), 2), "p95": round(float(np.percentile(values, 95)), 2)}


def model_square(data: bytes, preprocessing) -> np.ndarray:
    """The float32 (1, S, S, 3) input the app gives the model for these bytes (a card's Preprocessing)."""
    from pneumonia.reading.decoding import decode_xray
    from pneumonia.serving.preprocessing import model_input, resize_xray

    xray, _ = decode_xray(data, preprocessing.image_size)
    return model_input(resize_xray(xray, preprocessing.image_size), preprocessing)[None]


def bare_session(explain_path: Path, spinning: bool = True):
    """explain.onnx on ONNX Runtime's CPU provider with BARE_THREADS threads, its other options left as they
    come (pool threads spinning between operators), or with spinning off as the app has it by default."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = BARE_THREADS
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(str(explain_path), options, providers=["CPUExecutionProvider"])


def bare_pass(session, inputs: np.ndarray, repeats: int) -> tuple[list[float], float]:
    """(milliseconds of each of `repeats` sequential explain passes, their wall-clock seconds)."""
    session.run(None, {"xray": inputs})  # warm-up
    times, started = [], time.perf_counter()
    for _ in range(repeats):
        begun = time.perf_counter()
        session.run(None, {"xray": inputs})
        times.append((time.perf_counter() - begun) * 1000)
    return times, time.perf_counter() - started


def naive_keras_io(model, layer: str, data: bytes, preprocessing) -> dict[str, float]:
    """The keras.io example's path, timed by stage; decode and preprocess as the fast path."""
    import keras
    import matplotlib
    import tensorflow as tf

    from pneumonia.reading.decoding import load_xray
    from pneumonia.serving.preprocessing import model_input, resize_xray

    laps, last = {}, time.perf_counter()

    def lap(name):
        nonlocal last
        now = time.perf_counter()
        laps[name] = (now - last) * 1000
        last = now

    xray = load_xray(data)
    lap("decode")
    img_array = model_input(resize_xray(xray, preprocessing.image_size), preprocessing)[None]
    lap("preprocess")
    model.predict(img_array, verbose=0)
    grad_model = keras.models.Model(model.inputs, [model.get_layer(layer).output, model.output])
    with tf.GradientTape() as tape:
        last_conv_layer_output, preds = grad_model(img_array)
        class_channel = preds[:, 0]
    grads = tape.gradient(class_channel, last_conv_layer_output)
    pooled_grads = tf.reduce_mean(grads, axis=(0, 1, 2))
    heatmap = tf.squeeze(last_conv_layer_output[0] @ pooled_grads[..., tf.newaxis])
    heatmap = (tf.maximum(heatmap, 0) / (tf.math.reduce_max(heatmap) + 1e-12)).numpy()
    lap("model_gradcam")
    img = keras.utils.img_to_array(xray.convert("RGB"))
    jet_colors = matplotlib.colormaps["jet"](np.arange(256))[:, :3]
    jet_heatmap = keras.utils.array_to_img(jet_colors[np.uint8(255 * heatmap)])
    jet_heatmap = keras.utils.img_to_array(jet_heatmap.resize((img.shape[1], img.shape[0])))
    superimposed = keras.utils.array_to_img(jet_heatmap * 0.4 + img)
    superimposed.save(io.BytesIO(), "PNG")
    lap("overlay_encode")
    laps["total"] = sum(laps.values())
    return laps


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_gunicorn(model: str, workers: int, threads: int, extra_env: dict | None = None):
    """(gunicorn process, its URL) on loopback, as the Procfile starts it."""
    port = free_port()
    env = {
        **os.environ,
        "PNEUMONIA_MODEL_PATH": str(Path(model).resolve()),
        "WEB_CONCURRENCY": str(workers),
        "GUNICORN_THREADS": str(threads),
        **(extra_env or {}),
    }
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "-c",
            "gunicorn.conf.py",
            "--bind",
            f"127.0.0.1:{port}",
            "--access-logfile",
            "/dev/null",
            "app:app",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    return server, f"http://127.0.0.1:{port}"


def wait_ready(server: subprocess.Popen, workers: int) -> None:
    """Until every worker has logged that its model is loaded (and warmed up)."""
    loaded = 0
    for line in server.stderr:
        loaded += "loaded from" in line
        if "MODEL NOT LOADED" in line:
            raise SystemExit(line.strip())
        if loaded == workers:
            threading.Thread(target=server.stderr.read, daemon=True).start()  # keep the pipe drained
            return
    raise SystemExit("gunicorn exited while starting; run it by hand to see why")


def worker_pids(server: subprocess.Popen) -> list[int]:
    children = Path(f"/proc/{server.pid}/task/{server.pid}/children")
    return [int(pid) for pid in children.read_text().split()] if children.exists() else []


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def post(session, url: str, data: bytes, overlay: str = "jpeg") -> tuple[float, dict]:
    """(milliseconds, the JSON answer with its size in bytes as "_bytes")."""
    started = time.perf_counter()
    response = session.post(
        f"{url}/api/predict?overlay={overlay}", files={"file": ("xray.jpeg", data, "image/jpeg")}, timeout=120
    )
    elapsed = (time.perf_counter() - started) * 1000
    response.raise_for_status()
    return elapsed, {**response.json(), "_bytes": len(response.content)}


def speedup(naive: dict, fast: dict, stage: str) -> float | None:
    return round(naive["total"]["p50"] / fast[stage]["p50"], 2) if naive else None


def naive_path(keras_path, layer: str, data: bytes, preprocessing, repeats: int) -> dict:
    """The keras.io path's stages in this process (p50, p95), or {} with --naive-repeats 0."""
    if not repeats:
        return {}
    import keras

    # keras.io's example calls the model with a bare array; Keras 3 warns on every call.
    warnings.filterwarnings("ignore", message="The structure of `inputs` doesn't match")
    model = keras.saving.load_model(keras_path, compile=False)
    naive_keras_io(model, layer, data, preprocessing)  # warm-up
    runs = [naive_keras_io(model, layer, data, preprocessing) for _ in range(repeats)]
    return {stage: percentiles([r[stage] for r in runs]) for stage in runs[0]}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(REPO / "model"), help="model directory (default model/)")
    parser.add_argument(
        "--out",
        default=str(REPO / "bench-results"),
        help="a .json file, or a folder to write benchmark_upload.json in (default bench-results/)",
    )
    parser.add_argument("--image", help="the upload (default: the ../shared/samples JPEG nearest 2 MP)")
    parser.add_argument("--repeats", type=int, default=60, help="sequential uploads over HTTP")
    parser.add_argument("--naive-repeats", type=int, default=15)
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients for the throughput run")
    parser.add_argument("--requests", type=int, default=160, help="uploads in the throughput run")
    parser.add_argument("--workers", type=int, default=1, help="gunicorn WEB_CONCURRENCY")
    parser.add_argument("--threads", type=int, default=4, help="gunicorn GUNICORN_THREADS")
    parser.add_argument("--overlay", choices=("png", "jpeg"), default="jpeg", help="the API's ?overlay= (default jpeg)")
    parser.add_argument("--bare-repeats", type=int, default=100, help="bare explain passes before and after")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting of the server (PNEUMONIA_MODEL_SLOTS, PNEUMONIA_RUNTIME_THREADS, PNEUMONIA_RUNTIME, ...)",
    )
    return parser.parse_args(argv)


def sequential_uploads(url: str, data: bytes, args: argparse.Namespace) -> tuple[list, dict]:
    """(each (ms, answer) of --repeats uploads one after the other, their stages' p50/p95 with HTTP's share)."""
    import requests

    session = requests.Session()
    sequential = [post(session, url, data, args.overlay) for _ in range(args.repeats)]
    client_ms = [elapsed for elapsed, _ in sequential]
    server_ms = [body["timing_ms"] for _, body in sequential]
    stages = {
        stage: percentiles([t[stage] for t in server_ms])
        for stage in ("decode", "preprocess", "model_gradcam", "overlay_encode", "total")
    }
    stages["http"] = percentiles([c - t["total"] for c, t in zip(client_ms, server_ms)])
    stages["end_to_end"] = percentiles(client_ms)
    return sequential, stages


def concurrent_uploads(url: str, data: bytes, args: argparse.Namespace) -> dict:
    """--requests uploads from --clients clients at once, each on its own connection."""
    import requests

    def client(count: int) -> list[float]:
        own = requests.Session()
        return [post(own, url, data, args.overlay)[0] for _ in range(count)]

    per_client = [args.requests // args.clients] * args.clients
    started = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        loaded = [ms for result in pool.map(client, per_client) for ms in result]
    wall = time.perf_counter() - started
    return {
        "clients": args.clients,
        "requests": len(loaded),
        "workers": args.workers,
        "threads": args.threads,
        "requests_per_s": round(len(loaded) / wall, 2),
        "latency_ms": percentiles(loaded),
    }


def served_uploads(data: bytes, args: argparse.Namespace, extra_env: dict) -> dict:
    """The app under gunicorn, as the Procfile starts it: sequential uploads, then concurrent clients."""
    import requests

    started = time.time()
    server, url = start_gunicorn(args.model, args.workers, args.threads, extra_env)
    try:
        wait_ready(server, args.workers)
        startup_s = time.time() - started
        warm = requests.Session()
        for _ in range(3):
            post(warm, url, data, args.overlay)
        idle_rss = [rss_mib(pid) for pid in worker_pids(server)]
        sequential, stages = sequential_uploads(url, data, args)
        throughput = concurrent_uploads(url, data, args)
        rss = [rss_mib(pid) for pid in worker_pids(server)]
    finally:
        server.terminate()
        server.wait(60)
    return {
        "sequential": sequential,
        "fast_path_http_ms": stages,
        "throughput": throughput,
        "rss_mib_per_worker_idle": idle_rss,
        "rss_mib_per_worker": rss,
        "gunicorn_startup_s": round(startup_s, 1),
    }


def bare_passes(explain_path: Path, inputs: np.ndarray, repeats: int, between) -> tuple[dict, dict, object]:
    """The bare explain pass spinning and not, each run before and after `between()` (whose result is
    returned third), the after-runs in the reverse order, so a change of load weighs on both settings."""
    explain, explain_no_spin = bare_session(explain_path), bare_session(explain_path, spinning=False)
    spin_before = bare_pass(explain, inputs, repeats)
    no_spin_before = bare_pass(explain_no_spin, inputs, repeats)
    result = between()
    no_spin_after = bare_pass(explain_no_spin, inputs, repeats)
    spin_after = bare_pass(explain, inputs, repeats)
    return bare_summary(spin_before, spin_after), bare_summary(no_spin_before, no_spin_after), result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_before = os.getloadavg()  # the machine's load is part of every figure below
    extra_env = dict(item.split("=", 1) for item in args.env)

    from PIL import Image

    from pneumonia.serving.classifier import ModelLoadError, find_card

    try:
        keras_path, card = find_card(args.model)
    except ModelLoadError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    data, image_name = pick_image(args.image)
    width, height = Image.open(io.BytesIO(data)).size
    print(f"model {card.name} ({keras_path}), image {image_name}: {width}x{height}, {len(data) / 1e6:.2f} MB")

    naive = naive_path(keras_path, card.gradcam.layer, data, card.preprocessing, args.naive_repeats)
    explain_path = keras_path.parent / card.export.files["explain"].file
    inputs = model_square(data, card.preprocessing)
    bare, bare_no_spin, served = bare_passes(
        explain_path, inputs, args.bare_repeats, lambda: served_uploads(data, args, extra_env)
    )
    sequential, fast = served.pop("sequential"), served["fast_path_http_ms"]
    results = {
        "model": {
            "name": card.name,
            "path": str(keras_path),
            "input_size": card.preprocessing.image_size,
            "gradcam_layer": card.gradcam.layer,
        },
        "image": {"name": image_name, "size": [width, height], "bytes": len(data)},
        "overlay": args.overlay,
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_before": load_before,
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "bare_explain_pass": bare,
        "bare_explain_pass_no_spinning": bare_no_spin,
        "answer_bytes": percentiles([body["_bytes"] for _, body in sequential]),
        "naive_keras_io_in_process_ms": naive,
        "speedup_end_to_end_vs_naive_p50": speedup(naive, fast, "end_to_end"),
        "speedup_server_vs_naive_p50": speedup(naive, fast, "total"),
        **served,
        "server_env": extra_env,
        "ratios": ratios([bare, bare_no_spin], fast, served["throughput"]["requests_per_s"], sequential),
        "load_average_after": os.getloadavg(),
    }
    print_table(results)
    write_results(results, Path(args.out))
    return 0


def write_results(results: dict, out: Path) -> None:
    path = out / "benchmark_upload.json" if out.suffix != ".json" else out
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {path}")


def bare_summary(before: tuple[list[float], float], after: tuple[list[float], float]) -> dict:
    """The bare pass's latency (before and after pooled) and rate (passes a second, sequentially)."""
    times = before[0] + after[0]
    return {
        "threads": BARE_THREADS,
        "runs": len(times),
        "latency_ms": percentiles(times),
        "p50_before_after_ms": [round(float(np.median(before[0])), 2), round(float(np.median(after[0])), 2)],
        "runs_per_s": round(len(times) / (before[1] + after[1]), 2),
    }


def ratios(bares: list[dict], fast: dict, uploads_per_s: float, sequential: list) -> dict:
    """Issue 30's three measures, each with its target and whether this run met it. The bare pass is
    the faster of its two settings: spinning wins on an idle machine, loses when the cores are shared."""
    latency = round(fast["end_to_end"]["p50"] / min(bare["latency_ms"]["p50"] for bare in bares), 2)
    throughput = round(uploads_per_s / max(bare["runs_per_s"] for bare in bares), 2)
    answer_kb = round(max(body["_bytes"] for _, body in sequential) / 1000, 1)
    return {
        "end_to_end_p50_over_bare_p50": latency,
        "uploads_per_s_over_bare_per_s": throughput,
        "answer_kb_max": answer_kb,
        "targets": TARGETS,
        "met": {
            "latency": latency <= TARGETS["latency_ratio_max"],
            "throughput": throughput >= TARGETS["throughput_ratio_min"],
            "answer": answer_kb <= TARGETS["answer_kb_max"],
        },
    }


def print_ratios(results: dict) -> None:
    r = results["ratios"]
    print()
    for name, key in (
        ("bare explain pass", "bare_explain_pass"),
        ("  without spinning", "bare_explain_pass_no_spinning"),
    ):
        bare = results[key]
        print(
            f"{name} ({bare['threads']} threads, {bare['runs']} runs): p50 {bare['latency_ms']['p50']} ms "
            f"(before {bare['p50_before_after_ms'][0]}, after {bare['p50_before_after_ms'][1]}), "
            f"{bare['runs_per_s']} passes/s"
        )
    print(
        f"upload p50 end to end / the faster bare p50: {r['end_to_end_p50_over_bare_p50']}x "
        f"(target <= {TARGETS['latency_ratio_max']}: {'met' if r['met']['latency'] else 'NOT met'})"
    )
    print(
        f"uploads/s from {results['throughput']['clients']} clients / the faster bare passes/s: "
        f"{r['uploads_per_s_over_bare_per_s']}x "
        f"(target >= {TARGETS['throughput_ratio_min']}: {'met' if r['met']['throughput'] else 'NOT met'})"
    )
    print(
        f"largest answer: {r['answer_kb_max']} KB "
        f"(target <= {TARGETS['answer_kb_max']}: {'met' if r['met']['answer'] else 'NOT met'})"
    )


def print_table(results: dict) -> None:
    fast, naive = results["fast_path_http_ms"], results["naive_keras_io_in_process_ms"]
    rows = [
        ("decode", "decode"),
        ("preprocess", "preprocess"),
        ("model + Grad-CAM", "model_gradcam"),
        ("overlay + encode", "overlay_encode"),
        ("server total", "total"),
        ("HTTP", "http"),
        ("end to end", "end_to_end"),
    ]
    print(f"\n{'stage (ms)':<20}{'fast p50':>10}{'fast p95':>10}{'naive p50':>11}{'naive p95':>11}")
    for label, key in rows:
        n = naive.get(key, {})
        print(
            f"{label:<20}{fast[key]['p50']:>10.1f}{fast[key]['p95']:>10.1f}"
            f"{n.get('p50', float('nan')):>11.1f}{n.get('p95', float('nan')):>11.1f}"
        )
    t = results["throughput"]
    if naive:
        print(f"\nnaive (in process, no HTTP) / fast end to end, p50: {results['speedup_end_to_end_vs_naive_p50']}x")
    print(
        f"{t['clients']} clients, {t['requests']} uploads, {t['workers']} worker(s) x {t['threads']} threads: "
        f"{t['requests_per_s']} requests/s, latency p50 {t['latency_ms']['p50']} ms, p95 {t['latency_ms']['p95']} ms"
    )
    print(
        f"RSS per worker (MiB): idle {results['rss_mib_per_worker_idle']}, after the clients "
        f"{results['rss_mib_per_worker']}; ready {results['gunicorn_startup_s']} s after start; load average before: "
        f"{results['machine']['load_average_before'][0]:.2f}, after: {results['load_average_after'][0]:.2f} "
        f"on {results['machine']['cpus']} CPUs"
    )
    print_ratios(results)


if __name__ == "__main__":
    sys.exit(main())
