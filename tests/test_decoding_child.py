"""A decoding child's own processor-time backstop (pneumonia/serving/decoding_child.py), each check in a
fresh Python process: the timer ends it with SIGPROF, and counts from each job's start, so that a child
that has decoded for a long time gets the whole limit for its next job. (What it replaced, RLIMIT_CPU set
from getrusage, failed that by drifting over thousands of jobs: `bench/cpu_clocks.py` measures the drift,
which no test can draw on demand.)"""

from __future__ import annotations

import signal
import subprocess
import sys

from builders import REPO

from pneumonia.serving.decoding_child import BACKSTOP_MARGIN_S

SPIN = """
import time
def spin(seconds):
    started = time.process_time()
    while time.process_time() - started < seconds:
        pass
"""


def run(code: str) -> subprocess.CompletedProcess:
    script = f"{SPIN}\nfrom pneumonia.serving.decoding_child import _arm_cpu_timer\n{code}"
    return subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_a_job_that_spins_past_its_limit_and_the_margin_is_ended_by_sigprof():
    ended = run("_arm_cpu_timer(0.1)\nspin(30)\nprint('still here')")
    assert ended.returncode == -signal.SIGPROF and "still here" not in ended.stdout


def test_the_backstop_counts_from_the_jobs_start_not_the_childs():
    # 1.5 s spent before the job (more than the job's 0.1 + BACKSTOP_MARGIN_S), then most of its own budget
    assert BACKSTOP_MARGIN_S == 1.0
    done = run("spin(1.5)\n_arm_cpu_timer(0.1)\nspin(0.8)\nprint('done')")
    assert done.returncode == 0 and done.stdout.strip() == "done", done.stderr
