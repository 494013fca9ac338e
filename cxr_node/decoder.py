"""The decoder process: images are decoded in a child process that may fail alone.

Compressed pixel data is the most hostile input the node handles. A codestream can declare far
more pixels than its few kilobytes hold, and a decoder library can crash or loop on a crafted
one. So `imaging.prepare` runs in a child process, a fresh ``python -m cxr_node.decoder`` (spawned,
not a fork of the node, which runs threads), under an address-space limit it sets itself
(``limits.decode_memory_mb``, RLIMIT_AS), and is given ``limits.decode_timeout_seconds``. Whatever
goes wrong there (an out-of-memory error, a crash, a hang) becomes an `ImagingError` for that
image; the node itself neither grows nor dies, and the next image gets a fresh process.

One process is kept between images (starting one costs the imports of numpy, pydicom and the
codecs); it is replaced after any image that did not decode, so a process that saw a failure
never handles the next image. It is a bound on resources, not a security boundary: it runs as the
node's user.

Log events of the child are sent back with its answer and logged by the node, so they reach the
node's log in its format, with its identifier filtering and the image handle bound by the caller.
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import traceback
import weakref
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import structlog

from cxr_node.config import LimitsConfig
from cxr_node.imaging import ImagingError, prepare

log = structlog.get_logger(__name__)

T = TypeVar("T")

START_TIMEOUT_SECONDS = 60.0
"""How long a new decoder process may take to import its libraries and say it is ready."""

# Libraries that start a thread pool per core reserve address space for each thread (and glibc a
# malloc arena per thread): on a many-core server that alone could exceed the limit. Decoding and
# rendering one image needs no thread pool.
_CHILD_ENVIRONMENT = {
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "MALLOC_ARENA_MAX": "2",
}
NEAR_LIMIT = 0.9
"""A failed call that took the address space this close to the limit ran out of memory: codec
libraries report a failed allocation as a decode error of their own ("Out of free memory")."""
_LOG_METHODS = frozenset({"debug", "info", "warning", "error", "critical"})


class DecoderUnavailable(RuntimeError):
    """The decoder process could not be started: a problem of the node, not of an image."""


class DecoderProcess:
    """Runs image decoding in a child process under the memory and time limits of ``limits``.

    Safe to call from several threads (calls are served one at a time). The child is started on
    first use and stopped by `close` or when this object is garbage-collected.
    """

    def __init__(self, limits: LimitsConfig):
        if not isinstance(limits, LimitsConfig):
            raise TypeError(f"limits must be a LimitsConfig, got {type(limits).__name__}")
        self.limits = limits
        self._lock = threading.Lock()
        self._child: _Child | None = None
        self._stop_at_exit: weakref.finalize[Any, Any] | None = None

    def prepare(self, path: Path, max_side: int) -> np.ndarray:
        """`imaging.prepare` in the child: model pixels, or an ImagingError with the reason."""
        pixels = self.run(prepare, path, max_side, self.limits)
        if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim != 2:
            raise ImagingError("the decoder returned something other than a grayscale image")
        return pixels

    def run(self, function: Callable[..., T], *args: Any) -> T:
        """``function(*args)`` in the child; both must be picklable (a module-level function).

        An ImagingError raised there is raised here; every other way the call can fail (out of
        memory, a crash, the time limit, an unexpected exception) is an ImagingError that says so.
        """
        with self._lock:
            child = self._ready_child()
            try:
                return child.call(function, args, self.limits)
            except ImagingError:
                if child.used_up:
                    self._stop_child("replaced after an image that did not decode")
                raise

    @property
    def pid(self) -> int | None:
        """The child's process id while one is running (for tests and diagnostics)."""
        child = self._child
        return child.process.pid if child is not None and child.process.poll() is None else None

    def close(self) -> None:
        with self._lock:
            self._stop_child("closed")

    def _ready_child(self) -> _Child:
        if self._child is not None and self._child.process.poll() is not None:
            self._stop_child(f"it had exited ({_exit_description(self._child.process.returncode)})")
        if self._child is None:
            self._child = _Child.start(self.limits)
            log.info("imaging.decoder_started", pid=self._child.process.pid,
                     memory_mb=self.limits.decode_memory_mb)
            self._stop_at_exit = weakref.finalize(self, self._child.stop)
        return self._child

    def _stop_child(self, why: str) -> None:
        child, self._child = self._child, None
        if child is not None and self._stop_at_exit is not None:
            self._stop_at_exit()  # child.stop(), once
            log.info("imaging.decoder_stopped", pid=child.process.pid, reason=why)


class _Child:
    """One decoder process and the connection to it."""

    def __init__(self, process: subprocess.Popen[bytes], connection: Connection):
        self.process = process
        self.connection = connection
        self.used_up = False  # set when a call failed: the process is not given another image

    @classmethod
    def start(cls, limits: LimitsConfig) -> _Child:
        ours, theirs = socket.socketpair()
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", __name__, str(theirs.fileno()),
                 str(limits.decode_memory_mb), str(os.getpid())],
                stdin=subprocess.DEVNULL, pass_fds=(theirs.fileno(),),
                env={**os.environ, **_CHILD_ENVIRONMENT},
            )
        except OSError as exc:
            ours.close()
            raise DecoderUnavailable(f"cannot start the decoder process: {exc.strerror}") from exc
        finally:
            theirs.close()
        child = cls(process, Connection(ours.detach()))
        try:
            if not child.connection.poll(START_TIMEOUT_SECONDS):
                raise EOFError
            child.connection.recv()  # "ready"
        except (EOFError, OSError) as exc:
            child.stop()
            raise DecoderUnavailable(
                f"the decoder process did not start ({_exit_description(process.returncode)}); "
                "its error, if it wrote one, is in the node's log just before this"
            ) from exc
        return child

    def call(self, function: Callable[..., T], args: tuple[Any, ...], limits: LimitsConfig) -> T:
        timeout = limits.decode_timeout_seconds
        try:
            self.connection.send((function, args))
        except OSError as exc:
            self.used_up = True
            raise ImagingError(self._death_reason()) from exc
        if not self.connection.poll(timeout):
            self.used_up = True
            raise ImagingError(
                f"decoding took longer than {timeout:g} s (limits.decode_timeout_seconds)"
            )
        try:
            outcome, value, events = self.connection.recv()
        except (EOFError, OSError) as exc:
            self.used_up = True
            raise ImagingError(self._death_reason()) from exc
        _log_child_events(events)
        if outcome == "ok":
            return value  # type: ignore[no-any-return]
        self.used_up = True
        if outcome == "memory":
            raise ImagingError(
                f"decoding needed more than {limits.decode_memory_mb} MB "
                "(limits.decode_memory_mb)"
            )
        raise ImagingError(value)

    def _death_reason(self) -> str:
        try:
            code = self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return "the decoder process stopped answering"
        if code == -signal.SIGKILL:
            return ("the decoder process was killed (signal 9, SIGKILL), most likely by the "
                    "system for lack of memory")
        if code < 0:
            return f"the decoder crashed ({_exit_description(code)})"
        return f"the decoder process {_exit_description(code)}"

    def stop(self) -> None:
        self.connection.close()
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


def _exit_description(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        return f"signal {-code}, {signal.Signals(-code).name}"
    return f"exited with code {code}"


def _log_child_events(events: list[tuple[str, dict[str, Any]]]) -> None:
    for method, fields in events:
        fields = dict(fields)
        event = str(fields.pop("event", "imaging.event"))
        getattr(log, method if method in _LOG_METHODS else "warning")(event, **fields)


# --- the child ------------------------------------------------------------------------------------


def _serve(connection: Connection, memory_mb: int, parent: int) -> None:
    """The child's loop: one call at a time, each answered with (outcome, value, log events)."""
    limit = memory_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    _die_with(parent)
    events: list[tuple[str, dict[str, Any]]] = []

    def collect(_logger: Any, method: str, fields: dict[str, Any]) -> Any:
        events.append((method, fields))
        raise structlog.DropEvent

    structlog.configure(processors=[collect], cache_logger_on_first_use=False)
    connection.send(("ready", os.getpid()))
    while True:
        try:
            function, args = connection.recv()
        except EOFError:  # the node closed the connection
            return
        events.clear()
        before = _address_space_peak()
        outcome, value = _outcome(function, args, events)
        peak = _address_space_peak()
        if outcome != "ok" and peak > before and peak >= NEAR_LIMIT * limit:
            outcome, value = "memory", None
        try:
            connection.send((outcome, value, events))
        except MemoryError:
            connection.send(("memory", None, []))


def _outcome(
    function: Callable[..., Any], args: tuple[Any, ...], events: list[tuple[str, dict[str, Any]]]
) -> tuple[str, Any]:
    try:
        return "ok", function(*args)
    except ImagingError as exc:
        return "refused", str(exc)
    except MemoryError:
        return "memory", None
    except Exception as exc:  # a bug, not the image: say where, without the message
        where = [f"{Path(f.filename).name}:{f.lineno} {f.name}"
                 for f in traceback.extract_tb(exc.__traceback__)][-5:]
        events.append(("error", {"event": "imaging.decoder_error",
                                 "error": type(exc).__name__, "where": where}))
        return "failed", f"the decoder failed unexpectedly ({type(exc).__name__})"


def _address_space_peak() -> int:
    """The most address space this process has held so far (VmPeak), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmPeak:"):
            return int(line.split()[1]) * 1024
    return 0


def _die_with(parent: int) -> None:
    """Be killed when the node dies, even in the middle of a decode (PR_SET_PDEATHSIG).

    Linux sends the signal when the thread that started this process ends; in the node that is
    the queue stage's thread, which lives as long as the node.
    """
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the node died before the request was made
        os._exit(1)


if __name__ == "__main__":
    _fd, _memory_mb, _parent = (int(arg) for arg in sys.argv[1:4])
    _serve(Connection(_fd), _memory_mb, _parent)
