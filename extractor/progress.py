"""Progress of an extraction run: videos done of total, frames, frames/s, ETA and failures.

On a terminal it is a tqdm bar over the videos with frames, frames/s and failures beside it;
elsewhere (a log file, a pipe, a batch system) it is one plain line every ``interval`` seconds
and a last one at the end, so that a long run under ``nohup`` or a scheduler says how far it got:

    extract: 3/7 videos, 1,240 frames, 15.2 frames/s, 0:00:21 elapsed, ETA 0:00:28, 0 failed

Whoever runs the extraction calls :meth:`ExtractProgress.frames` as frames come out of the model
and :meth:`~ExtractProgress.video_done` / :meth:`~ExtractProgress.video_failed` as videos finish,
from any thread, then :meth:`~ExtractProgress.close`. Lines are written when a call finds that
``interval`` seconds have passed since the last one, so a run that makes no progress for a while
is silent for that while (its next line then shows the lower rate).
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

from tqdm import tqdm

DEFAULT_INTERVAL = 10.0  # seconds between plain lines


def _clock(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class ExtractProgress:
    """Counts of one run and how they are shown (see the module doc).

    ``total``: videos this run does. ``enabled`` False shows nothing (the counts are still kept).
    ``stream``: where to write (default ``sys.stderr``); a bar when it is a terminal, plain lines
    otherwise (``bar`` forces one or the other). ``interval``: seconds between plain lines (0:
    a line at every call). ``clock``: the time source (seconds, monotonic).
    """

    def __init__(
        self,
        total: int,
        *,
        enabled: bool = True,
        stream: TextIO | None = None,
        bar: bool | None = None,
        interval: float = DEFAULT_INTERVAL,
        desc: str = "extract",
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if total < 0:
            raise ValueError(f"total must be >= 0, got {total!r}")
        if interval < 0:
            raise ValueError(f"interval must be >= 0 seconds, got {interval!r}")
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self.desc = desc
        self.clock = clock
        self.done = 0  # videos finished, failed ones included
        self.failed = 0
        self.n_frames = 0  # frames through the model
        self.start = clock()
        self._last_line = self.start
        self._lock = threading.Lock()
        self._closed = False
        if bar is None:
            bar = enabled and _is_terminal(self.stream)
        self.lines = enabled and not bar
        self._bar: tqdm | None = None
        if enabled and bar:
            self._bar = tqdm(total=total, unit="video", desc=desc, file=self.stream, leave=True)

    # ------------------------------------------------------------------ counts
    def frames(self, n: int) -> None:
        """``n`` more frames came out of the model."""
        with self._lock:
            self.n_frames += n
            self._show()

    def video_done(self) -> None:
        """One more video finished (written)."""
        with self._lock:
            self.done += 1
            if self._bar is not None:
                self._bar.update(1)
            self._show()

    def video_failed(self) -> None:
        """One more video failed (it counts as finished)."""
        with self._lock:
            self.done += 1
            self.failed += 1
            if self._bar is not None:
                self._bar.update(1)
            self._show()

    def close(self) -> None:
        """The last line (plain lines) or the bar's last refresh."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._bar is not None:
                self._set_postfix()
                self._bar.close()
            elif self.lines:
                self._write_line()

    # ------------------------------------------------------------------ derived
    def elapsed(self) -> float:
        return max(self.clock() - self.start, 0.0)

    def rate(self) -> float:
        """Frames per second since the run began."""
        elapsed = self.elapsed()
        return self.n_frames / elapsed if elapsed > 0 else 0.0

    def eta(self) -> float | None:
        """Seconds left, from the time per finished video so far (None before the first)."""
        if self.done == 0:
            return None
        return self.elapsed() * (self.total - self.done) / self.done

    def line(self) -> str:
        """The plain line of the counts as they are now."""
        eta = self.eta()
        return (
            f"{self.desc}: {self.done}/{self.total} videos, {self.n_frames:,} frames, "
            f"{self.rate():.1f} frames/s, {_clock(self.elapsed())} elapsed, "
            f"ETA {_clock(eta) if eta is not None else '?'}, {self.failed} failed"
        )

    # ------------------------------------------------------------------ output
    def _show(self) -> None:
        if self._bar is not None:
            self._set_postfix()
        elif self.lines and self.clock() - self._last_line >= self.interval:
            self._write_line()

    def _set_postfix(self) -> None:
        assert self._bar is not None
        self._bar.set_postfix_str(
            f"{self.n_frames:,} frames, {self.rate():.1f} frames/s, {self.failed} failed",
            refresh=False,
        )

    def _write_line(self) -> None:
        self._last_line = self.clock()
        try:
            self.stream.write(self.line() + "\n")
            self.stream.flush()
        except (OSError, ValueError):  # a closed or broken stream must not stop the run
            self.lines = False


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
