"""How far apart two clocks of a process's processor time drift over many small decodes, as a decoding
child runs them: getrusage's (the scheduler's precise time, what /proc shows too) and the kernel's own
tick-sampled one, on which RLIMIT_CPU and ITIMER_PROF are enforced. Why a decoding child's processor-time
backstop is a timer set at each job's start and not RLIMIT_CPU set at "getrusage so far + the limit"
(pneumonia/serving/decoding_child.py: `_arm_cpu_timer`).

    .venv/bin/python -m bench.cpu_clocks                       # the ../shared/samples JPEG nearest 2 MP
    .venv/bin/python -m bench.cpu_clocks --seconds 120 --busy 3 --every 1000 --idle-ms 0.5

The kernel's clock is read as an ITIMER_PROF set far out less what is left of it. `--busy N` processes
spin beside the decodes, as a flood's clients and workers do on a shared machine; the tick-sampled clock
then charges each tick to whichever process holds the core at that instant.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import signal
import sys
import time

FAR_S = 1e6  # an ITIMER_PROF this far out never fires: it is only read


def spin() -> None:
    while True:
        pass


def getrusage_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def kernel_clock_s() -> float:
    return FAR_S - signal.getitimer(signal.ITIMER_PROF)[0]


def measure(data: bytes, seconds: float, every: int, idle_s: float) -> list[dict]:
    """Decodes `data` as a child's job does until `seconds` have passed, idle `idle_s` between jobs (a
    child waits for its next job on a socket); both clocks every `every` jobs (and at the end)."""
    from pneumonia.serving.preprocessing import prepare_xray

    previous = signal.signal(signal.SIGPROF, signal.SIG_IGN)
    signal.setitimer(signal.ITIMER_PROF, FAR_S)
    readings, jobs, started, before = [], 0, time.monotonic(), getrusage_s()  # both clocks from here
    try:
        while True:
            prepare_xray(data, 224, 512)
            time.sleep(idle_s)
            jobs += 1
            done = time.monotonic() - started >= seconds
            if jobs % every == 0 or done:
                rusage, kernel = getrusage_s() - before, kernel_clock_s()
                readings.append({"jobs": jobs, "getrusage_s": rusage, "kernel_s": kernel, "apart_s": kernel - rusage})
            if done:
                return readings
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, previous)


def main(argv: list[str] | None = None) -> int:
    from bench.benchmark_upload import pick_image

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", help="the file (default: the ../shared/samples JPEG nearest 2 MP)")
    parser.add_argument("--seconds", type=float, default=60, help="how long to decode")
    parser.add_argument("--busy", type=int, default=3, help="processes spinning beside it")
    parser.add_argument("--every", type=int, default=1000, help="jobs between readings")
    parser.add_argument("--idle-ms", type=float, default=0.5, help="idle time between jobs")
    args = parser.parse_args(argv)
    data, name = pick_image(args.image)
    spinners = [multiprocessing.Process(target=spin, daemon=True) for _ in range(args.busy)]
    for process in spinners:
        process.start()
    try:
        readings = measure(data, args.seconds, args.every, args.idle_ms / 1000)
    finally:
        for process in spinners:
            process.kill()
    print(f"{name} ({len(data) / 1e6:.2f} MB), {args.idle_ms:g} ms idle between jobs, {args.busy} spinning beside it:")
    for reading in readings:
        print(
            f"  after {reading['jobs']:>6} jobs: getrusage {reading['getrusage_s']:8.3f} s, the kernel's clock "
            f"{reading['kernel_s']:8.3f} s, apart {reading['apart_s']:+.3f} s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
