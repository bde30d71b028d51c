"""One progress line for a whole cluster's extraction: videos done / total, frames/s, ETA,
failures.

On a terminal the line is rewritten in place; elsewhere (a log file, CI) a line is printed every
``interval`` seconds and once at the end, so that a log shows progress without a bar's noise.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _duration(seconds: float) -> str:
    s = round(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


class ClusterProgress:
    """Counts finished videos and frames; writes the line to ``stream`` (default stderr)."""

    def __init__(
        self,
        total: int,
        *,
        enabled: bool = True,
        stream: TextIO | None = None,
        interval: float = 30.0,
    ) -> None:
        self.total = total
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval if not self.tty else 0.2
        self.start = time.perf_counter()
        self.done = 0
        self.failed = 0
        self.frames = 0
        self._last = -float("inf")
        self._width = 0

    def update(self, *, complete: bool, frames: int = 0) -> None:
        """One more video finished (``complete`` or failed) with ``frames`` embedded frames."""
        self.done += 1
        self.failed += not complete
        self.frames += frames
        now = time.perf_counter()
        if now - self._last >= self.interval or self.done == self.total:
            self._last = now
            self._write(self.line(now))

    def line(self, now: float | None = None) -> str:
        elapsed = (now if now is not None else time.perf_counter()) - self.start
        rate = self.frames / elapsed if elapsed > 0 else 0.0
        left = self.total - self.done
        eta = _duration(elapsed / self.done * left) if self.done and left else "-"
        return (
            f"extract: {self.done}/{self.total} videos, {self.failed} failed, "
            f"{rate:.1f} frames/s, ETA {eta}"
        )

    def _write(self, text: str) -> None:
        if not self.enabled:
            return
        if self.tty:
            pad = max(0, self._width - len(text))
            self.stream.write("\r" + text + " " * pad)
            self._width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty and self._width:
            self.stream.write("\n")
            self.stream.flush()
