"""gunicorn settings, read from the environment a PaaS provides (gunicorn.conf.py in the repository
imports them; an installed package: `gunicorn -c python:pneumonia.web.gunicorn_conf 'pneumonia.web:create_app()'`).

PORT               port to listen on (default 8000)
WEB_CONCURRENCY    worker processes (default 1): each holds its own copy of the model (its
                   memory: docs/benchmarks.md); capped by the container's memory limit, one worker per
                   WORKER_MEMORY (Heroku's Python buildpack sets 2 on a 512 MB dyno when the app
                   does not: one is started there, and the log says so)
GUNICORN_THREADS   threads per worker (default 32): connections a worker serves at once
GUNICORN_TIMEOUT   seconds a worker may stay silent (default 120)

Threads are for connections, not for the model: a thread is held while its client sends the
request body, so a worker needs many more of them than screenings it can run at once. How many
uploads are screened at once, and how long one may wait for that, are the app's settings
(PNEUMONIA_MODEL_SLOTS, default 2, and PNEUMONIA_MODEL_QUEUE_SECONDS, default 5: beyond that
an upload is answered 503 with Retry-After); how long a client may take to send its body is
PNEUMONIA_BODY_TIMEOUT (default 30 s in all) and PNEUMONIA_BODY_READ_TIMEOUT (default 10 s
without a byte), beyond which it is answered 408. See pneumonia/web/capacity.py and pneumonia/web/uploads.py.
"""

import ctypes
import html
import os
from pathlib import Path

# What one worker may take with its decoding children: the peak of the largest inputs the header checks
# admit, 8 at once through both children, inside a 512 MiB cgroup, rounded up (docs/benchmarks.md,
# "One worker's memory", has the figure and its command; docs/uploads.md the budget behind it).
WORKER_MEMORY = 400 * 1024 * 1024


def memory_limit(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The memory limit of this process's cgroup (v2 or v1) in bytes, or None where there is none."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    candidates = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2
            candidates.append(root / path.lstrip("/") / "memory.max")
        elif "memory" in controllers.split(","):
            candidates.append(root / "memory" / path.lstrip("/") / "memory.limit_in_bytes")
    for candidate in candidates:
        try:
            text = candidate.read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 50:  # "max" or a huge number: no limit
            return int(text)
    return None


def workers_that_fit(requested: int, limit: int | None) -> int:
    """`requested` workers, fewer where the memory limit cannot hold them (never fewer than one)."""
    return requested if limit is None else max(1, min(requested, limit // WORKER_MEMORY))


requested_workers = int(os.environ.get("WEB_CONCURRENCY", "1"))
bind = f"0.0.0.0:{os.environ.get('PORT', '8000')}"
workers = workers_that_fit(requested_workers, memory_limit())
threads = int(os.environ.get("GUNICORN_THREADS", "32"))
worker_class = "gthread"

# ONNX Runtime's thread pools (and TensorFlow's, with PNEUMONIA_RUNTIME=keras) do not survive a
# fork: every worker imports app.py and loads the model itself.
preload_app = False

# A worker loads the model and runs one warm-up pass before it serves (about a second on ONNX
# Runtime, tens of seconds on the keras runtime); the timeout must outlast that and a cold request.
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "120"))
graceful_timeout = 30
keepalive = 5

# The heartbeat file lives in memory where there is a /dev/shm (containers often have a
# slow or read-only /tmp).
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None

accesslog = "-"  # method, path, status and timing only: bodies and uploads are never logged
# gunicorn's default format less `%(u)s`, the user name of a Basic header: a person may type the access key
# there, and an answer given before the access check takes the header out (a 429 of the rate limits, a
# 400 of gunicorn's own) would print it (issue 39).
access_log_format = '%(h)s %(l)s - %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s"'
errorlog = "-"


def on_starting(server):
    if workers < requested_workers:
        server.log.info(
            f"WEB_CONCURRENCY={requested_workers}, but the memory limit of {memory_limit() // 2**20} MiB holds "
            f"{workers} worker(s) of {WORKER_MEMORY // 2**20} MiB: starting {workers}"
        )
    server.log.info(f"Prometheus metrics of every worker in {metrics_folder()} (GET /metrics adds them up)")


# /metrics under several workers (pneumonia/web/telemetry.py): prometheus_client's multiprocess mode, each worker
# writing its metrics to files in PROMETHEUS_MULTIPROC_DIR. The master makes the folder before any worker starts
# (in memory where there is a /dev/shm), empties one it is given (files of an earlier run would be added to this
# one's), and marks a worker's files dead when it exits, so its gauges leave the sum; it removes a folder it made.
METRICS_ENV = "PROMETHEUS_MULTIPROC_DIR"
_made_metrics_folder: list[str] = []


def metrics_folder(environ=os.environ) -> str:
    """PROMETHEUS_MULTIPROC_DIR, made (or emptied) and set in `environ`, which the workers inherit."""
    import tempfile

    given = environ.get(METRICS_ENV)
    if given:
        Path(given).mkdir(parents=True, exist_ok=True)
        for stale in Path(given).glob("*.db"):
            stale.unlink()
        return given
    folder = tempfile.mkdtemp(prefix="pneumonia-metrics-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    _made_metrics_folder.append(folder)
    environ[METRICS_ENV] = folder
    return folder


def child_exit(server, worker):
    """A worker's gauges leave /metrics with it (its counters stay: they are counts of what it did)."""
    if os.environ.get(METRICS_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    import shutil

    for folder in _made_metrics_folder:
        shutil.rmtree(folder, ignore_errors=True)


def post_fork(server, worker):
    """Keep a worker's memory from ratcheting up under large uploads (glibc only).

    glibc raises its mmap threshold to the size of any large block freed (up to 32 MB), after
    which 20 MB upload buffers come from per-thread heaps that are seldom given back, and with many
    threads a flood of uploads makes the worker's RSS climb. A fixed 1 MiB threshold (large buffers
    are mapped and unmapped) and two arenas hold it.
    Fixing the mmap threshold also fixes glibc's trim threshold at its 128 KiB default (it too stops
    adapting), so every free at the top of a heap gave memory back and the next request faulted it in
    again, slowing an upload's overlay, encoding and preprocessing. A 4 MiB trim threshold keeps that
    much at the top of each heap (two arenas: at most 8 MiB). docs/benchmarks.md, "One worker's
    memory", has the figures and their commands.
    The glibc variables MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_ and MALLOC_ARENA_MAX, when set, win.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return  # not glibc
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        mallopt(-3, 1024 * 1024)  # M_MMAP_THRESHOLD
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        mallopt(-1, 4 * 1024 * 1024)  # M_TRIM_THRESHOLD
    if "MALLOC_ARENA_MAX" not in os.environ:
        mallopt(-8, 2)  # M_ARENA_MAX


def security_headed_error(sock, status_int, reason, mesg):
    """gunicorn's own answer to a request it cannot parse (400, 431 for headers over its limits, ...),
    as `gunicorn.util.write_error` writes it, with the security headers the app sends on every answer."""
    from gunicorn.util import write_nonblock

    from pneumonia.web.security import CONTENT_SECURITY_POLICY

    body = (
        f"<html><head><title>{html.escape(reason)}</title></head>"
        f"<body><h1>{html.escape(reason)}</h1><p>{html.escape(mesg)}</p></body></html>"
    ).encode("latin-1", "replace")
    headers = {
        "Connection": "close",
        "Content-Type": "text/html; charset=iso-8859-1",
        "Content-Length": str(len(body)),
        "Content-Security-Policy": CONTENT_SECURITY_POLICY,
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-store",
    }
    head = f"HTTP/1.1 {status_int} {reason}\r\n" + "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    write_nonblock(sock, head.encode("latin-1") + b"\r\n" + body)


def post_worker_init(worker):
    """gunicorn writes its error pages with `gunicorn.util.write_error` (workers/base.py calls it
    through the module): this worker's carry the app's security headers (issue 33)."""
    import gunicorn.util

    gunicorn.util.write_error = security_headed_error
