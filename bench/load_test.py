"""Load scenarios against the app as deployed: slow clients, a flood of uploads, a soak.

    .venv/bin/python -m bench.load_test slow  --clients 16 --seconds 60
    .venv/bin/python -m bench.load_test flood --clients 16 --seconds 90
    .venv/bin/python -m bench.load_test soak  --clients 16 --minutes 10 --out bench-results/soak.json

It starts gunicorn itself as the Procfile does (`gunicorn app:app`, gunicorn.conf.py, PORT set to
a free port), bound to 127.0.0.1 only, waits for /healthz, runs one scenario for a bounded time
with a bounded number of clients, stops gunicorn and prints its figures (and writes them as JSON
with --out). The real upload is the ../shared/samples JPEG nearest 2 megapixels (as
bench/benchmark_upload.py picks it), else a synthetic X-ray.

slow   N clients open POST /api/predict and send their body at 1 byte a second (each starts over
       when it is answered or cut off); meanwhile /healthz is asked every second and a real
       upload is sent every 3 seconds. Prints their latencies and what happened to the slow
       clients (408, connection closed) and after how long.
flood  N clients post uploads back to back for T seconds: real X-rays, a junk file (a JPEG
       signature and random bytes, 19 MB) and an oversize one (over the 20 MB limit). Prints
       answers per kind and status, good uploads/s, latency p50/p99 of the real ones, client
       timeouts and connection errors, Retry-After values, and the worker's RSS before/after.
soak   the flood for M minutes, sampling the worker's RSS every 10 s: the curve, and the change
       over the last half (the leak indicator: a plateau reads ~0).

Settings of the server come from the environment as in production (GUNICORN_THREADS,
PNEUMONIA_MODEL_SLOTS, PNEUMONIA_BODY_TIMEOUT, ...); --env NAME=VALUE adds some for one run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import requests  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
from bench.benchmark_upload import free_port, pick_image, rss_mib, worker_pids  # noqa: E402

MAX_CLIENTS = 64
MAX_SECONDS = 3600
CLIENT_TIMEOUT_S = 60  # a real upload not answered in this long counts as a client timeout
JUNK_BYTES = 19 * 1024 * 1024
OVERSIZE_BYTES = 21 * 1024 * 1024  # over the default 20 MB limit


# --- the server -------------------------------------------------------------------------


class Server:
    """`gunicorn app:app` as the Procfile starts it, on a free loopback port; logs to a file."""

    def __init__(self, model: str | None, extra_env: dict[str, str]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PORT": str(self.port), **extra_env}
        if model:
            env["PNEUMONIA_MODEL_PATH"] = str(Path(model).resolve())
        gunicorn = Path(sys.executable).with_name("gunicorn")
        command = [str(gunicorn)] if gunicorn.exists() else [sys.executable, "-m", "gunicorn"]
        # gunicorn.conf.py binds all interfaces; the command line narrows it to loopback.
        command += ["app:app", "--bind", f"127.0.0.1:{self.port}"]
        self.log = tempfile.NamedTemporaryFile("w+", prefix="load_test_gunicorn_", suffix=".log", delete=False)
        self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=self.log)

    def wait_ready(self, timeout_s: float = 240) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if self.process.poll() is not None:
                raise SystemExit(f"gunicorn exited while starting:\n{self.log_tail()}")
            try:
                if requests.get(f"{self.url}/healthz", timeout=5).status_code == 200:
                    return time.monotonic() - started
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise SystemExit(f"gunicorn not ready after {timeout_s} s:\n{self.log_tail()}")

    def worker_rss_mib(self) -> float:
        pids = worker_pids(self.process)
        return rss_mib(pids[0]) if pids else float("nan")

    def log_tail(self, lines: int = 30) -> str:
        self.log.flush()
        return "".join(Path(self.log.name).read_text(errors="replace").splitlines(True)[-lines:])

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(40)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        self.log.close()
        os.unlink(self.log.name)


# --- bodies and clients -------------------------------------------------------------------


def multipart(data: bytes, filename: str = "xray.jpeg") -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def post_upload(session: requests.Session, url: str, data: bytes, timeout: float = CLIENT_TIMEOUT_S) -> dict:
    """One upload; status (or "timeout"/"connection error"), latency, Retry-After."""
    body, content_type = multipart(data)
    started = time.perf_counter()
    try:
        response = session.post(
            f"{url}/api/predict?gradcam=1", data=body, headers={"Content-Type": content_type}, timeout=timeout
        )
        status = response.status_code
        retry_after = response.headers.get("Retry-After")
    except requests.Timeout:
        status, retry_after = "timeout", None
    except requests.ConnectionError:
        status, retry_after = "connection error", None
    return {"status": status, "ms": (time.perf_counter() - started) * 1000, "retry_after": retry_after}


def percentile(values, q) -> float | None:
    return round(float(np.percentile(values, q)), 1) if len(values) else None


def summary_ms(values) -> dict:
    return {
        "n": len(values),
        "p50": percentile(values, 50),
        "p99": percentile(values, 99),
        "max": round(max(values), 1) if values else None,
    }


def slow_client(url_port: int, body_length: int, stop: threading.Event, outcomes: list) -> None:
    """Opens POST /api/predict announcing `body_length` bytes and sends 1 byte a second until the
    server answers or closes; then starts over, until `stop`."""
    body, content_type = multipart(b"\xff\xd8\xff" + b"\0" * (body_length - 3))
    while not stop.is_set():
        sock = socket.create_connection(("127.0.0.1", url_port), timeout=5)
        started = time.monotonic()
        outcome, sent = None, 0
        try:
            sock.sendall(
                (
                    f"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n"
                ).encode()
            )
            sock.settimeout(1.0)
            while not stop.is_set() and sent < len(body):
                sock.sendall(body[sent : sent + 1])
                sent += 1
                try:
                    answer = sock.recv(4096)  # waits the 1 s between bytes
                except TimeoutError:
                    continue
                if not answer:
                    outcome = "closed"
                else:
                    line = answer.split(b"\r\n", 1)[0].decode(errors="replace")
                    outcome = line.split()[1] if len(line.split()) > 1 else line
                break
        except OSError:
            outcome = "closed"
        finally:
            sock.close()
        if outcome is not None:
            outcomes.append({"outcome": outcome, "held_s": round(time.monotonic() - started, 1), "bytes_sent": sent})


# --- scenarios -----------------------------------------------------------------------------


def run_slow(server: Server, args, image: bytes) -> dict:
    stop = threading.Event()
    outcomes: list[dict] = []
    clients = [
        threading.Thread(target=slow_client, args=(server.port, 100_000, stop, outcomes), daemon=True)
        for _ in range(args.clients)
    ]
    for thread in clients:
        thread.start()
    time.sleep(2)  # let them all connect and start trickling
    health, pages, uploads = [], [], []
    session = requests.Session()
    deadline = time.monotonic() + args.seconds
    tick = 0
    while time.monotonic() < deadline:
        second = started = time.perf_counter()
        try:
            status = requests.get(f"{server.url}/healthz", timeout=15).status_code
        except requests.RequestException:
            status = "timeout"
        health.append({"status": status, "ms": (time.perf_counter() - started) * 1000})
        if tick % 3 == 0:
            for path in ("/", "/model"):
                started = time.perf_counter()
                try:
                    status = requests.get(f"{server.url}{path}", timeout=15).status_code
                except requests.RequestException:
                    status = "timeout"
                pages.append({"path": path, "status": status, "ms": (time.perf_counter() - started) * 1000})
            uploads.append(post_upload(session, server.url, image, timeout=30))
        tick += 1
        time.sleep(max(0.0, 1.0 - (time.perf_counter() - second)))
    stop.set()
    for thread in clients:
        thread.join(5)
    held = [o["held_s"] for o in outcomes]
    return {
        "healthz": {
            "statuses": dict(Counter(str(h["status"]) for h in health)),
            "ms": summary_ms([h["ms"] for h in health if h["status"] == 200]),
        },
        "pages": {
            "statuses": dict(Counter(f"{p['path']} {p['status']}" for p in pages)),
            "ms": summary_ms([p["ms"] for p in pages if p["status"] == 200]),
        },
        "real_upload": {
            "statuses": dict(Counter(str(u["status"]) for u in uploads)),
            "ms": summary_ms([u["ms"] for u in uploads if u["status"] == 200]),
        },
        "slow_clients": {
            "outcomes": dict(Counter(o["outcome"] for o in outcomes)),
            "held_s": {"min": min(held, default=None), "p50": percentile(held, 50), "max": max(held, default=None)},
        },
    }


def flood(
    server: Server, clients: int, seconds: float, image: bytes, junk_share: float, oversize_share: float, on_tick=None
) -> dict:
    """`clients` threads posting back to back for `seconds`; `on_tick()` is called every 10 s."""
    rng = np.random.default_rng(0)
    junk = b"\xff\xd8\xff\xe0" + rng.bytes(JUNK_BYTES - 4)
    oversize = b"\xff\xd8\xff\xe0" + rng.bytes(OVERSIZE_BYTES - 4)
    bodies = {"real": image, "junk": junk, "oversize": oversize}
    stop_at = time.monotonic() + seconds
    results: list[dict] = []
    lock = threading.Lock()

    def client(seed: int) -> None:
        pick = random.Random(seed)
        session = requests.Session()
        while time.monotonic() < stop_at:
            draw = pick.random()
            kind = "junk" if draw < junk_share else "oversize" if draw < junk_share + oversize_share else "real"
            answer = post_upload(session, server.url, bodies[kind])
            answer["kind"], answer["at"] = kind, time.monotonic()
            with lock:
                results.append(answer)
            if answer["status"] == 503 and answer["retry_after"]:
                time.sleep(min(float(answer["retry_after"]), 2.0) * pick.random())  # a polite client backs off
            if answer["status"] in ("connection error",):
                session = requests.Session()

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    next_tick = started
    while any(thread.is_alive() for thread in threads):
        if on_tick and time.monotonic() >= next_tick:
            on_tick(time.monotonic() - started)
            next_tick += 10
        time.sleep(0.2)
    wall = time.monotonic() - started
    by_kind = defaultdict(Counter)
    for r in results:
        by_kind[r["kind"]][str(r["status"])] += 1
    real_ok = [r["ms"] for r in results if r["kind"] == "real" and r["status"] == 200]
    statuses = Counter(str(r["status"]) for r in results)
    return {
        "clients": clients,
        "seconds": round(wall, 1),
        "requests": len(results),
        "statuses": dict(statuses),
        "by_kind": {k: dict(v) for k, v in by_kind.items()},
        "server_errors_5xx_other_than_503": sum(n for s, n in statuses.items() if s.startswith("5") and s != "503"),
        "client_timeouts": statuses.get("timeout", 0),
        "connection_errors": statuses.get("connection error", 0),
        "good_uploads_per_s": round(len(real_ok) / wall, 2),
        "real_upload_ms": summary_ms(real_ok),
        "all_answers_ms": summary_ms([r["ms"] for r in results if isinstance(r["status"], int)]),
        "retry_after_s": dict(Counter(r["retry_after"] for r in results if r["status"] == 503)),
    }


def run_flood(server: Server, args, image: bytes) -> dict:
    before = server.worker_rss_mib()
    result = flood(server, args.clients, args.seconds, image, args.junk_share, args.oversize_share)
    result["rss_mib"] = {"before": before, "after": server.worker_rss_mib()}
    return result


def run_soak(server: Server, args, image: bytes) -> dict:
    samples: list[tuple[float, float]] = []

    def sample(elapsed: float) -> None:
        rss = server.worker_rss_mib()
        samples.append((round(elapsed), rss))
        print(f"  {elapsed:6.0f} s  RSS {rss:8.1f} MiB", flush=True)

    result = flood(server, args.clients, args.minutes * 60, image, args.junk_share, args.oversize_share, on_tick=sample)
    sample(result["seconds"])
    half = [s for s in samples if s[0] >= samples[-1][0] / 2]
    times, rss = np.array([s[0] for s in half]), np.array([s[1] for s in half])
    slope = float(np.polyfit(times, rss, 1)[0]) * 60 if len(half) >= 3 else float("nan")
    result["rss_curve"] = samples
    result["rss_last_half"] = {
        "from_mib": half[0][1],
        "to_mib": half[-1][1],
        "change_mib": round(half[-1][1] - half[0][1], 1),
        "slope_mib_per_min": round(slope, 2),
    }
    return result


# --- reporting -----------------------------------------------------------------------------


def report(scenario: str, result: dict) -> None:
    if scenario == "slow":
        h, p, u, s = result["healthz"], result["pages"], result["real_upload"], result["slow_clients"]
        print(f"/healthz: {h['statuses']}; ms p50 {h['ms']['p50']} p99 {h['ms']['p99']} max {h['ms']['max']}")
        print(f"/ and /model: {p['statuses']}; ms p50 {p['ms']['p50']} max {p['ms']['max']}")
        print(f"real upload: {u['statuses']}; ms p50 {u['ms']['p50']} max {u['ms']['max']}")
        print(
            f"slow clients: {s['outcomes']}; held s min {s['held_s']['min']} p50 {s['held_s']['p50']} "
            f"max {s['held_s']['max']}"
        )
        return
    print(
        f"{result['requests']} requests in {result['seconds']} s from {result['clients']} clients: {result['statuses']}"
    )
    for kind, counts in sorted(result["by_kind"].items()):
        print(f"  {kind:<9}{counts}")
    r = result["real_upload_ms"]
    print(
        f"good uploads/s {result['good_uploads_per_s']}; real upload ms p50 {r['p50']} p99 {r['p99']} "
        f"max {r['max']}; 5xx other than 503: {result['server_errors_5xx_other_than_503']}; "
        f"client timeouts {result['client_timeouts']}; connection errors {result['connection_errors']}"
    )
    if result["retry_after_s"]:
        print(f"Retry-After values (s: count): {result['retry_after_s']}")
    if "rss_mib" in result:
        print(f"worker RSS MiB: {result['rss_mib']['before']} -> {result['rss_mib']['after']}")
    if "rss_last_half" in result:
        h = result["rss_last_half"]
        print(
            f"RSS over the last half: {h['from_mib']} -> {h['to_mib']} MiB ({h['change_mib']:+} MiB, "
            f"{h['slope_mib_per_min']:+} MiB/min)"
        )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument("scenario", choices=("slow", "flood", "soak"))
    parser.add_argument("--clients", type=int, default=16, help=f"concurrent clients (at most {MAX_CLIENTS})")
    parser.add_argument("--seconds", type=float, default=60, help="length of slow and flood")
    parser.add_argument("--minutes", type=float, default=10, help="length of soak")
    parser.add_argument("--junk-share", type=float, default=0.2, help="share of 19 MB junk uploads (flood, soak)")
    parser.add_argument("--oversize-share", type=float, default=0.05, help="share of uploads over the size limit")
    parser.add_argument("--model", help="model directory (default: PNEUMONIA_MODEL_PATH, else model/)")
    parser.add_argument("--image", help="the real upload (default: the ../shared/samples JPEG nearest 2 MP)")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="server setting for this run, e.g. GUNICORN_THREADS=4",
    )
    parser.add_argument("--out", help="write the figures to this JSON file")
    args = parser.parse_args()
    if not 1 <= args.clients <= MAX_CLIENTS:
        parser.error(f"--clients must be 1..{MAX_CLIENTS}")
    if min(args.seconds, args.minutes * 60) <= 0 or max(args.seconds, args.minutes * 60) > MAX_SECONDS:
        parser.error(f"runs are bounded to {MAX_SECONDS} s")
    extra_env = dict(item.split("=", 1) for item in args.env)

    image, image_name = pick_image(args.image)
    server = Server(args.model, extra_env)
    try:
        startup_s = server.wait_ready()
        settings = {
            name: os.environ.get(name)
            for name in (
                "GUNICORN_THREADS",
                "WEB_CONCURRENCY",
                "PNEUMONIA_MODEL_SLOTS",
                "PNEUMONIA_MODEL_QUEUE_SECONDS",
                "PNEUMONIA_BODY_TIMEOUT",
                "PNEUMONIA_BODY_READ_TIMEOUT",
            )
            if os.environ.get(name)
        }
        settings.update(extra_env)
        print(
            f"gunicorn ready in {startup_s:.0f} s on {server.url}; upload {image_name} ({len(image) / 1e6:.2f} MB);"
            f" settings {settings or 'defaults'}; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs",
            flush=True,
        )
        load_before = os.getloadavg()
        run = {"slow": run_slow, "flood": run_flood, "soak": run_soak}[args.scenario]
        result = run(server, args, image)
    finally:
        server.stop()
    result = {
        "scenario": args.scenario,
        "settings": settings,
        "image": image_name,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "cpus": os.cpu_count(),
        **result,
    }
    report(args.scenario, result)
    print(
        f"load average before {load_before[0]:.2f}, after {result['load_average_after'][0]:.2f} "
        f"on {os.cpu_count()} CPUs"
    )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
