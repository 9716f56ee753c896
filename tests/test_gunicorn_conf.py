"""gunicorn's settings: workers capped by the container's memory limit (Heroku's buildpack asks for two
on a 512 MB dyno, where two workers at the decode budget were killed)."""

from __future__ import annotations

import pytest

from pneumonia.web.gunicorn_conf import WORKER_MEMORY, memory_limit, workers_that_fit

MiB = 1024 * 1024


@pytest.mark.parametrize(
    "requested, limit, expected",
    [
        (1, None, 1),  # no limit: as asked
        (4, None, 4),
        (2, 512 * MiB, 1),  # a Standard-1X dyno with Heroku's WEB_CONCURRENCY=2
        (2, 1024 * MiB, 2),  # a Standard-2X holds two
        (8, 1024 * MiB, 2),
        (1, 256 * MiB, 1),  # never fewer than one
    ],
)
def test_workers_are_capped_by_the_memory_limit(requested, limit, expected):
    assert workers_that_fit(requested, limit) == expected
    assert WORKER_MEMORY >= 395 * MiB  # one worker's measured peak, with its decoding children, at the budget


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "proc_line, limit_file, content, expected",
    [
        ("0::/app.slice/web\n", "app.slice/web/memory.max", "536870912\n", 512 * MiB),  # cgroup v2
        ("0::/\n", "memory.max", "max\n", None),  # v2, no limit
        ("7:memory:/docker/abc\n3:cpu:/x\n", "memory/docker/abc/memory.limit_in_bytes", "536870912\n", 512 * MiB),  # v1
        ("7:memory:/\n", "memory/memory.limit_in_bytes", "9223372036854771712\n", None),  # v1, no limit
        ("7:memory:/gone\n", "memory/elsewhere/memory.limit_in_bytes", "1\n", None),  # unreadable: none
    ],
)
def test_the_memory_limit_is_read_from_this_process_cgroup(tmp_path, proc_line, limit_file, content, expected):
    proc = write(tmp_path / "proc_cgroup", proc_line)
    write(tmp_path / "sys" / limit_file, content)
    assert memory_limit(proc, tmp_path / "sys") == expected


def test_no_cgroup_file_means_no_limit(tmp_path):
    assert memory_limit(tmp_path / "missing", tmp_path) is None


def test_the_access_log_prints_no_basic_user_name_whatever_answers():
    """An answer given before the access check (a 429 of the rate limits) leaves the Authorization header
    in the environ gunicorn logs from: its format must not print the Basic user name, where a person may
    type the key (issue 39). The line is rendered as gunicorn renders it."""
    import base64
    import datetime
    from types import SimpleNamespace

    from gunicorn.config import Config
    from gunicorn.glogging import Logger

    from pneumonia.web import gunicorn_conf

    key = "typed-key-as-user-93d1e6b0"
    environ = {
        "REMOTE_ADDR": "10.1.2.3",
        "REQUEST_METHOD": "POST",
        "RAW_URI": "/api/predict",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "HTTP_AUTHORIZATION": "Basic " + base64.b64encode(f"{key}:x".encode()).decode(),
    }
    logger = Logger(Config())
    atoms = logger.atoms(
        SimpleNamespace(status="429 TOO MANY REQUESTS", sent=120, headers=[]), [], environ, datetime.timedelta(0)
    )
    line = gunicorn_conf.access_log_format % atoms
    assert "POST /api/predict" in line and " 429 " in line and key not in line
    assert key in Config().access_log_format % atoms  # gunicorn's default would have printed it
