"""The decoding sandbox's children (pneumonia/serving/sandbox.py is the parent's side): the zygote, a new
interpreter that imports the decoders once and forks a child per request, and the child's life: bound
itself (RLIMIT_AS over its start, RLIMIT_FSIZE=0, one thread, one malloc arena), then answer jobs, each
under a processor-time timer, with a JSON header and raw uint8 buffers, until its parent hangs up or it retires.
Nothing here is imported by the serving process but the job's and the limits' shapes and the messages."""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import sys
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection

import numpy as np

from pneumonia.errors import XrayReadError
from pneumonia.reading.decoding import Source, refusal_at_start

MIB = 1024 * 1024
# A child whose address space is still more than this over its start after a job is replaced: the limit is
# measured from its start, so what its heap kept (glibc does not always give a freed top back) would shrink
# the next decode's room, and its memory goes back to the system with it.
RETIRE_GROWTH_MIB = 16
MAX_JOB_HEADER = 64 * 1024  # a job's JSON header
# The kernel's backstop to the parent's processor-time limit: this much over it, counted from the job's start.
BACKSTOP_MARGIN_S = 1.0


@dataclass(frozen=True)
class DecodeLimits:
    """What one decode may take: `memory_mib` of address space over the child's own at start, and
    `seconds` of processor time (the parent enforces it; the child's timer, BACKSTOP_MARGIN_S above it,
    is the kernel's backstop)."""

    memory_mib: int = 128
    seconds: float = 2.0


DEFAULT_LIMITS = DecodeLimits()


@dataclass(frozen=True)
class DecodeJob:
    """What the child is asked: the file's name in messages, the model's square side, the display
    copy's long side (None: none), and a path when the child reads the file itself; or, with
    `header_keywords`, only those values of a DICOM file's header (no pixels decoded)."""

    bytes_name: str
    image_size: int = 0
    display_side: int | None = None
    path: str | None = None
    header_keywords: list[str] | None = None
    size: int = 0  # the bytes that follow the job on the socket, unframed (none with a path)
    first: int = 0  # of those, sent first for the child to judge the file's start (0: all at once)
    declared_only: bool = False  # only the pixels the file's header declares (nothing decoded)

    def header(self) -> bytes:
        return json.dumps(self.__dict__).encode()


def _vm_bytes() -> int:
    """This process's address space (VmSize), from /proc/self/statm."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[0]) * resource.getpagesize()


def _vm_peak_bytes() -> int:
    """The largest address space this process has had (VmPeak), from /proc/self/status."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmPeak:"))
    return int(line.split()[1]) * 1024


def _bound_self(limits: DecodeLimits) -> None:
    """The child's own limits: one thread and one malloc arena, address space, no file writes."""
    import cv2

    cv2.setNumThreads(0)  # one thread: each of OpenCV's would reserve its own stack and malloc arena
    try:
        import ctypes

        # M_ARENA_MAX: one arena (a second one reserves 64 MiB of address space). glibc's mmap threshold is
        # left to adapt: a fixed 256 KiB one cost an upload 0.8 ms of page faults (`bench.benchmark_upload`),
        # and a child that kept what a large decode took is retired anyway (RETIRE_GROWTH_MIB).
        ctypes.CDLL("libc.so.6").mallopt(-8, 1)
    except (OSError, AttributeError):
        pass  # not glibc
    ceiling = _vm_bytes() + limits.memory_mib * MIB
    resource.setrlimit(resource.RLIMIT_AS, (ceiling, ceiling))
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))  # a decoder that tries to write a file is killed


def _arm_cpu_timer(seconds: float) -> None:
    """SIGPROF, which ends the child, once this job has used `seconds` + BACKSTOP_MARGIN_S of processor
    time, counted from now on the kernel's own processor clock (ITIMER_PROF).

    Why not RLIMIT_CPU (which this replaced): it bounds a child's processor time over its whole life, so
    each job set it at what getrusage said the child had used so far plus the limit. But the kernel
    enforces it on its tick-sampled clock, and over a long-lived child's thousands of small decodes with
    waits between them the two clocks drift apart, either way (`python -m bench.cpu_clocks`: 1.7 s after
    2,000 decodes on a busy machine). In a 10-minute flood the kernel killed both first children with
    SIGXCPU about 6 minutes in, each in the middle of a real X-ray (the "children lost mid-job" of
    docs/uploads.md). A timer set at each job's start counts on the kernel's clock from there: no drift
    carries over from one job to the next."""
    signal.setitimer(signal.ITIMER_PROF, seconds + BACKSTOP_MARGIN_S)


def _child_reply(job: DecodeJob, source: Source, limits: DecodeLimits, start_vm: int) -> tuple[dict, list[bytes]]:
    """(header, buffers) for one job: the prepared arrays, or the error for a person."""
    from pneumonia.reading.decoding import declared_pixels
    from pneumonia.reading.dicom import header_values
    from pneumonia.serving.preprocessing import prepare_xray

    try:
        if job.declared_only:
            return {"declared_pixels": declared_pixels(source)}, []
        if job.header_keywords is not None:
            return {"header": header_values(source, job.header_keywords)}, []
        prepared = prepare_xray(source, job.image_size, job.display_side, job.bytes_name)
    except Exception as err:
        if _ran_out_of_memory(err, limits, start_vm):
            return {"error": memory_message(job.bytes_name, limits), "limit": "memory"}, []
        if isinstance(err, XrayReadError):
            return {"error": str(err)}, []
        return {"error": f"It could not be read ({type(err).__name__}).", "unexpected": True}, []  # may quote the file
    stats = prepared.stats
    header = {
        "stats": [stats.width, stats.height, stats.chroma, stats.spread],
        "square": list(prepared.square.shape),
        "display": None if prepared.display is None else list(prepared.display.shape),
        "timing_ms": prepared.timing_ms,
    }
    buffers = [np.ascontiguousarray(prepared.square, np.uint8).tobytes()]
    if prepared.display is not None:
        buffers.append(np.ascontiguousarray(prepared.display, np.uint8).tobytes())
    return header, buffers


def _ran_out_of_memory(err: Exception, limits: DecodeLimits, start_vm: int) -> bool:
    """Whether a failed decode failed for want of memory: a MemoryError, or a decoder's own error (libjpeg's
    "Insufficient memory", pydicom's plugins' empty message, Pillow's "decoder error") after the job had
    taken more than half the limit. Decoders turn a failed allocation into errors of their own, so the
    address space the job took is what tells (a child is retired once its peak passes half the limit, so
    a peak past it is this job's)."""
    if isinstance(err, MemoryError):
        return True
    return _vm_peak_bytes() - start_vm > limits.memory_mib * MIB / 2


def child_main(connection: Connection, limits: DecodeLimits) -> None:
    """A child's life: bound itself, then answer jobs until its parent hangs up or it retires."""
    _bound_self(limits)
    peer = socket.socket(fileno=os.dup(connection.fileno()))  # the same socket, for the unframed upload
    start_vm = _vm_bytes()
    while True:
        try:
            job = DecodeJob(**json.loads(connection.recv_bytes(MAX_JOB_HEADER)))
            _arm_cpu_timer(limits.seconds)
            if job.path is None and job.first and _refused_at_its_start(connection, peer, job):
                continue
            source = job.path if job.path is not None else receive_exactly(peer, job.size)
        except (EOFError, OSError):
            return
        header, buffers = _child_reply(job, source, limits, start_vm)
        del source
        peak = _vm_peak_bytes() - start_vm  # the most this child has taken over its life
        header["peak_mib"] = round(peak / MIB, 1)
        kept = _vm_bytes() - start_vm
        # Retired when it kept memory, or once its peak passed half the limit: a later failure's peak is then
        # its own (`_ran_out_of_memory`). A 19 MB upload that is not an image passes through without a fork.
        header["retire"] = kept > RETIRE_GROWTH_MIB * MIB or peak > limits.memory_mib * MIB / 2
        connection.send_bytes(json.dumps(header).encode())
        for buffer in buffers:
            connection.send_bytes(buffer)
        if header["retire"]:
            return


def _refused_at_its_start(connection: Connection, peer: socket.socket, job: DecodeJob) -> bool:
    """Judges the file by its first `job.first` bytes, left on the socket (MSG_PEEK): True once a refusal is
    answered (those bytes read off, the rest never sent), False once the parent is told to send the rest."""
    head = peer.recv(job.first, socket.MSG_PEEK | socket.MSG_WAITALL)
    refusal = refusal_at_start(head, job.bytes_name)
    if refusal is None:
        connection.send_bytes(json.dumps({"go": True}).encode())
        return False
    receive_exactly(peer, job.first)
    connection.send_bytes(json.dumps({"error": refusal, "at_start": True}).encode())
    return True


def send_all(fd: int, data) -> None:
    """`data` written to `fd` in full, unframed: no copy of it is made (a 20 MB upload stays one buffer)."""
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view) :]


def receive_exactly(peer: socket.socket, size: int) -> bytes:
    """`size` bytes from `peer`, read into one bytes object (MSG_WAITALL: the kernel fills it as the upload
    arrives; a framed read would hold the upload twice, and a bytearray would be copied again by the
    decoders' BytesIO); EOFError when the other end hangs up first."""
    data = peer.recv(size, socket.MSG_WAITALL)
    while len(data) < size:  # a signal cut the wait short
        more = peer.recv(size - len(data), socket.MSG_WAITALL)
        if not more:
            raise EOFError("the other end hung up")
        data += more
    return data


def memory_message(name: str, limits: DecodeLimits) -> str:
    return (
        f"{_capitalised(name)} could not be decoded within {limits.memory_mib} MiB of memory: it declares or "
        "holds more than an X-ray needs, or is damaged. Nothing else was affected."
    )


def time_message(name: str, limits: DecodeLimits) -> str:
    return (
        f"{_capitalised(name)} could not be decoded within {limits.seconds:g} s of processor time: an X-ray "
        "decodes in a fraction of that; this file is damaged or built to keep the decoder busy."
    )


def crash_message(name: str, limits: DecodeLimits) -> str:
    return (
        f"The decoder stopped on {name} before it had decoded it (it went past its {limits.memory_mib} MiB or "
        f"{limits.seconds:g} s, or crashed): the file is damaged or built to break decoders. Nothing else was affected."
    )


def _capitalised(name: str) -> str:
    return name[:1].upper() + name[1:]


def zygote_main(control_fd: int, memory_mib: int, seconds: float) -> None:
    """The zygote's life: import what a decode needs, then fork a child for each request."""
    # Everything a job runs, imported once here rather than in each child on its first job: a fresh child
    # (after a kill or a retirement) took about a quarter of a second of processor time importing OpenCV,
    # the preprocessing and the card's models, which counted against its decode's limit; shared, their pages
    # are not each child's own either.
    import cv2  # noqa: F401
    import pydicom.pixels  # noqa: F401  (the pixel handlers pydicom would import on first use)
    from PIL import Image

    from pneumonia.reading.dicom import header_values  # noqa: F401
    from pneumonia.serving.preprocessing import prepare_xray  # noqa: F401

    Image.init()  # every Pillow plugin, once
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the children
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in a terminal is the parent's to handle
    limits = DecodeLimits(memory_mib, seconds)
    control = socket.socket(fileno=control_fd)
    while control.recv(1):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pid = os.fork()
        if pid == 0:
            control.close()
            ours.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            status = 0
            try:
                child_main(Connection(theirs.detach()), limits)
            except BaseException as err:  # a bug of ours: its type and where (a message could quote the file)
                where = "".join(traceback.format_tb(err.__traceback__))
                print(f"decoding child: {type(err).__name__}\n{where}", file=sys.stderr)
                status = 1
            finally:
                os._exit(status)
        theirs.close()
        socket.send_fds(control, [str(pid).encode()], [ours.fileno()])
        ours.close()
