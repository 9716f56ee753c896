"""Model capacity: how many uploads a worker screens at once, and when it answers "busy".

A worker has many more threads (connections) than screenings it can run at a useful speed on
its cores. `ModelCapacity` lets at most `slots` screenings run at once; further uploads wait in
line for a slot, first come first served. An upload whose expected wait,

    (uploads already in line + 1) x (seconds one screening takes) / slots,

is over `max_wait_s` is refused at once with `ModelBusy` (503 with Retry-After) instead of joining
a line it would stand in for longer than a person, or a client's timeout, will wait. One that has
stood in line for 2 x `max_wait_s` anyway (the estimate was wrong: the CPU is shared, say) is
refused the same way, so no upload waits without bound.

The time of one screening is a moving average over the screenings this worker ran (decode,
model, Grad-CAM and encoding: everything done holding the slot), so the bound follows the
machine: when screenings slow down, fewer uploads are let in line.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from contextlib import contextmanager

from flask import current_app

from pneumonia.web.settings import settings

SMOOTHING = 0.2  # weight of the latest screening in the moving average
INITIAL_SERVICE_S = 0.5  # the estimate until a screening has been timed


class ModelBusy(Exception):
    """Too many uploads wait for the model: answer 503 with Retry-After `retry_after` seconds."""

    def __init__(self, retry_after: int, expected_wait_s: float):
        super().__init__(f"expected wait for the model {expected_wait_s:.1f} s")
        self.retry_after = retry_after
        self.expected_wait_s = expected_wait_s


class ModelCapacity:
    """At most `slots` screenings at once; a line bounded by its expected wait `max_wait_s`."""

    def __init__(self, slots: int, max_wait_s: float, initial_service_s: float = INITIAL_SERVICE_S):
        if slots < 1:
            raise ValueError("MODEL_SLOTS must be at least 1")
        if max_wait_s < 0:
            raise ValueError("MODEL_QUEUE_SECONDS must not be negative")
        self.slots = int(slots)
        self.max_wait_s = float(max_wait_s)
        self.service_s = float(initial_service_s)
        self.running = 0
        self.refused = 0
        self._line: deque[threading.Event] = deque()  # one event per waiting upload, set on its turn
        self._lock = threading.Lock()

    @property
    def waiting(self) -> int:
        return len(self._line)

    def expected_wait_s(self) -> float:
        """Seconds a new upload would wait for a slot: 0 while one is free."""
        if self.running < self.slots and not self._line:
            return 0.0
        return (len(self._line) + 1) * self.service_s / self.slots

    def _busy(self, expected_wait_s: float) -> ModelBusy:
        self.refused += 1
        line_drains_in = len(self._line) * self.service_s / self.slots
        return ModelBusy(max(1, math.ceil(line_drains_in)), expected_wait_s)

    def acquire(self) -> None:
        with self._lock:
            if self.running < self.slots and not self._line:
                self.running += 1
                return
            expected = self.expected_wait_s()
            if expected > self.max_wait_s:
                raise self._busy(expected)
            turn = threading.Event()
            self._line.append(turn)
        if turn.wait(2 * self.max_wait_s):
            return  # release() handed its slot over
        with self._lock:
            if turn.is_set():
                return  # handed over just now
            self._line.remove(turn)
            raise self._busy(2 * self.max_wait_s)

    def release(self, elapsed_s: float | None = None) -> None:
        with self._lock:
            if elapsed_s is not None:
                self.service_s += SMOOTHING * (elapsed_s - self.service_s)
            if self._line:
                self._line.popleft().set()  # the slot passes to the first in line: `running` stays
            else:
                self.running -= 1

    @contextmanager
    def slot(self):
        """Hold a model slot for the block; raises ModelBusy rather than wait too long."""
        self.acquire()
        started = time.perf_counter()
        try:
            yield
        finally:
            self.release(time.perf_counter() - started)

    def snapshot(self) -> dict:
        with self._lock:
            return {
                "slots": self.slots,
                "running": self.running,
                "waiting": len(self._line),
                "service_ms": round(self.service_s * 1000, 1),
                "max_wait_s": self.max_wait_s,
                "refused": self.refused,
            }


def register(app) -> None:
    """app.extensions["model_capacity"], from MODEL_SLOTS and MODEL_QUEUE_SECONDS."""
    configured = settings(app)
    app.extensions["model_capacity"] = ModelCapacity(configured.model_slots, configured.model_queue_seconds)


@contextmanager
def model_slot():
    """`with model_slot(): screener.screen(...)`, on the current app's capacity."""
    with current_app.extensions["model_capacity"].slot():
        yield
