"""A progress bar on standard error for long evaluation work: no dependency, no terminal library.

On a terminal one line is redrawn (at most every REDRAW_SECONDS); in a log file or a pipe a line
is written every tenth of the work or every LOG_SECONDS, whichever comes first, so a run in the
background still shows where it is without flooding its log.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

WIDTH = 30
REDRAW_SECONDS = 0.2
LOG_SECONDS = 30.0


class Progress:
    def __init__(self, total: int, unit: str, done: int = 0, stream: TextIO | None = None):
        self.total, self.unit, self.done = max(total, 0), unit, done
        self.stream = stream if stream is not None else sys.stderr
        self.terminal = self.stream.isatty()
        self._started, self._counted_from = time.monotonic(), done
        self._shown_at, self._shown_tenth = 0.0, -1
        self._show(force=True)

    def advance(self, count: int = 1) -> None:
        self.done = min(self.total, self.done + count)
        self._show(force=self.done == self.total)

    def close(self) -> None:
        if self.terminal:
            self.stream.write("\n")
            self.stream.flush()

    def _show(self, force: bool) -> None:
        now = time.monotonic()
        tenth = self.done * 10 // self.total if self.total else 10
        due = (now - self._shown_at >= REDRAW_SECONDS) if self.terminal else (
            tenth != self._shown_tenth or now - self._shown_at >= LOG_SECONDS)
        if not (force or due):
            return
        self._shown_at, self._shown_tenth = now, tenth
        filled = WIDTH * self.done // self.total if self.total else WIDTH
        line = (f"[{'#' * filled}{'.' * (WIDTH - filled)}] {self.done}/{self.total} "
                f"{self.unit}{self._rate(now)}")
        self.stream.write(f"\r{line}\x1b[K" if self.terminal else line + "\n")
        self.stream.flush()

    def _rate(self, now: float) -> str:
        counted, elapsed = self.done - self._counted_from, now - self._started
        if counted <= 0 or elapsed <= 0:
            return ""
        per_item = elapsed / counted
        left = per_item * (self.total - self.done)
        return f"  {per_item:.2f} s each, {_duration(left)} left" if left else \
            f"  {per_item:.2f} s each"


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.0f} s"
