"""The node's stage threads and child processes: a stage that keeps failing backs off and logs
at a bounded rate; a process the node starts ends with it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import structlog

from cxr_node.lifetime import PARENT_PID_ENV
from cxr_node.node import StageRunner, Wakeup

REPO = Path(__file__).resolve().parents[1]


class Failing:
    """A stage whose step raises (a full disk, a database that cannot be written) until told."""

    def __init__(self, failures: int | None = None) -> None:
        self.steps = 0
        self.failures = failures  # None: forever

    def step(self) -> int:
        self.steps += 1
        if self.failures is None or self.steps <= self.failures:
            raise OSError(28, "No space left on device")
        return 0


def run_for(stage: Any, seconds: float, wakeup: Wakeup | None = None,
            busy_neighbour: bool = False) -> tuple[list[dict[str, Any]], float]:
    """Run ``stage`` in a StageRunner for ``seconds``; its log events and how long stopping took."""
    stopping, wakeup = threading.Event(), wakeup or Wakeup()
    with structlog.testing.capture_logs() as logs:
        runner = StageRunner("report", stage, interval=0.01, stopping=stopping, wakeup=wakeup)
        runner.start()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if busy_neighbour:
                wakeup.notify()  # another stage moving work on wakes everyone, all the time
            time.sleep(0.005)
        started = time.monotonic()
        stopping.set()
        runner.woken.set()
        runner.join(10)
        assert not runner.is_alive()
    return logs, time.monotonic() - started


def test_a_stage_that_always_fails_backs_off_and_logs_little() -> None:
    stage = Failing()
    logs, stop_seconds = run_for(stage, 2.0, busy_neighbour=True)
    # 0.05 s doubling: 0.05 + 0.1 + 0.2 + 0.4 + 0.8 = 1.55 s -> about 6 steps, not thousands
    assert 3 <= stage.steps <= 12, stage.steps
    errors = [e for e in logs if e["event"].startswith("stage.")]
    assert len(errors) <= 3, errors
    first = errors[0]
    assert first["event"] == "stage.error" and first["exc_info"]  # the traceback, once
    assert stop_seconds < 2  # a backing-off stage still stops at once


def test_repeated_failures_are_summarised_with_a_count(monkeypatch: pytest.MonkeyPatch) -> None:
    from cxr_node import node

    monkeypatch.setattr(node, "STAGE_FAILURE_SUMMARY_SECONDS", 0.5)
    monkeypatch.setattr(node, "STAGE_BACKOFF_MAX_SECONDS", 0.1)
    stage = Failing()
    logs, _ = run_for(stage, 1.6)
    summaries = [e for e in logs if e["event"] == "stage.still_failing"]
    assert 2 <= len(summaries) <= 4, summaries
    assert sum(e["failures"] for e in summaries) + 1 <= stage.steps
    assert "No space left on device" in summaries[-1]["error"]
    assert "exc_info" not in summaries[-1]


def test_a_stage_that_recovers_runs_at_full_speed_again() -> None:
    stage = Failing(failures=3)
    logs, _ = run_for(stage, 1.5)
    events = [e["event"] for e in logs if e["event"].startswith("stage.")]
    assert events[0] == "stage.error" and events[-1] == "stage.recovered"
    [recovered] = [e for e in logs if e["event"] == "stage.recovered"]
    assert recovered["failures"] == 3
    # after the recovery the stage polls every 10 ms again: many more steps than the 4 failures
    assert stage.steps > 20, stage.steps


# --- processes the node starts end with it -----------------------------------------------------

CHILD = ("import time; from cxr_node.lifetime import end_with_starter; "
         "end_with_starter(); print('ready', flush=True); time.sleep(120)")
MIDDLE = ("import os, subprocess, sys, time; from cxr_node.lifetime import starter_env; "
          f"child = subprocess.Popen([sys.executable, '-c', {CHILD!r}], "
          "env=starter_env(dict(os.environ)), stdout=sys.stdout); "
          "print(child.pid, flush=True); time.sleep(120)")


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def wait_until(condition: Any, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def test_a_child_ends_when_the_process_that_started_it_is_killed() -> None:
    middle = subprocess.Popen([sys.executable, "-c", MIDDLE], stdout=subprocess.PIPE, text=True,
                              cwd=REPO)
    try:
        child = int(middle.stdout.readline())
        assert middle.stdout.readline().strip() == "ready"
        assert alive(child)
        middle.kill()  # SIGKILL: no chance to stop its child itself
        middle.wait(10)
        assert wait_until(lambda: not alive(child), 10), "the child outlived its parent"
    finally:
        middle.kill()


def test_a_child_whose_starter_is_already_gone_stops_at_once() -> None:
    env = {**os.environ, PARENT_PID_ENV: "1"}  # not its parent: the starter died, it was adopted
    done = subprocess.run([sys.executable, "-c", CHILD], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == -signal.SIGTERM and "ready" not in done.stdout


def test_the_local_worker_is_started_without_a_preexec_fn(monkeypatch: pytest.MonkeyPatch,
                                                         tmp_path: Path) -> None:
    """preexec_fn runs Python between fork and exec: unsafe while the stage threads run."""
    from cxr_node import node
    from cxr_node.config import Config

    started: list[dict[str, Any]] = []
    monkeypatch.setattr(node.subprocess, "Popen", lambda cmd, **kw: started.append(kw))
    node.start_local_worker(Config.model_validate(
        {"node": {"state_dir": str(tmp_path)}, "source": tmp_path / "cxr-node.yaml"}))
    [kwargs] = started
    assert kwargs.get("preexec_fn") is None
    assert kwargs["env"][PARENT_PID_ENV] == str(os.getpid())
