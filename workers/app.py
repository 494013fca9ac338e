"""The Celery application shared by the node (which sends drafts) and the workers (which run them).

No torch here: the node imports this module. Two brokers, chosen by `queue.broker`:

- "embedded": kombu's filesystem transport in folders under `<state_dir>/queue` and Celery's
  file:// result backend, so one machine needs no server. Both write files in place in kombu 5.7 /
  celery 5.7 (a reader can see half a message or half a result); the subclasses below write to a
  temporary name and rename, so a reader sees all of a file or nothing.
- "redis://..." or "rediss://..." (TLS, queue.tls): Redis for broker and results. The node and
  the workers log in as different ACL users, each with its own password (systemd credential or
  environment, never YAML); remote control is off, so the broker carries drafts and nothing else.

Reliability: late acks + reject on worker loss + prefetch 1, so a draft whose worker stops before
starting it is delivered again; with Redis the visibility timeout is longer than the task time
limit (config enforces it), so a slow draft is not handed to a second worker. Retries belong to
the node alone (cxr_node/queue.py): the task never retries itself, and every task expires
`queue.start_timeout_seconds` after it was sent, so a copy delivered again later (its worker
killed mid-draft) is discarded unrun rather than run beside the node's next attempt. The
filesystem transport keeps an unacked message in the worker's memory (it is put back on a clean
shutdown, not after a kill -9): the node's result timeout re-queues that study.
"""

from __future__ import annotations

import errno
import os
import ssl
import stat
import time
import uuid
from pathlib import Path
from typing import Literal
from urllib.parse import quote, urlsplit, urlunsplit

from celery import Celery
from celery.backends.filesystem import FilesystemBackend
from kombu.transport import filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps

from cxr_node.config import Config, broker_password
from workers.payload import TASK_NAME

RESULT_EXPIRES_SECONDS = 24 * 3600
MAX_RESULT_BYTES = 16 * 1024 * 1024
"""Largest result file the node reads: a batch of drafts is kilobytes."""
EMBEDDED_PICKUP_SECONDS = 0.02
Role = Literal["node", "worker"]
"""How often a worker on the embedded broker looks for a task (a folder listing: cheap)."""


def _write_atomically(path: str, data: bytes) -> None:
    """Write `data` under a hidden name in the same folder, then rename it to `path` (0600)."""
    folder, name = os.path.split(path)
    temporary = os.path.join(folder, f".tmp-{uuid.uuid4().hex}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


class AtomicFilesystemChannel(filesystem.Channel):
    """kombu's filesystem channel, but a message file appears whole or not at all.

    Stock `_put` creates the final file name and then writes: a consumer polling the folder can
    move and read it in between and get half a JSON document. Hidden temporary names never match
    a queue (`<time>_<uuid>.<queue>.msg`), so consumers skip them until the rename.
    """

    def _put(self, queue: str, payload: dict, **kwargs: object) -> None:
        name = f"{int(round(time.monotonic() * 1000))}_{uuid.uuid4()}.{queue}.msg"
        try:
            _write_atomically(os.path.join(self.data_folder_out, name), str_to_bytes(dumps(payload)))
        except OSError as exc:
            raise filesystem.ChannelError(f"Cannot add file {name!r} to the queue folder") from exc


class AtomicFilesystemTransport(filesystem.Transport):
    Channel = AtomicFilesystemChannel


class AtomicFilesystemBackend(FilesystemBackend):
    """Celery's file:// result backend, writing each result file atomically with mode 0600, and
    reading only what a worker's answer can be: a regular file of at most MAX_RESULT_BYTES (a
    FIFO, a link or a giant file in the results folder is refused, never waited on or read)."""

    def set(self, key: bytes, value: bytes | str) -> None:
        path = self._filename(key)
        _write_atomically(os.fsdecode(path), value if isinstance(value, bytes) else value.encode())

    def get(self, key: bytes) -> bytes | None:
        try:
            fd = os.open(self._filename(key), os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise ValueError("the result is a symbolic link") from None
            raise
        with os.fdopen(fd, "rb") as infile:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ValueError("the result is not a regular file")
            data = infile.read(MAX_RESULT_BYTES + 1)
        if len(data) > MAX_RESULT_BYTES:
            raise ValueError(f"the result file is larger than {MAX_RESULT_BYTES} bytes")
        return data


def queue_folders(config: Config) -> dict[str, Path]:
    """The embedded broker's folders under the state directory (absolute: node and worker may
    run from different working directories)."""
    root = Path(os.path.abspath(config.queue_dir))
    return {
        "messages": root / "messages",
        "processed": root / "processed",
        "control": root / "control",
        "results": root / "results",
    }


def _private_dirs(paths: list[Path]) -> None:
    """Create (or tighten) folders to 0700: queued messages and results hold pixels and text."""
    for path in paths:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.chmod(0o700)


def redis_url(config: Config, role: Role = "node") -> str:
    """The configured Redis URL with the role's ACL user and password (never in YAML) put in."""
    q = config.queue
    parts = urlsplit(q.broker)
    host = parts.hostname or "localhost"
    if ":" in host:
        host = f"[{host}]"
    user = q.username if role == "node" else q.worker_username
    password = broker_password(role)
    userinfo = quote(user or "", safe="") + (f":{quote(password, safe='')}" if password else "")
    netloc = f"{userinfo}@{host}" if userinfo else host
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def redis_tls(config: Config) -> dict[str, object] | None:
    """redis-py TLS settings: the server's certificate checked against our CA and its name."""
    tls = config.queue.tls
    if tls is None:
        return None
    settings: dict[str, object] = {
        "ssl_cert_reqs": ssl.CERT_REQUIRED,
        "ssl_check_hostname": True,
        "ssl_ca_certs": str(tls.ca_certificates),
        "ssl_min_version": ssl.TLSVersion.TLSv1_2,
    }
    if tls.certificate is not None:
        settings.update(ssl_certfile=str(tls.certificate), ssl_keyfile=str(tls.private_key))
    return settings


def soft_time_limit(hard_limit: int) -> int:
    """A little below the hard limit, so a slow draft fails with an error instead of a kill."""
    return max(hard_limit - max(5, hard_limit // 10), hard_limit // 2)


def make_celery(config: Config, role: Role = "node") -> Celery:
    """The Celery app for `config`; importing it costs no torch, so the node can send tasks.

    ``role`` chooses the Redis user and password: the node's, or the workers'.
    """
    q = config.queue
    app = Celery("cxr-node", set_as_current=False)
    settings: dict[str, object] = {}
    if q.embedded:
        folders = queue_folders(config)
        _private_dirs([folders["messages"].parent, *folders.values()])
        settings.update(
            broker_url="filesystem://localhost//",  # the host is a placeholder kombu logs about if absent
            broker_transport=f"{__name__}:AtomicFilesystemTransport",
            broker_transport_options={
                # One folder both ways: the node and the worker put into and take from the same one.
                "data_folder_in": str(folders["messages"]),
                "data_folder_out": str(folders["messages"]),
                "store_processed": True,  # taken messages go to our 0700 folder, not /tmp
                "processed_folder": str(folders["processed"]),
                "control_folder": str(folders["control"]),
                "polling_interval": min(q.poll_interval_seconds, EMBEDDED_PICKUP_SECONDS),
            },
            result_backend=f"{__name__}:AtomicFilesystemBackend+file://{folders['results']}",
        )
    else:
        url = redis_url(config, role)
        settings.update(
            broker_url=url,
            broker_transport_options={"visibility_timeout": q.visibility_timeout_seconds},
            result_backend=url,
            broker_use_ssl=redis_tls(config),
            redis_backend_use_ssl=redis_tls(config),
        )
    settings.update(
        task_routes={TASK_NAME: {"queue": q.name}},
        task_default_queue=q.name,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_time_limit=q.task_time_limit_seconds,
        task_soft_time_limit=soft_time_limit(q.task_time_limit_seconds),
        task_track_started=True,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        result_expires=RESULT_EXPIRES_SECONDS,
        broker_connection_retry_on_startup=True,
        # A draft running when the broker connection drops will be redelivered (late ack):
        # stop it rather than finish it twice.
        worker_cancel_long_running_tasks_on_connection_loss=True,
        # No remote control: anyone who can publish to the broker could otherwise tell workers
        # to shut down, change rate limits or revoke tasks (and with the embedded broker a killed
        # worker's fanout binding would pile up files nobody reads).
        worker_enable_remote_control=False,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
    )
    app.conf.update(settings)
    return app


def prune_embedded(app: Celery, config: Config, older_than_seconds: float = 600.0) -> int:
    """Delete what the embedded broker leaves behind; returns the number of files removed.

    Taken messages are kept in the private processed folder (not /tmp) and hold pixels; a crash
    mid-write can leave a hidden temporary file; results past `result_expires` are never read.
    The age is the file's ctime, which a rename into the processed folder resets.
    """
    if not config.queue.embedded:
        return 0
    folders = queue_folders(config)
    cutoff = time.time() - older_than_seconds
    removed = 0
    candidates = [
        *os.scandir(folders["processed"]),
        *(e for name in ("messages", "results") for e in os.scandir(folders[name]) if e.name.startswith(".tmp-")),
    ]
    for entry in candidates:
        try:
            if entry.is_file(follow_symlinks=False) and entry.stat().st_ctime < cutoff:
                os.unlink(entry.path)
                removed += 1
        except FileNotFoundError:
            continue
    app.backend.cleanup()
    return removed
