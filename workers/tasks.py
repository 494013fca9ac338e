"""The draft task, and the Celery worker that runs it (one process per GPU).

Importing this module costs no torch. The model is loaded once per worker child process, in the
background as the child starts, so it is warm by the first study. A missing model folder stops
`run_worker` before it consumes anything; a model that fails to load fails each task with the
loader's message (retrying cannot fix it).

The task never retries itself: a failure of any kind fails the task, and the node, which owns
the one retry policy (queue.max_attempts, queue.retry_delay_seconds), decides whether to submit
the study again. Each task carries an expiry (queue.start_timeout_seconds after it was sent): a
worker that receives it later discards it unrun, so an attempt the node has given up on never
starts beside the next one.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from celery import Task, shared_task, signals

from cxr_node.config import Config, default_config_path, load_config
from cxr_node.identity import check_pinned_identity
from cxr_node.lifetime import end_with_starter
from workers.app import make_celery, prune_embedded
from workers.payload import TASK_NAME

if TYPE_CHECKING:
    from workers.model import ReportModel

log = structlog.get_logger(__name__)

PRUNE_EVERY_SECONDS = 60.0

_config: Config | None = None
_model: ReportModel | None = None
_model_lock = threading.Lock()
_last_prune = 0.0


def worker_config() -> Config:
    """The configuration run_worker was given, else the file named by CXR_NODE_CONFIG."""
    global _config
    if _config is None:
        _config = load_config(default_config_path())
    return _config


def ensure_model_dir(config: Config) -> Path:
    """The model folder; the demo model is built there first when it is the default and absent."""
    path = config.model_path
    if config.model.path is None and not path.exists():
        from workers.demo import build_demo_model

        try:
            build_demo_model(path)
            log.info("demo model built", path=str(path))
        except FileExistsError:
            pass  # another worker built it meanwhile
    return path


def get_model() -> ReportModel:
    """The process's model, loaded on first use (later callers wait for the first load)."""
    global _model
    with _model_lock:
        if _model is None:
            from workers.model import load_model

            config = worker_config()
            _model = load_model(config.model, ensure_model_dir(config))
        return _model


def _preload_model(**_: Any) -> None:
    def load() -> None:
        try:
            get_model()
        except Exception as exc:  # the first task raises it again, with its own traceback
            log.error("model load failed", error=str(exc))

    threading.Thread(target=load, name="model-load", daemon=True).start()


@shared_task(name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=0)
def draft_report(self: Task, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Draft reports for a batch of DraftRequest dicts; one DraftResult dict per request, in order.

    Per-request problems come back as ok=false results. A transient failure (GPU out of memory:
    TransientDraftError) or a broken model folder (ModelLoadError) fails the whole task; the node
    decides whether the studies are submitted again.
    """
    config = worker_config()
    if not isinstance(requests, list) or not requests:
        raise ValueError(f"{TASK_NAME} takes a non-empty list of DraftRequest dicts")
    model = get_model()
    size = config.queue.batch_size  # a node with a larger batch is served in several generates
    started = time.perf_counter()
    try:
        results = [r for i in range(0, len(requests), size) for r in model.draft(requests[i : i + size])]
    finally:
        _maybe_prune(self, config)
    log.info(
        "draft task done",
        task_id=self.request.id,
        requests=len(requests),
        ok=sum(r["ok"] for r in results),
        seconds=round(time.perf_counter() - started, 3),
    )
    return results


def _maybe_prune(task: Task, config: Config) -> None:
    global _last_prune
    now = time.monotonic()
    if config.queue.embedded and now - _last_prune >= PRUNE_EVERY_SECONDS:
        _last_prune = now
        try:
            prune_embedded(task.app, config)
        except OSError as exc:
            log.warning("queue folder cleanup failed", error=str(exc))


def default_hostname() -> str:
    """cxr-draft-gpu<N>@<host> per GPU (from CUDA_VISIBLE_DEVICES), cxr-draft@<host> otherwise."""
    gpus = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    suffix = f"-gpu{gpus.replace(',', '-')}" if gpus else ""
    return f"cxr-draft{suffix}@{socket.gethostname()}"


def run_worker(config: Config, concurrency: int = 1, hostname: str | None = None) -> None:
    """Consume `config.queue.name` until told to stop (SIGTERM: finish the current draft first).

    Prefork pool, so the hard time limit can kill a stuck draft. One process per GPU: start one
    worker per GPU with CUDA_VISIBLE_DEVICES set; each process sees its GPU as cuda:0.
    """
    global _config
    end_with_starter()  # started by the node as its local worker: end with it
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    _config = config
    from workers.model import check_adapter_dir, check_model_dir  # before demo: sets offline mode

    check_model_dir(ensure_model_dir(config))  # fail at start, not at the first study
    if config.model.adapter is not None:
        check_adapter_dir(config.model.adapter)
    check_pinned_identity(config.model, config.model_path)  # the node would refuse every draft
    app = make_celery(config, role="worker")
    app.conf.worker_proc_alive_timeout = 60.0
    # Celery logs each task's return value at INFO: report text has no place in the logs.
    logging.getLogger("celery.app.trace").setLevel(logging.WARNING)
    signals.worker_process_init.connect(_preload_model, weak=False)
    name = hostname or default_hostname()
    log.info("worker starting", hostname=name, queue=config.queue.name, concurrency=concurrency)
    worker = app.Worker(
        hostname=name,
        queues=[config.queue.name],
        concurrency=concurrency,
        pool="prefork",
        loglevel=config.logging.level,
        quiet=True,
        redirect_stdouts=False,
        without_gossip=True,
        without_mingle=True,
        without_heartbeat=True,
        optimization="fair",
    )
    worker.start()
    if worker.exitcode:
        raise SystemExit(worker.exitcode)
