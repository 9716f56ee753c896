"""The decoding sandbox, the serving process's side: bytes from outside are parsed only in child
processes whose memory and processor time the operating system bounds (issue 39; the children's side is
pneumonia/serving/decoding_child.py).

    screening pipeline ──job: the bytes (or a path), S, display side──> a warm child, forked from a
    zygote that imported the decoders once (RLIMIT_AS, RLIMIT_FSIZE=0, a processor-time timer):
        prepare_xray: decode (Pillow, OpenCV, pydicom and its pixel handlers), pixel statistics,
        the model square, the display copy
    <──a JSON header and raw uint8 buffers, checked for shape: never a decoder object, never a pickle

Why processes with rlimits rather than per-format guesses: an adversarial probe found decoder buffers
no header check foresaw (a 795-byte progressive JPEG took 343 MiB in libjpeg's coefficient buffer; a
1 kB TIFF's one LZW tile 512 MiB). An address-space limit bounds what any decoder, of any format or
library version, can allocate; a processor-time limit bounds how long it can spin. rlimits rather than
a cgroup: they need no privileges, so they hold on a PaaS dyno, in a container run as a non-root user
and on a laptop alike (a cgroup needs a writable cgroup tree, which none of those give a process).

The limits (`DecodeLimits`): `memory_mib` of address space over what the child holds when it starts
(the interpreter and the decoders are mapped already, so the limit is what one decode may add), and
`seconds` of processor time, which the parent reads from /proc while it waits and enforces with
SIGKILL (processor time, so that a decode slowed by a busy machine is not cut short; WALL_FACTOR times
it on the clock for a child that blocks); a timer in the child (ITIMER_PROF), a second above it, is the
kernel's backstop. A child that runs out of memory answers with the limit and is retired; one that is killed or
dies is replaced; either way the file gets `DecodeLimitExceeded` (an `XrayReadError`: a 4xx saying which
limit), and the server, the other requests and the model slots never see the decode. A child whose
address space stays more than RETIRE_GROWTH_MIB over its start after a job, or whose peak passed half the
limit, is retired too, so the memory a large decode took goes back to the system.

The pool holds `workers` children: at most that many decodes run at once, and one more waits for a
child at most `wait_s` (then `DecoderBusy`: the web app's 503). Children start on first use; the zygote
is a new interpreter (no thread of the serving process is ever forked), so a child costs a fork.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np

from pneumonia.errors import XrayReadError
from pneumonia.reading.decoding import Source
from pneumonia.reading.pixel_stats import PixelStats
from pneumonia.serving.decoding_child import (
    DEFAULT_LIMITS,
    DecodeJob,
    DecodeLimits,
    crash_message,
    send_all,
    time_message,
)
from pneumonia.serving.preprocessing import PreparedXray

LOG = logging.getLogger(__name__)
MAX_REPLY_HEADER = 64 * 1024  # a child's JSON header; a longer one is a broken child
# An upload over START_CHECK_FROM goes to its child in two parts, the first START_BYTES then the rest, so that
# one whose start already settles its refusal is not copied into a decoder whole (decoding.refusal_at_start):
# in a 10-minute flood, 19 MB of noise behind a JPEG signature (docs/uploads.md). Real X-ray JPEGs are mostly
# under it and go in one part; a larger one pays a round trip.
START_BYTES = 64 * 1024
START_CHECK_FROM = 1024 * 1024
CPU_POLL_S = 0.05  # how often the parent reads a decoding child's processor time
WALL_FACTOR = 4  # a decode may take this many times its processor-time limit on the clock
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class DecodeLimitExceeded(XrayReadError):
    """The decode went past a limit of the sandbox: `limit` is "memory", "time" or "crash"."""

    def __init__(self, message: str, limit: str):
        super().__init__(message)
        self.limit = limit


class DecoderBusy(Exception):
    """Every decoding child stayed busy for `waited_s`: the web app answers 503 with Retry-After."""

    def __init__(self, waited_s: float):
        super().__init__(f"no decoder free within {waited_s:g} s")
        self.waited_s = waited_s


class DecodingChild:
    """One warm child, forked by the zygote, and the parent's end of its socket."""

    def __init__(self, zygote: Zygote, limits: DecodeLimits):
        self.limits = limits
        self.pid, self.connection = zygote.fork()
        self.usable = True

    def run(self, job: DecodeJob, data: bytes | None) -> tuple[dict, list[bytes]]:
        """The child's answer to one job, its JSON header and buffers; DecodeLimitExceeded when it went
        past a limit (the child is then unusable). An upload over START_CHECK_FROM is sent in two parts:
        its first START_BYTES, which the child may refuse the file on (`refusal_at_start`), then the rest."""
        self._send(job, job.header(), framed=True)
        if data is not None and job.first:
            self._send(job, memoryview(data)[: job.first])
            header, _ = self._answer(job)
            if not header.get("go"):
                return header, []  # refused on its start: the child read what it was sent, and stays
            data = memoryview(data)[job.first :]
        if data is not None:
            self._send(job, data)
        return self._answer(job)

    def _send(self, job: DecodeJob, data, framed: bool = False) -> None:
        try:
            if framed:
                self.connection.send_bytes(data)
            else:
                send_all(self.connection.fileno(), data)
        except OSError:  # it died before it read it all
            self.stop(kill=True)
            raise DecodeLimitExceeded(crash_message(job.bytes_name, self.limits), "crash") from None

    def _answer(self, job: DecodeJob) -> tuple[dict, list[bytes]]:
        try:
            in_time = self._answered_in_time()
            if in_time:
                header = json.loads(self.connection.recv_bytes(MAX_REPLY_HEADER))
                buffers = [self.connection.recv_bytes() for _ in _buffer_shapes(header)]
        except (EOFError, OSError, ValueError):  # ValueError: a header that is not JSON
            # It died: the kernel's CPU backstop, or a decoder that crashed (often on a failed allocation).
            self.stop(kill=True)
            raise DecodeLimitExceeded(crash_message(job.bytes_name, self.limits), "crash") from None
        if not in_time:
            self.stop(kill=True)
            raise DecodeLimitExceeded(time_message(job.bytes_name, self.limits), "time")
        if header.get("retire"):
            self.stop(kill=False)  # it exits by itself once it has answered
        return header, buffers

    def _answered_in_time(self) -> bool:
        """Waits for the answer while the child has used less than `seconds` of processor time (read from
        /proc, so a decode slowed by a busy machine is not cut short) and less than WALL_FACTOR times
        that on the clock (a child that blocks uses no processor time)."""
        started, spent_before = time.monotonic(), _cpu_seconds(self.pid)
        while not self.connection.poll(CPU_POLL_S):
            spent = _cpu_seconds(self.pid) - spent_before
            if spent > self.limits.seconds or time.monotonic() - started > WALL_FACTOR * self.limits.seconds:
                return False
        return True

    def stop(self, kill: bool) -> None:
        """Hang up (a child exits when its parent does); `kill` also kills it, as it may be mid-decode.
        The pool starts another in its place."""
        self.usable = False
        self.connection.close()
        if kill:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # gone already (the zygote reaps its children)


def _cpu_seconds(pid: int) -> float:
    """User + system processor seconds of process `pid` (0 once it is gone: its answer, or EOF, decides)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime (fields 14 and 15 of proc(5))


def _buffer_shapes(header: dict) -> list[list[int]]:
    return [shape for shape in (header.get("square"), header.get("display")) if shape]


def _raise_error(header: dict) -> None:
    """The child's error, as the exception the pipeline expects."""
    if "error" in header:
        if header.get("limit"):
            raise DecodeLimitExceeded(str(header["error"]), str(header["limit"]))
        if header.get("unexpected"):
            raise RuntimeError(str(header["error"]))
        raise XrayReadError(str(header["error"]))


def _header_values(header: dict) -> dict[str, str | list[str]]:
    """A header job's values, checked to be text or lists of text."""
    _raise_error(header)
    values = header.get("header")
    if not isinstance(values, dict) or not all(
        isinstance(value, str) or (isinstance(value, list) and all(isinstance(item, str) for item in value))
        for value in values.values()
    ):
        raise RuntimeError("a decoding child answered header values that are not text")
    return values


def _prepared(header: dict, buffers: list[bytes], job: DecodeJob) -> PreparedXray:
    """The child's reply as arrays, each checked against what was asked: nothing else is trusted."""
    _raise_error(header)
    square_shape, display_shape = header["square"], header["display"]
    if square_shape != [job.image_size, job.image_size]:
        raise RuntimeError("a decoding child answered a square of the wrong size")
    if display_shape is not None and (job.display_side is None or max(display_shape) > job.display_side):
        raise RuntimeError("a decoding child answered a display copy larger than asked")
    arrays = []
    for shape, buffer in zip(_buffer_shapes(header), buffers):
        if len(buffer) != math.prod(shape):
            raise RuntimeError("a decoding child answered an array of the wrong length")
        arrays.append(np.frombuffer(buffer, np.uint8).reshape(shape))
    width, height, chroma, spread = header["stats"]
    stats = PixelStats(int(width), int(height), float(chroma), float(spread))
    timing = {str(key): float(value) for key, value in dict(header["timing_ms"]).items()}
    display = arrays[1] if len(arrays) > 1 else None
    return PreparedXray(stats, arrays[0], display, timing, peak_mib=float(header["peak_mib"]))


class Zygote:
    """The process the children are forked from: a new interpreter (so no thread of the serving process
    is ever forked) that has imported the decoders once, so that a child costs a fork. It exits when its
    parent hangs up; the kernel reaps its children."""

    def __init__(self, limits: DecodeLimits):
        self._control, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        package_root = str(Path(__file__).resolve().parents[2])  # where `pneumonia` is imported from
        code = (
            f"import sys; sys.path.insert(0, {package_root!r}); "
            "from pneumonia.serving.decoding_child import zygote_main; "
            f"zygote_main({theirs.fileno()}, {limits.memory_mib!r}, {limits.seconds!r})"
        )
        self.process = subprocess.Popen(
            [sys.executable, "-c", code], pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL
        )
        theirs.close()
        self._lock = threading.Lock()

    def fork(self) -> tuple[int, Connection]:
        """(pid, the parent's end of its socket) of a new child."""
        with self._lock:
            self._control.sendall(b"f")
            message, fds, _, _ = socket.recv_fds(self._control, 32, 1)
        if not fds:
            raise RuntimeError(f"the decoding sandbox's zygote has stopped (exit status {self.process.poll()})")
        return int(message), Connection(fds[0])

    def close(self) -> None:
        self._control.close()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()


class DecodingSandbox:
    """A pool of `workers` bounded children; `prepare` is `prepare_xray` run in one of them."""

    def __init__(self, limits: DecodeLimits = DEFAULT_LIMITS, workers: int = 2, wait_s: float | None = None):
        if workers < 1:
            raise ValueError("the decoding sandbox needs at least one worker")
        self.limits = limits
        self.wait_s = wait_s
        self.workers = workers
        self._idle: queue.LifoQueue[DecodingChild | None] = queue.LifoQueue()
        for _ in range(workers):
            self._idle.put(None)  # started on first use
        self._zygote: Zygote | None = None
        self._zygote_lock = threading.Lock()
        self.replaced = 0  # children killed, dead or retired, and replaced

    def prepare(
        self, source: Source, image_size: int, display_side: int | None = None, bytes_name: str = "the upload"
    ) -> PreparedXray:
        """bytes or a path -> PreparedXray, decoded in a child. XrayReadError for what cannot be read,
        DecodeLimitExceeded past a limit, DecoderBusy when no child was free within `wait_s`."""
        path = None if isinstance(source, (bytes, bytearray, memoryview)) else str(source)
        size = 0 if path is not None else len(source)
        name = bytes_name if path is None else path
        job = DecodeJob(name, int(image_size), display_side, path, size=size)
        (header, buffers), waited = self._run(job, None if path is not None else source)
        prepared = _prepared(header, buffers, job)
        prepared.timing_ms["decoder_wait"] = round(waited * 1000, 2)
        return prepared

    def dicom_header(self, data: bytes, keywords, bytes_name: str = "the upload") -> dict[str, str | list[str]]:
        """The values of `keywords` in a DICOM file's header, read in a child (no pixels decoded)."""
        header, _ = self._run(DecodeJob(bytes_name, header_keywords=list(keywords), size=len(data)), data)[0]
        return _header_values(header)

    def declared_pixels(self, data: bytes, bytes_name: str = "the upload") -> int:
        """The pixels a file's header declares, read in a child (nothing decoded); 0 when it cannot be read
        within the limits (decoding it answers why)."""
        try:
            header, _ = self._run(DecodeJob(bytes_name, size=len(data), declared_only=True), data)[0]
            _raise_error(header)
        except XrayReadError:  # DecodeLimitExceeded too
            return 0
        pixels = header.get("declared_pixels")
        if not isinstance(pixels, int) or pixels < 0:
            raise RuntimeError("a decoding child answered a pixel count that is not one")
        return pixels

    def _run(self, job: DecodeJob, data: bytes | None) -> tuple[tuple[dict, list[bytes]], float]:
        """(the child's answer, seconds waited for a free child). A child lost mid-job (it died, or its
        answer broke off) is replaced and the file given to a fresh one once more: a child can be lost for
        reasons that are not the file's (a signal from outside; the OOM killer of a memory cgroup choosing it;
        once, the drifting processor-time backstop: docs/uploads.md); a file that loses a second child is that
        file's 400. Bytes over START_CHECK_FROM go in two parts, whatever the job (`DecodingChild.run`)."""
        if data is not None and len(data) > START_CHECK_FROM:
            job = dataclasses.replace(job, first=START_BYTES)
        try:
            return self._run_once(job, data)
        except DecodeLimitExceeded as err:
            if err.limit != "crash":
                raise
            LOG.warning("A decoding child was lost mid-job; the file goes to a fresh child once more.")
            return self._run_once(job, data)

    def _run_once(self, job: DecodeJob, data: bytes | None) -> tuple[tuple[dict, list[bytes]], float]:
        started = time.perf_counter()
        try:
            child = self._idle.get(timeout=self.wait_s)
        except queue.Empty:
            raise DecoderBusy(self.wait_s) from None
        waited = time.perf_counter() - started
        try:
            child = child if child is not None and child.usable else self._start()
            return child.run(job, data), waited
        finally:
            if child is not None and not child.usable:
                child, self.replaced = None, self.replaced + 1  # the next job starts a fresh one
            self._idle.put(child)

    def warm(self) -> None:
        """Start the zygote and every child now rather than on the first file (the zygote's imports take
        most of a second): each slot is taken, filled and given back."""
        children = [self._idle.get() for _ in range(self.workers)]
        try:
            children = [child if child is not None and child.usable else self._start() for child in children]
        finally:
            for child in children:
                self._idle.put(child)

    def _start(self) -> DecodingChild:
        with self._zygote_lock:
            if self._zygote is None or self._zygote.process.poll() is not None:
                self._zygote = Zygote(self.limits)
            zygote = self._zygote
        return DecodingChild(zygote, self.limits)

    def close(self) -> None:
        """Stop the idle children and the zygote (a busy child exits when its job ends: its parent has hung up)."""
        while True:
            try:
                child = self._idle.get_nowait()
            except queue.Empty:
                break
            if child is not None:
                child.stop(kill=True)
        with self._zygote_lock:
            if self._zygote is not None:
                self._zygote.close()
                self._zygote = None


_SHARED_LOCK = threading.Lock()
_SHARED: dict[tuple, DecodingSandbox] = {}


def shared_sandbox(
    limits: DecodeLimits = DEFAULT_LIMITS, workers: int | None = None, wait_s: float | None = None
) -> DecodingSandbox:
    """One sandbox per process for each setting: the command line, PACS runs, archive actors and the web
    app's instances share it. `workers` by default: one a core, at most two."""
    workers = workers or min(2, os.cpu_count() or 1)
    with _SHARED_LOCK:
        key = (limits, workers, wait_s)
        if key not in _SHARED:
            _SHARED[key] = DecodingSandbox(limits, workers, wait_s)
        return _SHARED[key]
