"""gunicorn settings, read from the environment a PaaS provides.

PORT               port to listen on (default 8000)
WEB_CONCURRENCY    worker processes (default 1): each holds its own copy of the model
GUNICORN_THREADS   threads per worker (default 4): they share the worker's model
GUNICORN_TIMEOUT   seconds a worker may stay silent (default 120)
"""
import os

bind = f"0.0.0.0:{os.environ.get('PORT', '8000')}"
workers = int(os.environ.get("WEB_CONCURRENCY", "1"))
threads = int(os.environ.get("GUNICORN_THREADS", "4"))
worker_class = "gthread"

# TensorFlow is not fork-safe: every worker imports app.py and loads the model itself.
preload_app = False

# A worker loads TensorFlow and the model and runs one warm-up pass before it serves
# (tens of seconds on a small instance); the timeout must outlast that and a cold request.
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "120"))
graceful_timeout = 30
keepalive = 5

# The heartbeat file lives in memory where there is a /dev/shm (containers often have a
# slow or read-only /tmp).
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None

accesslog = "-"  # method, path, status and timing only: bodies and uploads are never logged
errorlog = "-"
