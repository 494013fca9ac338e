"""Shared pieces of the benchmarks: the test peers, process accounting, statistics and tables.

The benchmarks drive the real node and the real dcmtk / Orthanc peers through the test helpers in
tests/ (nodeproc.py, pacs.py, dicomgen.py), so that what is measured is what the tests exercise.
This machine is noisy: every comparison alternates its variants (A B A B ...) and reports medians.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
MIB = 2**20


# --- statistics and tables ---------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("median of no values")
    return statistics.median(values)


def percentile(values: Sequence[float], p: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default), p in [0, 100]."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= p <= 100:
        raise ValueError(f"percentile must be within [0, 100], got {p}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def alternating(variants: Sequence[Any], repeats: int) -> list[tuple[int, Any]]:
    """(repeat, variant) in the order A B C A B C ..., so slow drifts hit every variant alike."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    return [(r, v) for r in range(repeats) for v in variants]


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str = "") -> str:
    """A Markdown table (it pastes into benchmarks/README.md as it is)."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]
    lines = [f"\n{title}\n"] if title else []
    lines.append("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |")
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += ["| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    """Floats to about three significant digits, without exponents."""
    if not isinstance(value, float):
        return str(value)
    digits = 2 if abs(value) < 10 else 1 if abs(value) < 100 else 0
    return f"{value:.{digits}f}"


# --- the machine -------------------------------------------------------------------------------


def machine_summary() -> str:
    """One line naming what the numbers were measured on, for the README."""
    mem_gib = os.sysconf("SC_PHYS_PAGES") * PAGE_SIZE / 2**30
    return (f"{datetime.date.today().isoformat()}, commit {git_commit()}, {os.cpu_count()} cores, "
            f"{mem_gib:.0f} GiB RAM, disk {disk_kind(REPO)}, Python {platform.python_version()}")


def git_commit() -> str:
    """The short commit, with "+changes" when tracked files differ from it."""
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                          text=True)
    if done.returncode != 0:
        return "unknown"
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                           capture_output=True, text=True).stdout.strip()
    return done.stdout.strip() + ("+changes" if dirty else "")


def disk_kind(path: Path) -> str:
    """'rotational' / 'non-rotational' as the kernel reports the block device under ``path``."""
    try:
        dev = os.stat(path).st_dev
        block = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
        queue = block / "queue" if (block / "queue").exists() else block.resolve().parent / "queue"
        rotational = (queue / "rotational").read_text().strip()
        name = block.resolve().name
        return f"{name} ({'rotational' if rotational == '1' else 'non-rotational'} per the kernel)"
    except OSError:
        return "unknown"


# --- processes ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Usage:
    """Resident memory and CPU time of a process tree at one moment."""

    rss_bytes: int
    cpu_seconds: float
    processes: int


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()  # the name may hold spaces and parentheses


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants that are alive now."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat_fields(int(entry))):
            children.setdefault(int(fields[1]), []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def tree_usage(root: int) -> Usage:
    """RSS summed over the tree (shared pages count once per process) and CPU user+system time.

    CPU includes what the root's already-reaped children used (storescp --fork reaps each
    association's child).
    """
    rss, cpu, count = 0, 0.0, 0
    for pid in process_tree(root):
        fields = _stat_fields(pid)
        if fields is None:
            continue
        count += 1
        rss += int(fields[21]) * PAGE_SIZE
        cpu += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
        if pid == root:
            cpu += (int(fields[13]) + int(fields[14])) / CLOCK_TICKS
    return Usage(rss, cpu, count)


class TreeMonitor:
    """Samples a process tree on a thread: peak RSS (summed) and CPU time used while watched.

    CPU is counted per process (user + system), so children that live only for part of the run
    (storescp --fork's per-association children, which it does not wait for) are counted while
    alive; a child's last sampling interval (``interval``) can escape.
    """

    def __init__(self, root: int, interval: float = 0.05):
        self.root = root
        self.interval = interval
        self.peak_rss = 0
        self._cpu: dict[int, tuple[float, float]] = {}  # pid -> (first seen, last seen)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="tree-monitor")

    @property
    def cpu_seconds(self) -> float:
        return sum(last - first for first, last in self._cpu.values())

    def sample(self, first: bool = False) -> None:
        rss = 0
        for pid in process_tree(self.root):
            fields = _stat_fields(pid)
            if fields is None:
                continue
            rss += int(fields[21]) * PAGE_SIZE
            cpu = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
            start = self._cpu.get(pid, (cpu if first else 0.0, 0.0))[0]
            self._cpu[pid] = (start, cpu)
        self.peak_rss = max(self.peak_rss, rss)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> TreeMonitor:
        self.sample(first=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def machine_busy(window: float = 0.5) -> float:
    """Share of the machine's CPU time (all cores) that was not idle during ``window`` seconds."""

    def times() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]  # idle + iowait

    total, idle = times()
    time.sleep(window)
    total2, idle2 = times()
    return 1 - (idle2 - idle) / max(total2 - total, 1)


def wait_for_quiet(limit: float = 0.15, timeout: float = 90.0) -> float:
    """Wait (up to ``timeout``) until other work leaves the machine at most ``limit`` busy.

    Other sessions run test suites on these machines; a benchmark run that starts during one of
    them measures the neighbour. Returns the last busy share seen, for the record.
    """
    deadline = time.monotonic() + timeout
    busy = machine_busy()
    while busy > limit and time.monotonic() < deadline:
        busy = machine_busy()
    if busy > limit:
        progress(f"machine still {busy:.0%} busy with other work after {timeout:.0f} s; going on")
    return busy


def settle_disk() -> float:
    """Flush dirty pages, so one run's write-back does not slow the next; seconds it took."""
    started = time.perf_counter()
    os.sync()
    return time.perf_counter() - started


def wait_until(predicate: Callable[[], Any], timeout: float, what: str,
               interval: float = 0.02) -> Any:
    """``predicate()`` once truthy; TimeoutError naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        time.sleep(interval)


# --- arguments and scratch space ---------------------------------------------------------------


def add_common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run of under a minute (small sizes, one repeat)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="scratch folder (default: a new temporary folder, removed afterwards)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")


def positive_ints(text: str) -> list[int]:
    """argparse type for '1,4,8'."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


@contextmanager
def scratch(args: argparse.Namespace, prefix: str) -> Iterator[Path]:
    """The run's scratch folder, on the same disk as the repository's temporary files."""
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        yield args.workdir
        return
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        if args.keep:
            print(f"kept {path}", file=sys.stderr)
        else:
            shutil.rmtree(path, ignore_errors=True)


def progress(message: str) -> None:
    """Progress goes to stderr; the tables go to stdout."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
