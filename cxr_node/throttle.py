"""Bounded reporting: a flood of one event writes one log line (and audit record) per interval.

A peer that opens thousands of connections, or a disk that stays full while modalities retry,
must not turn into thousands of log lines a second: the first occurrence of each kind is reported
at once, the following ones are counted and reported with the next line, at most once per
``interval`` seconds. Counters in the metrics still count every occurrence.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Hashable


class Throttle:
    """Decides, per key, whether an occurrence is reported now; thread-safe."""

    def __init__(self, interval: float = 10.0, max_keys: int = 1024):
        self.interval = interval
        self.max_keys = max_keys  # many sources at once: forget the oldest, never grow unbounded
        self._last: dict[Hashable, tuple[float, int]] = {}
        self._lock = threading.Lock()

    def due(self, key: Hashable) -> int:
        """How many occurrences of ``key`` to report now (this one and those held back), or 0."""
        now = time.monotonic()
        with self._lock:
            last, held = self._last.pop(key, (float("-inf"), 0))
            if now - last >= self.interval:
                self._last[key] = (now, 0)
                self._evict()
                return held + 1
            self._last[key] = (last, held + 1)
            return 0

    def _evict(self) -> None:
        while len(self._last) > self.max_keys:
            del self._last[next(iter(self._last))]
