"""The node process: receiver processes on the DICOM port, one thread per pipeline stage.

Stages keep no state of their own between steps; each step reads the database, does one unit of
work and commits, so any stage can crash or the whole node can be killed and the next start goes on
from the last committed state.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import structlog

from cxr_node import audit, metrics
from cxr_node.admission import SHARED_INTS_PER_RECEIVER
from cxr_node.config import Config, ConfigError
from cxr_node.lifetime import die_with_parent, starter_env
from cxr_node.logs import configure_logging
from cxr_node.part10 import Limits
from cxr_node.spool import Spool
from cxr_node.store import Store

if TYPE_CHECKING:
    from cxr_node.feedback_hl7 import Hl7Listener
    from cxr_node.web import StatusServer

log = structlog.get_logger("cxr_node.node")


class Stage(Protocol):
    def step(self) -> int: ...


@runtime_checkable
class WorkerAware(Protocol):
    def requeue_running(self, reason: str) -> int: ...


@runtime_checkable
class Timed(Protocol):
    def seconds_until_due(self) -> float | None: ...


@runtime_checkable
class Draining(Protocol):
    def wait(self, timeout: float | None = None) -> bool: ...


class Wakeup:
    """A stage that moved work on wakes the others at once, instead of at their next poll."""

    def __init__(self) -> None:
        self._events: list[threading.Event] = []

    def subscribe(self) -> threading.Event:
        event = threading.Event()
        self._events.append(event)
        return event

    def notify(self) -> None:
        for event in self._events:
            event.set()


STAGE_BACKOFF_INITIAL_SECONDS = 0.05
STAGE_BACKOFF_MAX_SECONDS = 30.0
STAGE_FAILURE_SUMMARY_SECONDS = 60.0
"""A failing stage logs its first traceback, then one line with a count at most this often."""


class StageRunner(threading.Thread):
    """Runs one stage's ``step`` in a loop; an error is logged and the stage carries on.

    An idle stage waits for a wake-up, the poll interval, or a timer of its own running out
    (a study's settle time), whichever comes first. A stage whose step keeps raising (a full
    disk, a database it cannot write) waits longer after each failure, doubling up to
    ``STAGE_BACKOFF_MAX_SECONDS``, and is not woken by the other stages meanwhile; it logs the
    first failure with its traceback, then a ``stage.still_failing`` line with the count at most
    every ``STAGE_FAILURE_SUMMARY_SECONDS``, and ``stage.recovered`` when a step succeeds again.
    """

    def __init__(self, name: str, stage: Stage, interval: float, stopping: threading.Event,
                 wakeup: Wakeup):
        super().__init__(name=name, daemon=True)
        self.stage = stage
        self.interval = interval
        self.stopping = stopping
        self.wakeup = wakeup
        self.woken = wakeup.subscribe()
        self._failures = 0  # consecutive
        self._unreported = 0  # failures since the last line logged about them
        self._reported_at = 0.0

    def run(self) -> None:
        while not self.stopping.is_set():
            self.woken.clear()
            try:
                busy = self.stage.step()
            except Exception as exc:
                self._failed(exc)
                self.stopping.wait(self._backoff_seconds())
                continue
            if self._failures:
                log.warning("stage.recovered", stage=self.name, failures=self._failures)
                self._failures = self._unreported = 0
            if busy:
                self.wakeup.notify()
            else:
                self.woken.wait(self._idle_seconds())

    def _failed(self, exc: Exception) -> None:
        self._failures += 1
        self._unreported += 1
        now = time.monotonic()
        if self._failures == 1:
            log.exception("stage.error", stage=self.name)
        elif now - self._reported_at >= STAGE_FAILURE_SUMMARY_SECONDS:
            log.error("stage.still_failing", stage=self.name, failures=self._unreported,
                      consecutive=self._failures, retry_in=round(self._backoff_seconds(), 2),
                      error=f"{type(exc).__name__}: {exc}"[:300])
        else:
            return
        self._reported_at = now
        self._unreported = 0

    def _backoff_seconds(self) -> float:
        exponent = min(self._failures - 1, 32)
        return min(STAGE_BACKOFF_INITIAL_SECONDS * 2**exponent, STAGE_BACKOFF_MAX_SECONDS)

    def _idle_seconds(self) -> float:
        due = self.stage.seconds_until_due() if isinstance(self.stage, Timed) else None
        return self.interval if due is None else min(self.interval, max(due, 0.0))


def forward_arrivals(arrivals: Any, woken: threading.Event, stopping: threading.Event) -> None:
    """Wake the assemble stage when a receiver process has indexed an instance."""
    while not stopping.is_set():
        if arrivals.wait(0.5):
            arrivals.clear()  # before waking: an arrival after this sets it again
            woken.set()


@dataclass(frozen=True)
class ReceiverCounts:
    """Shared memory the receiver processes count admitted associations and pending connections
    in (admission.py), and the key that hashes peer addresses to pending slots."""

    admitted: Any
    pending: Any
    key: bytes


def receiver_main(config: Config, counts: ReceiverCounts, ready: Any, index: int,
                  arrivals: Any) -> None:
    """Entry point of one receiver process."""
    from cxr_node.admission import Admission, ConnectionGate
    from cxr_node.receive import Receiver
    from cxr_node.tls import server_context

    die_with_parent()
    configure_logging(config.logging.level, config.logging.phi)
    audit.open_trail(config.audit_path)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        ssl_context = server_context(config.node.tls)
    except ConfigError as exc:  # a TLS file missing or wrong: say which, not "cannot listen"
        ready.put((index, f"node.tls: {exc}"))
        return
    try:
        admission = Admission(config.node.max_associations, counts.admitted, index)
        gate = ConnectionGate(config.accept, config.node.max_pending_connections,
                              config.node.max_pending_per_source, counts.pending, index,
                              counts.key)
        receiver = Receiver(config, Store(config.database_path), admission, gate, ssl_context,
                            on_stored=arrivals.set)
    except OSError as exc:
        ready.put((index, f"cannot listen on {config.node.host}:{config.node.port}: {exc.strerror}"))
        return
    receiver.start()
    ready.put((index, None))
    stop.wait()
    receiver.stop(grace_seconds=config.node.network_timeout_seconds)


class Node:
    """Starts and stops everything `cxr-node serve` runs."""

    def __init__(self, config: Config, stages: list[tuple[str, Stage]]):
        self.config = config
        self.stages = stages
        self.stopping = threading.Event()
        self._mp = mp.get_context("spawn")
        self._ready = self._mp.Queue()
        self._arrivals = self._mp.Event()  # set by a receiver process for each new instance
        self._counts = ReceiverCounts(
            admitted=self._mp.Array("i", config.node.receivers),  # associations per receiver
            pending=self._mp.Array("i", config.node.receivers * SHARED_INTS_PER_RECEIVER),
            key=secrets.token_bytes(16))
        self.receivers: list[mp.process.BaseProcess] = []
        self.worker: subprocess.Popen[bytes] | None = None
        self.http: StatusServer | None = None
        self.hl7: Hl7Listener | None = None

    def run(self) -> int:
        signal.signal(signal.SIGTERM, lambda *_: self.stopping.set())
        signal.signal(signal.SIGINT, lambda *_: self.stopping.set())
        spool = Spool(self.config.spool_dir, self.config.quarantine_dir)
        removed = spool.remove_partial_files()
        if removed:
            log.warning("spool.partial_files_removed", count=removed)
        metrics.enable_multiprocess(self.config.state_dir)  # before any receiver is spawned
        audit.open_trail(self.config.audit_path)
        store = Store(self.config.database_path)
        try:  # before the port opens: no association can race it
            spool.reconcile(store, Limits.of(self.config.limits))
        finally:
            store.close()
        problem = self._start_receivers() or self._start_http() or self._start_hl7()
        if problem:
            log.error("node.start_failed", reason=problem)
            self._stop_receivers()
            return 1
        wakeup = Wakeup()
        runners = [StageRunner(name, stage, self.config.queue.poll_interval_seconds, self.stopping,
                               wakeup) for name, stage in self.stages]
        for runner in runners:
            runner.start()
        threading.Thread(target=forward_arrivals, name="arrivals", daemon=True,
                         args=(self._arrivals, runners[0].woken, self.stopping)).start()  # assemble
        log.info("node.ready", ae_title=self.config.node.ae_title, port=self.config.node.port,
                 receivers=len(self.receivers), stages=[name for name, _ in self.stages])
        while not self.stopping.wait(1.0):
            self._supervise()
        log.info("node.stopping")
        wakeup.notify()
        if self.http:
            self.http.stop()
        if self.hl7:
            self.hl7.stop()
        self._stop_receivers()
        self._stop_worker()
        for runner in runners:
            runner.join(timeout=30)
        self._finish_sends()
        log.info("node.stopped")
        return 0

    def _finish_sends(self) -> None:
        """Let a send in flight get its answer; one cut off is sent again at the next start."""
        timeouts = [getattr(d, "timeout_seconds", 0.0) for d in self.config.destinations]
        for _, stage in self.stages:
            if isinstance(stage, Draining):
                stage.wait(timeout=max(timeouts, default=0.0) + 5)

    def _start_receivers(self) -> str | None:
        for index in range(self.config.node.receivers):
            self._spawn_receiver(index)
        waiting = len(self.receivers)
        while waiting:
            try:
                _, problem = self._ready.get(timeout=0.5)
            except queue.Empty:
                dead = [p for p in self.receivers if not p.is_alive()]
                if dead:
                    return f"receiver process exited with code {dead[0].exitcode}"
                continue
            if problem:
                return problem
            waiting -= 1
        return None

    def _start_http(self) -> str | None:
        """/metrics, /healthz and the status page, on the loopback address by default."""
        if not self.config.http.enabled:
            return None
        from cxr_node.web import StatusServer

        try:
            self.http = StatusServer(self.config, self)
        except OSError as exc:
            http = self.config.http
            return f"cannot serve HTTP on {http.host}:{http.port}: {exc.strerror}"
        self.http.start()
        return None

    def _start_hl7(self) -> str | None:
        """The MLLP listener for signed reports, when ``feedback.hl7`` is configured."""
        settings = self.config.feedback.hl7
        if settings is None:
            return None
        from cxr_node.feedback_hl7 import Hl7Listener

        try:
            self.hl7 = Hl7Listener(self.config)
        except ConfigError as exc:  # a TLS file missing or wrong: say which
            return f"feedback.hl7.tls: {exc}"
        except OSError as exc:
            return (f"cannot listen on {settings.host}:{settings.port} (feedback.hl7): "
                    f"{exc.strerror}")
        self.hl7.start()
        return None

    def _spawn_receiver(self, index: int) -> None:
        proc = self._mp.Process(target=receiver_main, name=f"cxr-receiver-{index}",
                                args=(self.config, self._counts, self._ready, index,
                                      self._arrivals))
        proc.start()
        self.receivers.append(proc)

    def _supervise(self) -> None:
        """Restart a receiver process that died; start the local worker if it is not running."""
        for index, proc in enumerate(self.receivers):
            if not proc.is_alive():
                log.error("receiver.died", index=index, exitcode=proc.exitcode)
                metrics.process_exited(proc.pid)
                self.receivers.remove(proc)
                self._spawn_receiver(index)
                break
        if self.config.queue.runs_local_worker and (self.worker is None or self.worker.poll() is not None):
            if self.worker is not None:
                log.error("worker.died", exitcode=self.worker.returncode)
            self.worker = start_local_worker(self.config)
            # Whatever the previous local worker had started is lost with it.
            for _, stage in self.stages:
                if isinstance(stage, WorkerAware):
                    stage.requeue_running("the local worker stopped while drafting")

    def _stop_receivers(self) -> None:
        for proc in self.receivers:
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGTERM)
        for proc in self.receivers:
            proc.join(timeout=self.config.node.network_timeout_seconds + 5)
            if proc.is_alive():
                proc.kill()

    def _stop_worker(self) -> None:
        if self.worker is None or self.worker.poll() is not None:
            return
        self.worker.send_signal(signal.SIGTERM)  # Celery warm shutdown: finish the draft in hand
        try:
            self.worker.wait(timeout=self.config.queue.task_time_limit_seconds)
        except subprocess.TimeoutExpired:
            self.worker.kill()


def start_local_worker(config: Config) -> subprocess.Popen[bytes]:
    """The single-machine default: one worker process beside the node, same configuration.

    The worker asks for the parent-death signal itself (lifetime.py): no preexec_fn, which is
    unsafe while the stage threads run.
    """
    env = starter_env(dict(os.environ, CXR_NODE_CONFIG=str(config.source)))
    cmd = [sys.executable, "-m", "cxr_node", "worker", "--config", str(config.source)]
    log.info("worker.starting", local=True)
    return subprocess.Popen(cmd, env=env)


def build_stages(config: Config, store: Store) -> list[tuple[str, Stage]]:
    """The pipeline, in data-flow order."""
    from cxr_node.assemble import StudyAssembler
    from cxr_node.dispatch import Outbox
    from cxr_node.feedback import Feedback
    from cxr_node.queue import DraftQueue
    from cxr_node.report import Reporter
    from cxr_node.retention import Retention

    outbox = Outbox(config, store)
    return [
        ("assemble", StudyAssembler(config.study, store)),
        ("queue", DraftQueue(config, store)),
        ("report", Reporter(config, store, outbox)),
        ("dispatch", outbox),
        ("feedback", Feedback(config, store)),
        ("retention", Retention(config, store)),
    ]
