"""One retry policy for drafting, owned by the node, against a real Celery worker.

The worker runs the real draft task in a thread (celery.contrib.testing.worker) on the embedded
broker; only the model is replaced, by one that records each run and always fails the way a GPU
out of memory does. Two pool threads, so two runs of one study could overlap if the node ever
submitted again while an attempt might still run.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from celery.contrib.testing.worker import start_worker
from dicomgen import write_study

import workers.tasks
from cxr_node.config import Config, ConfigError, load_config
from cxr_node.queue import DraftQueue
from cxr_node.store import InstanceRecord, Store, StudyState
from workers.app import make_celery
from workers.payload import TransientDraftError


class RecordingModel:
    """Stands in for the GPU model: records when each run starts and ends, then fails."""

    def __init__(self, seconds: float = 0.3) -> None:
        self.seconds = seconds
        self.runs: list[tuple[float, float, list[str]]] = []
        self.lock = threading.Lock()

    def draft(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        started = time.monotonic()
        time.sleep(self.seconds)
        with self.lock:
            self.runs.append((started, time.monotonic(), [r["request_id"] for r in requests]))
        raise TransientDraftError(f"GPU out of memory drafting a batch of {len(requests)}")


def node_config(tmp_path: Path, **queue: Any) -> Config:
    return Config.model_validate({
        "node": {"state_dir": str(tmp_path / "state")},
        "queue": {"local_worker": False, "max_attempts": 3, "poll_interval_seconds": 0.05,
                  **queue},
    })


def stable_study(store: Store, folder: Path) -> str:
    folder.mkdir(exist_ok=True)
    [path] = write_study(folder, ["PA"], rows=128, columns=128)
    ds = pydicom.dcmread(path)
    store.record_instance(InstanceRecord(
        ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPClassUID,
        "1.2.840.10008.1.2.1", "CR", "CHEST", "PA", "PA", 1, str(path), path.stat().st_size,
        "MODALITY", "127.0.0.1"), same_content=lambda _: False)
    assert store.move(store.study(ds.StudyInstanceUID), StudyState.STABLE, "test")
    return ds.StudyInstanceUID


@pytest.fixture
def model(monkeypatch: pytest.MonkeyPatch) -> RecordingModel:
    fake = RecordingModel()
    monkeypatch.setattr(workers.tasks, "get_model", lambda: fake)
    return fake


@pytest.fixture
def worker_for(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Start a worker thread (two pool threads) serving ``config``'s queue."""
    started: list[Any] = []

    def start(config: Config) -> Any:
        monkeypatch.setattr(workers.tasks, "_config", config)
        app = make_celery(config)
        context = start_worker(app, pool="threads", concurrency=2, perform_ping_check=False,
                               queues=[config.queue.name], loglevel="WARNING")
        context.__enter__()
        started.append(context)
        return app

    yield start
    for context in started:
        context.__exit__(None, None, None)


def run_until_settled(queue: DraftQueue, store: Store, uid: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and store.study(uid).state != StudyState.FAILED:
        queue.step()
        time.sleep(0.02)


def test_a_draft_that_always_fails_runs_exactly_max_attempts_times_one_at_a_time(
    tmp_path: Path, model: RecordingModel, worker_for: Any
) -> None:
    config = node_config(tmp_path, retry_delay_seconds=0.2)
    store = Store(config.database_path)
    uid = stable_study(store, tmp_path / "images")
    queue = DraftQueue(config, store, app=worker_for(config))
    run_until_settled(queue, store, uid, 60)
    time.sleep(1.0)  # a retry the worker scheduled on its own would show up here
    study = store.study(uid)
    assert study.state == StudyState.FAILED, study
    assert len(model.runs) == config.queue.max_attempts, model.runs
    runs = sorted(model.runs)
    for (_, ended, _), (started, _, _) in zip(runs, runs[1:], strict=False):
        assert ended <= started, "two runs of one study at once"
    assert "GPU out of memory" in study.reason and "gave up after 3 attempts" in study.reason
    jobs = store.db.execute("SELECT attempt, state FROM jobs ORDER BY id").fetchall()
    assert [(j["attempt"], j["state"]) for j in jobs] == [(1, "lost"), (2, "lost"), (3, "lost")]


def test_a_task_no_worker_started_in_time_is_discarded_and_submitted_again(
    tmp_path: Path, model: RecordingModel, worker_for: Any
) -> None:
    """The first message waits past its start timeout: the worker drops it, never runs it."""
    config = node_config(tmp_path, start_timeout_seconds=1, max_attempts=2,
                         retry_delay_seconds=0)
    store = Store(config.database_path)
    uid = stable_study(store, tmp_path / "images")
    queue = DraftQueue(config, store)
    queue.step()
    [first] = store.db.execute("SELECT * FROM jobs").fetchall()
    time.sleep(1.5)  # no worker yet: the task expires in the queue
    queue = DraftQueue(config, store, app=worker_for(config))
    run_until_settled(queue, store, uid, 30)
    jobs = store.db.execute("SELECT * FROM jobs ORDER BY id").fetchall()
    assert [j["attempt"] for j in jobs] == [1, 2]
    assert "could not start within 1 s of being sent" in jobs[0]["reason"]
    assert [run[2] for run in model.runs] == [[f"job-{jobs[1]['id']}"]]  # attempt 1 never ran
    assert first["task_id"] != jobs[1]["task_id"]


def test_the_result_timeout_outlasts_any_run_that_may_still_start(tmp_path: Path) -> None:
    """Waiting in the queue + running to the hard limit: only then is a task given up for lost."""
    config = node_config(tmp_path, task_time_limit_seconds=600, start_timeout_seconds=300)
    assert config.queue.effective_result_timeout >= 300 + 600
    path = tmp_path / "cxr-node.yaml"
    path.write_text(f"node: {{state_dir: {tmp_path}}}\nqueue:\n  task_time_limit_seconds: 600\n"
                    "  result_timeout_seconds: 620\n")
    with pytest.raises(ConfigError) as refused:
        load_config(path)
    message = str(refused.value)
    assert "result_timeout_seconds" in message and "start_timeout_seconds" in message


def test_the_task_itself_never_retries(tmp_path: Path) -> None:
    config = node_config(tmp_path, max_attempts=5)
    task = make_celery(config).tasks[workers.tasks.TASK_NAME]
    assert not getattr(task, "autoretry_for", ())
    assert task.max_retries in (0, None)
