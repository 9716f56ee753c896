"""Uploads: received within a deadline, kept in memory, checked for an allowed image type
before any decoder sees them.

The body deadline. gunicorn's threaded worker reads a request body in the thread that serves
the request, in blocking reads that wait until a whole chunk has arrived; a client sending its
body at 1 byte a second would hold that thread for days. `BodyDeadline` (WSGI middleware) gives
every request body `total_s` seconds to arrive in full and `read_timeout_s` seconds between any
two pieces of it; past either it answers 408. The per-read limit is a timeout on the socket
(`environ["gunicorn.socket"]`). It alone cannot stop a trickle (every byte restarts it), so a
single watchdog thread per process holds the deadlines and, when one passes, shuts the reading
side of that socket: the blocked read returns at once, and the 408 goes out on the writing side.
Without a socket (the development server, the test client) the deadline is checked between reads.
"""

from __future__ import annotations

import heapq
import io
import itertools
import socket
import threading
import time

from flask import Request
from werkzeug.exceptions import BadRequest, RequestTimeout

from pneumonia.reading.decoding import ACCEPTED_TYPES, sniff_format  # anything else is refused undecoded


class UploadError(Exception):
    """A request whose upload cannot be screened; `message` is shown to the person."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class InMemoryRequest(Request):
    """Werkzeug spools uploads over 500 kB to a temporary file; X-rays must never touch
    the disk, so every file part goes to a BytesIO (bounded by MAX_CONTENT_LENGTH)."""

    def _get_file_stream(self, total_content_length, content_type, filename=None, content_length=None):
        return io.BytesIO()


def upload_bytes(upload) -> bytes:
    """The in-memory part itself, not a copy (an upload may be 20 MB; InMemoryRequest keeps every part in a BytesIO)."""
    return upload.stream.getvalue() if isinstance(upload.stream, io.BytesIO) else upload.read()


def checked_upload(upload) -> bytes:
    """The bytes of one uploaded file when they are an accepted image type, else an UploadError saying
    what is wrong: a single upload's answer, and a batch's for each of its files."""
    data = upload_bytes(upload)
    if not data:
        if not upload.filename:
            raise UploadError(400, "No file was chosen: choose a chest X-ray image to upload.")
        raise UploadError(400, "The uploaded file is empty.")
    if sniff_format(data) is None:
        raise UploadError(415, f"The upload is not a supported image type. Upload a {ACCEPTED_TYPES} file.")
    return data


def read_upload(request: Request) -> bytes:
    """The bytes of the multipart field `file`, or an UploadError saying what is wrong."""
    upload = request.files.get("file")
    if upload is None:
        raise UploadError(400, 'No file was uploaded: choose a chest X-ray image (form field "file").')
    return checked_upload(upload)


class BodyTimeout(RequestTimeout):
    """408: the request body did not arrive within the deadline."""

    def __init__(self, total_s: float, read_timeout_s: float, stalled: bool):
        what = (
            f"nothing more of the upload arrived for {read_timeout_s:g} s"
            if stalled
            else f"the upload did not arrive within {total_s:g} s"
        )
        super().__init__(f"The upload took too long: {what}. Check the connection and try again.")


class MalformedBody(BadRequest):
    """400: the body's chunked transfer coding is broken (gunicorn raised while reading it)."""

    description = "The upload's chunked transfer coding is malformed, so the upload could not be read. Send it again."


def _malformed_body_errors() -> tuple[type[Exception], ...]:
    """What gunicorn raises when a body cannot be parsed (a bad chunk size, a missing chunk terminator);
    nothing where gunicorn is not installed (the development server parses bodies itself)."""
    try:
        from gunicorn.http.errors import ParseException
    except ImportError:
        return ()
    return (ParseException,)


MALFORMED_BODY_ERRORS = _malformed_body_errors()


class _Watch:
    __slots__ = ("sock", "cancelled", "fired")

    def __init__(self, sock):
        self.sock = sock
        self.cancelled = False
        self.fired = False


class _Watchdog:
    """One thread per process: at each deadline not cancelled in time, shut the socket's read side."""

    def __init__(self):
        self._wake = threading.Condition(threading.Lock())
        self._heap: list = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None

    def watch(self, deadline: float, sock) -> _Watch:
        entry = _Watch(sock)
        with self._wake:
            heapq.heappush(self._heap, (deadline, next(self._order), entry))
            if self._thread is None or not self._thread.is_alive():  # first use in this process
                self._thread = threading.Thread(target=self._run, name="body-deadline", daemon=True)
                self._thread.start()
            self._wake.notify()
        return entry

    def cancel(self, entry: _Watch) -> None:
        """After this returns the socket is never touched (the watchdog shuts it under the same lock)."""
        with self._wake:
            entry.cancelled = True

    def _run(self) -> None:
        with self._wake:
            while True:
                now = time.monotonic()
                while self._heap and (self._heap[0][2].cancelled or self._heap[0][0] <= now):
                    _, _, entry = heapq.heappop(self._heap)
                    if not entry.cancelled:
                        entry.fired = True
                        try:
                            entry.sock.shutdown(socket.SHUT_RD)
                        except OSError:
                            pass  # already closed
                self._wake.wait(self._heap[0][0] - now if self._heap else None)


WATCHDOG = _Watchdog()


class DeadlineInput:
    """`wsgi.input` with a total deadline and a per-read timeout; raises BodyTimeout (408)."""

    def __init__(self, stream, sock, total_s: float, read_timeout_s: float, length: int | None):
        self._stream = stream
        self._sock = sock
        self.total_s, self.read_timeout_s = total_s, read_timeout_s
        self.deadline = time.monotonic() + total_s
        self._left = length  # None: chunked, ends with an empty read
        self._watch = None
        self._prior_timeout = None
        self._done = False
        if sock is not None:
            self._prior_timeout = sock.gettimeout()
            sock.settimeout(read_timeout_s)
            self._watch = WATCHDOG.watch(self.deadline, sock)

    def _timed_out(self) -> bool:
        return (self._watch is not None and self._watch.fired) or time.monotonic() > self.deadline

    def _read(self, method, size):
        if self._done:
            return method(size)
        if self._timed_out():
            raise BodyTimeout(self.total_s, self.read_timeout_s, stalled=False)
        try:
            data = method(size)
        except MALFORMED_BODY_ERRORS:
            raise MalformedBody() from None  # was a 500 ("Unexpected InvalidChunkSize")
        except OSError as err:  # socket.timeout is an OSError
            if self._timed_out():
                raise BodyTimeout(self.total_s, self.read_timeout_s, stalled=False) from None
            if isinstance(err, TimeoutError):
                raise BodyTimeout(self.total_s, self.read_timeout_s, stalled=True) from None
            raise  # a reset connection: Werkzeug answers "client disconnected"
        if self._watch is not None and self._watch.fired:  # cut short by the watchdog
            raise BodyTimeout(self.total_s, self.read_timeout_s, stalled=False)
        if self._left is not None:
            self._left -= len(data)
        if not data or self._left == 0:
            self.finish()  # all of it arrived: the deadline no longer applies
        return data

    def read(self, size: int = -1) -> bytes:
        return self._read(self._stream.read, size)

    def readline(self, size: int = -1) -> bytes:
        return self._read(self._stream.readline, size)

    def __iter__(self):
        while line := self.readline():
            yield line

    def finish(self) -> None:
        """Cancel the deadline and give the socket its timeout back (idempotent)."""
        self._done = True
        if self._watch is not None:
            WATCHDOG.cancel(self._watch)
        if self._sock is not None:
            try:
                self._sock.settimeout(self._prior_timeout)
            except OSError:
                pass
            self._sock = None


class BodyDeadline:
    """WSGI middleware: every request with a body gets it through a DeadlineInput."""

    def __init__(self, wsgi_app, total_s: float, read_timeout_s: float):
        self.wsgi_app = wsgi_app
        self.total_s = float(total_s)
        self.read_timeout_s = float(read_timeout_s)

    def __call__(self, environ, start_response):
        length = environ.get("CONTENT_LENGTH", "")
        chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
        if not chunked and (not length.isdigit() or int(length) == 0):
            return self.wsgi_app(environ, start_response)
        body = DeadlineInput(
            environ["wsgi.input"],
            environ.get("gunicorn.socket"),
            self.total_s,
            self.read_timeout_s,
            None if chunked else int(length),
        )
        environ["wsgi.input"] = body
        try:
            return self.wsgi_app(environ, start_response)
        finally:
            body.finish()
