"""Load scenarios against the app as deployed: slow clients, a flood of uploads, a soak, worker kills, bombs.

    .venv/bin/python -m bench.load slow  --clients 16 --seconds 60
    .venv/bin/python -m bench.load flood --clients 16 --seconds 90
    .venv/bin/python -m bench.load soak  --clients 16 --minutes 10 --out bench-results/soak.json
    .venv/bin/python -m bench.load crash --clients 8 --seconds 60 --kills 3
    .venv/bin/python -m bench.load bombs --clients 8 --rounds 2 --memory-limit 512

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
crash  N clients post real uploads back to back while a worker is killed with SIGKILL (as the
       kernel's OOM killer does) K times, --interval s apart from --warmup s on. Per kill: the
       uploads in flight and what they got (lost: not answered 200), how long until gunicorn had
       a new worker, until its model was loaded (the app's log line), and until an upload sent after
       the kill was answered 200 again (time to recover).
bombs  the small files of bench/bombs.py that decode to a lot (issue 33): each alone, then N clients
       sending them at once for R rounds, then a real upload. Prints each answer's status and
       seconds and the real upload's; with --memory-limit 512, whether a worker was killed.
       --at-the-limit sends the largest inputs the memory budget lets through instead (decoded).

Settings of the server come from the environment as in production (GUNICORN_THREADS,
PNEUMONIA_MODEL_SLOTS, PNEUMONIA_BODY_TIMEOUT, ...); --env NAME=VALUE adds some for one run.

--memory-limit MIB (any scenario) runs gunicorn, master and workers, inside a fresh memory cgroup
(v1) of MIB MiB, swap included, as a PaaS dyno does; the Heroku-dyno scenario (512 MB, and the
flood's mix of real, junk and oversize uploads) is

    .venv/bin/python -m bench.load flood --memory-limit 512 --seconds 600

It adds the cgroup's peak (memory.max_usage_in_bytes: page cache charged to it included, which the
kernel reclaims before it kills), the peak of its anonymous memory (sampled every 0.5 s), failcnt
(times usage met the limit), the kernel's OOM kills in it and the workers gunicorn logs as killed.
Page cache already charged elsewhere (files read before the run) is not charged again, so a fresh
dyno counts somewhat more. On Heroku the Python buildpack sets WEB_CONCURRENCY=2 on a 512 MB dyno
unless the app sets it: --env WEB_CONCURRENCY=2 is that case. Without root or a cgroup v1 memory
controller the scenario is skipped (exit 0, "skipped" in the JSON).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
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
CGROUP_V1_MEMORY = Path("/sys/fs/cgroup/memory")
# gunicorn's line when a worker dies of a signal; SIGTERM is its own graceful shutdown. SIGKILL
# (the kernel's OOM killer) reads "... was sent SIGKILL! Perhaps out of memory?", SIGABRT a timeout.
WORKER_KILLED = re.compile(r"Worker \(pid:\d+\) was sent (?!SIGTERM)")


# --- the memory limit ---------------------------------------------------------------------


class CgroupUnavailable(Exception):
    """This machine does not let this process make a memory cgroup (v1)."""


class MemoryCgroup:
    """A fresh memory cgroup (v1) of `limit_mib` MiB, swap included where the kernel accounts it;
    samples its anonymous memory every 0.5 s from creation until `remove`."""

    def __init__(self, limit_mib: int):
        if not (CGROUP_V1_MEMORY / "memory.limit_in_bytes").is_file():
            raise CgroupUnavailable(f"no cgroup v1 memory controller at {CGROUP_V1_MEMORY}")
        if os.geteuid() != 0:
            raise CgroupUnavailable("making a memory cgroup needs root")
        self.limit_mib = limit_mib
        self.path = CGROUP_V1_MEMORY / f"pneumonia_load_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        try:
            self.path.mkdir()
            # The memory limit first: the kernel refuses a memory+swap limit below it.
            for name in ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes"):
                if (self.path / name).exists():
                    (self.path / name).write_text(str(limit_mib * 1024 * 1024))
        except OSError as err:
            self.remove()
            raise CgroupUnavailable(f"cannot make {self.path}: {err}") from err
        self.peak_rss = 0
        self.stop_sampling = threading.Event()
        threading.Thread(target=self.sample, daemon=True).start()

    def wrap(self, command: list[str]) -> list[str]:
        """`command` run by a shell that joins the cgroup and then execs it: the same PID, and
        nothing of it (its children inherit the cgroup) ever runs outside."""
        return ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(self.path / "cgroup.procs"), *command]

    def read(self, name: str) -> str:
        return (self.path / name).read_text()

    def stat(self, key: str) -> int:
        return int(re.search(rf"^{key} (\d+)$", self.read("memory.stat"), re.M).group(1))

    def sample(self) -> None:
        while not self.stop_sampling.wait(0.5):
            try:
                self.peak_rss = max(self.peak_rss, self.stat("total_rss"))
            except OSError:
                return  # removed

    def figures(self) -> dict:
        return {
            "limit_mib": self.limit_mib,
            "peak_mib": round(int(self.read("memory.max_usage_in_bytes")) / 2**20, 1),
            "peak_rss_mib_sampled": round(self.peak_rss / 2**20, 1),
            "failcnt": int(self.read("memory.failcnt")),
            "oom_kills": int(re.search(r"^oom_kill (\d+)$", self.read("memory.oom_control"), re.M).group(1)),
        }

    def remove(self) -> None:
        """Removes the cgroup once the processes in it are gone (after 10 s, kills those left)."""
        if hasattr(self, "stop_sampling"):
            self.stop_sampling.set()
        deadline = time.monotonic() + 10
        while self.path.exists():
            pids = [int(pid) for pid in self.read("cgroup.procs").split()]
            if not pids:
                self.path.rmdir()
                return
            if time.monotonic() > deadline:
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)


# --- the server -------------------------------------------------------------------------


class Server:
    """`gunicorn app:app` as the Procfile starts it, on a free loopback port; logs to a file. In
    `cgroup` when given, which `stop` removes."""

    def __init__(self, model: str | None, extra_env: dict[str, str], cgroup: MemoryCgroup | None = None):
        self.cgroup = cgroup
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PORT": str(self.port), **extra_env}
        if model:
            env["PNEUMONIA_MODEL_PATH"] = str(Path(model).resolve())
        gunicorn = Path(sys.executable).with_name("gunicorn")
        command = [str(gunicorn)] if gunicorn.exists() else [sys.executable, "-m", "gunicorn"]
        # gunicorn.conf.py binds all interfaces; the command line narrows it to loopback.
        command += ["app:app", "--bind", f"127.0.0.1:{self.port}"]
        self.log = tempfile.NamedTemporaryFile("w+", prefix="load_gunicorn_", suffix=".log", delete=False)
        if cgroup:
            command = cgroup.wrap(command)
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

    def log_text(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")

    def log_tail(self, lines: int = 30) -> str:
        return "".join(self.log_text().splitlines(True)[-lines:])

    def workers_killed(self) -> int:
        return len(WORKER_KILLED.findall(self.log_text()))

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(40)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        self.log.close()
        os.unlink(self.log.name)
        if self.cgroup:
            self.cgroup.remove()


# --- bodies and clients -------------------------------------------------------------------


def multipart(data: bytes, filename: str = "xray.jpeg") -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def post_upload(
    session: requests.Session, url: str, data: bytes, timeout: float = CLIENT_TIMEOUT_S, query: str = "gradcam=1"
) -> dict:
    """One upload; status (or "timeout"/"connection error"), latency, Retry-After."""
    body, content_type = multipart(data)
    started = time.perf_counter()
    try:
        response = session.post(
            f"{url}/api/predict?{query}", data=body, headers={"Content-Type": content_type}, timeout=timeout
        )
        status = response.status_code
        retry_after = response.headers.get("Retry-After")
        error = _error_of(response) if status >= 400 else None
    except requests.Timeout:
        status, retry_after, error = "timeout", None, None
    except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as err:  # dropped, or cut mid-answer
        status, retry_after, error = "connection error", None, _innermost(err)
    return {"status": status, "ms": (time.perf_counter() - started) * 1000, "retry_after": retry_after, "error": error}


def _innermost(err: BaseException) -> str:
    """The exception under requests' and urllib3's wrappers, by type and words: what dropped the connection
    (a reset, the server closing a kept-alive connection as the request went out, a broken pipe)."""
    while True:
        inner = next((arg for arg in getattr(err, "args", ()) if isinstance(arg, BaseException)), None)
        inner = inner or getattr(err, "reason", None) or err.__cause__ or err.__context__
        if not isinstance(inner, BaseException) or inner is err:
            return f"{type(err).__name__}: {err}"[:160]
        err = inner


def _error_of(response) -> str:
    """The answer's sentence for a person (the JSON `error`), cut short; what a failure said."""
    try:
        return str(response.json().get("error", ""))[:160]
    except ValueError:
        return response.text[:160]


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
    server: Server,
    clients: int,
    seconds: float,
    image: bytes,
    junk_share: float,
    oversize_share: float,
    on_tick=None,
    record: list | None = None,
    hostile_share: float = 0.0,
) -> dict:
    """`clients` threads posting back to back for `seconds`; `on_tick()` is called every 10 s. Each
    answer (status, ms, kind, `at`: time.monotonic() when it came) is appended to `record` when given.
    `hostile_share` of the uploads are the small files of bench/bombs.py's DECODER_BOMBS (issue 39), each
    client's in turn."""
    bodies = upload_bodies(image, hostile=hostile_share > 0)
    hostile = [name for name in bodies if name.startswith("hostile:")]
    stop_at = time.monotonic() + seconds
    results: list[dict] = [] if record is None else record
    lock = threading.Lock()

    def client(seed: int) -> None:
        pick = random.Random(seed)
        session, previous = requests.Session(), None
        for turn in itertools.count(seed):
            if time.monotonic() >= stop_at:
                break
            draw = pick.random()
            kind = "junk" if draw < junk_share else "oversize" if draw < junk_share + oversize_share else "real"
            if draw >= 1 - hostile_share:
                kind = hostile[turn % len(hostile)]
            answer = post_upload(session, server.url, bodies[kind])
            answer["kind"], answer["at"], answer["after"] = kind, time.monotonic(), previous
            previous = f"{kind} {answer['status']}"  # what this client's connection carried last
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
    return flood_figures(results, clients, time.monotonic() - started)


def upload_bodies(image: bytes, hostile: bool = False) -> dict[str, bytes]:
    """What a flood's clients send: the real upload, junk under the size limit (a JPEG's first bytes,
    then noise) and junk over it; with `hostile`, each file of bench/bombs.py's DECODER_BOMBS under
    "hostile:NAME"."""
    from bench.bombs import DECODER_BOMBS, build

    rng = np.random.default_rng(0)
    junk = b"\xff\xd8\xff\xe0" + rng.bytes(JUNK_BYTES - 4)
    oversize = b"\xff\xd8\xff\xe0" + rng.bytes(OVERSIZE_BYTES - 4)
    bodies = {"real": image, "junk": junk, "oversize": oversize}
    if hostile:
        bodies.update({f"hostile:{name}": build(name)[0] for name in DECODER_BOMBS})
    return bodies


def flood_figures(results: list[dict], clients: int, wall: float) -> dict:
    """A flood's answers in figures: statuses in all and by kind of upload, errors, rates and times."""
    by_kind = defaultdict(Counter)
    for r in results:
        by_kind[r["kind"]][str(r["status"])] += 1
    real_ok = [r["ms"] for r in results if r["kind"] == "real" and r["status"] == 200]
    statuses = Counter(str(r["status"]) for r in results)
    slowest = defaultdict(float)
    for r in results:
        slowest[r["kind"]] = max(slowest[r["kind"]], r["ms"] or 0.0)
    return {
        "clients": clients,
        "seconds": round(wall, 1),
        "slowest_ms_by_kind": {kind: round(ms) for kind, ms in sorted(slowest.items())},
        "requests": len(results),
        "statuses": dict(statuses),
        "by_kind": {k: dict(v) for k, v in by_kind.items()},
        "server_errors_5xx_other_than_503": sum(n for s, n in statuses.items() if s.startswith("5") and s != "503"),
        "503_without_retry_after": sum(1 for r in results if r["status"] == 503 and not r["retry_after"]),
        "client_timeouts": statuses.get("timeout", 0),
        "connection_errors": statuses.get("connection error", 0),
        "good_uploads_per_s": round(len(real_ok) / wall, 2),
        "real_upload_ms": summary_ms(real_ok),
        "all_answers_ms": summary_ms([r["ms"] for r in results if isinstance(r["status"], int)]),
        "retry_after_s": dict(Counter(r["retry_after"] for r in results if r["status"] == 503)),
        # what every real upload not screened was told (a real X-ray should only ever wait: 200 or 503)
        "real_not_screened": dict(
            Counter(
                f"{r['status']}: {r.get('error')}"
                + (f" (after {r['after']})" if r["status"] == "connection error" else "")
                for r in results
                if r["kind"] == "real" and r["status"] not in (200, 503)
            )
        ),
    }


def bomb_rounds(server: Server, image: bytes, clients: int = 8, rounds: int = 2, at_the_limit: bool = False) -> dict:
    """Each bomb of bench/bombs.py alone (or, `at_the_limit`, each of the largest inputs the budget lets
    through), then `clients` clients sending them at once for `rounds` rounds (each client a different
    one), then a real upload: every answer's status and seconds; the worker's RSS at the start, once each
    file and a real upload have been answered once, and at the end (memory given back: the end against
    the second)."""
    from bench.bombs import AT_THE_LIMIT, BOMBS, DECODER_BOMBS, build

    bombs = {name: build(name) for name in (AT_THE_LIMIT if at_the_limit else {**BOMBS, **DECODER_BOMBS})}

    def send(name: str) -> dict:
        data, query = bombs[name]
        answer = post_upload(requests.Session(), server.url, data, query=query or "gradcam=1")
        return {"bomb": name, "status": answer["status"], "s": round(answer["ms"] / 1000, 2)}

    rss_start = server.worker_rss_mib()
    alone = [send(name) for name in bombs]
    post_upload(requests.Session(), server.url, image)
    rss_warm = server.worker_rss_mib()  # each path once: what a worker imports and keeps on first use
    names = list(bombs)
    together = []
    for round_number in range(rounds):
        picks = [names[(round_number + index) % len(names)] for index in range(clients)]
        with ThreadPoolExecutor(clients) as pool:
            together += list(pool.map(send, picks))
    after = post_upload(requests.Session(), server.url, image)
    return {
        "alone": alone,
        "together": together,
        "slowest_s": max(answer["s"] for answer in alone + together),
        "statuses": dict(Counter(str(answer["status"]) for answer in alone + together)),
        "real_upload_after": {"status": after["status"], "s": round(after["ms"] / 1000, 2)},
        "worker_rss_mib": {
            "start": round(rss_start, 1),
            "after_each_once": round(rss_warm, 1),
            "after": round(server.worker_rss_mib(), 1),
        },
    }


def run_bombs(server: Server, args, image: bytes) -> dict:
    return bomb_rounds(server, image, args.clients, args.rounds, args.at_the_limit)


def run_flood(server: Server, args, image: bytes) -> dict:
    before = server.worker_rss_mib()
    result = flood(
        server,
        args.clients,
        args.seconds,
        image,
        args.junk_share,
        args.oversize_share,
        hostile_share=args.hostile_share,
    )
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


MODEL_LOADED = re.compile(r"^\[([\d-]+ [\d:,]+)\] INFO in screening: Model ", re.M)


def kill_worker(server: Server) -> dict | None:
    """SIGKILL to a worker; then waits (up to 60 s) for gunicorn to fork its replacement."""
    pids = worker_pids(server.process)
    if not pids:
        return None
    victim = pids[0]
    killed_at, killed_wall = time.monotonic(), time.time()
    os.kill(victim, signal.SIGKILL)
    replaced_s = None
    while time.monotonic() - killed_at < 60:
        if [pid for pid in worker_pids(server.process) if pid != victim and pid not in pids]:
            replaced_s = round(time.monotonic() - killed_at, 2)
            break
        time.sleep(0.02)
    return {"pid": victim, "at": killed_at, "wall": killed_wall, "replaced_s": replaced_s}


def kill_figures(kill: dict, results: list[dict], log_text: str) -> dict:
    """What one kill cost: the uploads in flight at that moment and what they got, and the times
    from the kill until a new worker, its model loaded and the first 200 to an upload sent after it."""
    at = kill["at"]
    in_flight = [r for r in results if r["at"] - r["ms"] / 1000 < at <= r["at"]]
    after = [r["at"] for r in results if r["status"] == 200 and r["at"] - r["ms"] / 1000 >= at]
    loaded = [
        time.mktime(time.strptime(stamp.split(",")[0], "%Y-%m-%d %H:%M:%S")) + int(stamp.split(",")[1]) / 1000
        for stamp in MODEL_LOADED.findall(log_text)
    ]
    loaded_after = [t - kill["wall"] for t in loaded if t >= kill["wall"] - 0.001]
    return {
        "pid": kill["pid"],
        "in_flight": len(in_flight),
        "in_flight_statuses": dict(Counter(str(r["status"]) for r in in_flight)),
        "lost": sum(1 for r in in_flight if r["status"] != 200),
        "new_worker_s": kill["replaced_s"],
        "model_loaded_s": round(min(loaded_after), 2) if loaded_after else None,
        "answered_again_s": round(min(after) - at, 2) if after else None,
    }


def run_crash(server: Server, args, image: bytes) -> dict:
    """The flood of real uploads, and a worker killed every --interval s from --warmup s on."""
    results: list[dict] = []
    kills: list[dict] = []
    stop = threading.Event()

    def killer() -> None:
        if stop.wait(args.warmup):
            return
        for _ in range(args.kills):
            kill = kill_worker(server)
            if kill is None:
                return
            kills.append(kill)
            if stop.wait(args.interval):
                return

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    result = flood(server, args.clients, args.seconds, image, 0.0, 0.0, record=results)
    stop.set()
    thread.join(70)
    per_kill = [kill_figures(kill, results, server.log_text()) for kill in kills]
    result["kills"] = per_kill
    result["workers_killed_in_log"] = server.workers_killed()
    return result


# --- reporting -----------------------------------------------------------------------------


def report(scenario: str, result: dict) -> None:
    if "memory" in result:
        m = result["memory"]
        print(
            f"memory limit {m['limit_mib']} MiB: peak {m['peak_mib']} MiB (page cache included), anonymous "
            f"{m['peak_rss_mib_sampled']} MiB (sampled); failcnt {m['failcnt']}; OOM kills {m['oom_kills']}; "
            f"workers killed {m['workers_killed']}"
        )
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
    if scenario == "bombs":
        for answer in result["alone"] + result["together"]:
            print(f"  {answer['bomb']:<28}{answer['status']}  {answer['s']} s")
        print(f"slowest {result['slowest_s']} s; statuses {result['statuses']}; then {result['real_upload_after']}")
        print(f"worker RSS MiB {result['worker_rss_mib']}")
        return
    print(
        f"{result['requests']} requests in {result['seconds']} s from {result['clients']} clients: {result['statuses']}"
    )
    for kind, counts in sorted(result["by_kind"].items()):
        print(f"  {kind:<44}{counts}  slowest {result['slowest_ms_by_kind'][kind]} ms")
    r = result["real_upload_ms"]
    print(
        f"good uploads/s {result['good_uploads_per_s']}; real upload ms p50 {r['p50']} p99 {r['p99']} "
        f"max {r['max']}; 5xx other than 503: {result['server_errors_5xx_other_than_503']}; "
        f"client timeouts {result['client_timeouts']}; connection errors {result['connection_errors']}"
    )
    for said, count in result["real_not_screened"].items():
        print(f"  a real upload not screened, {count} x: {said}")
    if result["retry_after_s"]:
        print(
            f"Retry-After values (s: count): {result['retry_after_s']}; "
            f"503 without Retry-After: {result['503_without_retry_after']}"
        )
    if "rss_mib" in result:
        print(f"worker RSS MiB: {result['rss_mib']['before']} -> {result['rss_mib']['after']}")
    for number, kill in enumerate(result.get("kills", []), 1):
        print(
            f"kill {number} (worker {kill['pid']}, SIGKILL): {kill['in_flight']} uploads in flight "
            f"{kill['in_flight_statuses']}, lost {kill['lost']}; new worker after {kill['new_worker_s']} s, "
            f"model loaded after {kill['model_loaded_s']} s, uploads answered again after "
            f"{kill['answered_again_s']} s"
        )
    if "rss_last_half" in result:
        h = result["rss_last_half"]
        print(
            f"RSS over the last half: {h['from_mib']} -> {h['to_mib']} MiB ({h['change_mib']:+} MiB, "
            f"{h['slope_mib_per_min']:+} MiB/min)"
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument("scenario", choices=("slow", "flood", "soak", "crash", "bombs"))
    parser.add_argument("--clients", type=int, default=16, help=f"concurrent clients (at most {MAX_CLIENTS})")
    parser.add_argument("--seconds", type=float, default=60, help="length of slow and flood")
    parser.add_argument("--minutes", type=float, default=10, help="length of soak")
    parser.add_argument("--junk-share", type=float, default=0.2, help="share of 19 MB junk uploads (flood, soak)")
    parser.add_argument("--oversize-share", type=float, default=0.05, help="share of uploads over the size limit")
    parser.add_argument(
        "--hostile-share", type=float, default=0.0, help="share of bench/bombs.py's DECODER_BOMBS (flood)"
    )
    parser.add_argument("--rounds", type=int, default=2, help="rounds of --clients bombs at once (bombs)")
    parser.add_argument(
        "--at-the-limit", action="store_true", help="bombs: the largest inputs the memory budget lets through"
    )
    parser.add_argument("--kills", type=int, default=3, help="workers killed with SIGKILL (crash)")
    parser.add_argument("--interval", type=float, default=15, help="seconds between kills (crash)")
    parser.add_argument("--warmup", type=float, default=5, help="seconds of flood before the first kill (crash)")
    parser.add_argument("--model", help="model directory (default: PNEUMONIA_MODEL_PATH, else model/)")
    parser.add_argument("--image", help="the real upload (default: the ../shared/samples JPEG nearest 2 MP)")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="server setting for this run, e.g. GUNICORN_THREADS=4",
    )
    parser.add_argument(
        "--memory-limit", type=int, metavar="MIB", help="run gunicorn in a memory cgroup of MIB MiB (e.g. 512)"
    )
    parser.add_argument("--out", help="write the figures to this JSON file")
    args = parser.parse_args(argv)
    if not 1 <= args.clients <= MAX_CLIENTS:
        parser.error(f"--clients must be 1..{MAX_CLIENTS}")
    if min(args.seconds, args.minutes * 60) <= 0 or max(args.seconds, args.minutes * 60) > MAX_SECONDS:
        parser.error(f"runs are bounded to {MAX_SECONDS} s")
    return args


def server_settings(extra_env: dict[str, str]) -> dict[str, str]:
    """The server settings of this run: those set in the environment, then `--env`'s."""
    names = (
        "GUNICORN_THREADS",
        "WEB_CONCURRENCY",
        "PNEUMONIA_MODEL_SLOTS",
        "PNEUMONIA_MODEL_QUEUE_SECONDS",
        "PNEUMONIA_BODY_TIMEOUT",
        "PNEUMONIA_BODY_READ_TIMEOUT",
    )
    return {**{name: os.environ[name] for name in names if os.environ.get(name)}, **extra_env}


def run_scenario(args: argparse.Namespace, extra_env: dict[str, str], cgroup: MemoryCgroup | None) -> dict:
    """Starts gunicorn, runs `args.scenario` against it, stops it: the scenario's figures with the run's
    settings, upload and load averages."""
    image, image_name = pick_image(args.image)
    server = Server(args.model, extra_env, cgroup)
    try:
        startup_s = server.wait_ready()
        settings = server_settings(extra_env)
        print(
            f"gunicorn ready in {startup_s:.0f} s on {server.url}; upload {image_name} ({len(image) / 1e6:.2f} MB);"
            f" settings {settings or 'defaults'}; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs",
            flush=True,
        )
        load_before = os.getloadavg()
        run = {"slow": run_slow, "flood": run_flood, "soak": run_soak, "crash": run_crash, "bombs": run_bombs}[
            args.scenario
        ]
        result = run(server, args, image)
        if cgroup:  # before stop: it removes the cgroup and the log
            result["memory"] = {**cgroup.figures(), "workers_killed": server.workers_killed()}
    finally:
        server.stop()
    return {
        "scenario": args.scenario,
        "settings": settings,
        "image": image_name,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "cpus": os.cpu_count(),
        **result,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    extra_env = dict(item.split("=", 1) for item in args.env)
    cgroup = None
    if args.memory_limit:
        try:
            cgroup = MemoryCgroup(args.memory_limit)
        except CgroupUnavailable as err:
            print(f"skipped: --memory-limit {args.memory_limit}: {err}")
            skipped = {"scenario": args.scenario, "memory_limit_mib": args.memory_limit, "skipped": str(err)}
            write_json(args.out, skipped)
            return 0
    result = run_scenario(args, extra_env, cgroup)
    report(args.scenario, result)
    print(
        f"load average before {result['load_average_before'][0]:.2f}, after {result['load_average_after'][0]:.2f} "
        f"on {os.cpu_count()} CPUs"
    )
    write_json(args.out, result)
    return 0


def write_json(path: str | None, result: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
