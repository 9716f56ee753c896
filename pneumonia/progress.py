"""A progress bar for long loops over images, on a terminal only."""

from __future__ import annotations

import time
from typing import IO


class ProgressBar:
    """`37/100 [#######.............] 12.3 images/s` on one terminal line, redrawn in place;
    silent when the stream is not a terminal (piped or redirected). `predict` draws it while it
    screens files, `train` and `evaluate` while they decode images into the pixel cache."""

    WIDTH = 30

    def __init__(self, total: int, stream: IO[str]):
        self.total, self.stream, self.done = total, stream, 0
        self.active = total > 0 and stream.isatty()
        self.started = time.perf_counter()

    def advance(self, count: int = 1) -> None:
        self.done += count
        self.draw()

    def draw(self) -> None:
        if not self.active:
            return
        filled = self.WIDTH * self.done // self.total
        rate = self.done / max(time.perf_counter() - self.started, 1e-9)
        self.stream.write(
            f"\r{self.done}/{self.total} [{'#' * filled}{'.' * (self.WIDTH - filled)}] {rate:.1f} images/s"
        )
        self.stream.flush()

    def clear(self) -> None:
        """Wipes the bar's line, so another line can be printed in its place."""
        if self.active:
            self.stream.write("\r\x1b[K")
            self.stream.flush()

    def finish(self) -> None:
        if self.active:
            self.stream.write("\n")
            self.stream.flush()
