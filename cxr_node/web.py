"""The node's HTTP endpoint: /metrics, /healthz and a read-only status page (/ and /api/status).

It binds to ``http.host`` only (127.0.0.1 by default) and has no login: it shows study keys,
states, timings and reasons, never patient names or IDs, and nothing it serves changes anything.
The page is plain HTML, CSS and JavaScript from this package (no CDN: it works offline) and puts
every text into the page as text, never as markup, since a reason can contain anything.

Health is a handful of independent checks run in parallel, each bounded by a timeout, so /healthz
answers within ``CHECK_TIMEOUT_SECONDS`` whatever hangs: the state database can be written, the
spool disk has room, the broker answers, every receiver process runs and holds its listening
socket, and the local worker (if this node runs one) is alive.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import structlog

from cxr_node import __version__
from cxr_node.config import Config
from cxr_node.durable import free_mb
from cxr_node.feedback import snapshot as feedback_snapshot
from cxr_node.logs import study_key
from cxr_node.metrics import JOB_STATES, StateCollector, exposition, scrape_registry
from cxr_node.store import Store, StudyState

log = structlog.get_logger("cxr_node.web")

CHECK_TIMEOUT_SECONDS = 2.0
REFRESH_SECONDS = 3
RECENT_STUDIES = 50
OUTBOX_FAILURES = 50
STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/status.css": ("status.css", "text/css; charset=utf-8"),
    "/status.js": ("status.js", "text/javascript; charset=utf-8"),
}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "connect-src 'self'; img-src 'self'; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class Unhealthy(Exception):
    """A check failed; the message says what is wrong, for the person on call."""


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


class Processes(Protocol):
    """What the health check needs from the node: its receiver and worker processes."""

    receivers: list[BaseProcess]
    worker: subprocess.Popen[bytes] | None


class HealthChecks:
    """The checks behind /healthz and the status page, each run in its own bounded thread."""

    def __init__(self, config: Config, processes: Processes):
        self.config = config
        self.processes = processes

    def checks(self) -> dict[str, Callable[[], str]]:
        named: dict[str, Callable[[], str]] = {
            "database": self.database, "disk": self.disk, "broker": self.broker,
            "receivers": self.receivers,
        }
        if self.config.queue.runs_local_worker:
            named["worker"] = self.worker
        return named

    def run(self) -> list[Check]:
        checks = self.checks()
        results: dict[str, Check] = {}

        def one(name: str, check: Callable[[], str]) -> None:
            try:
                results[name] = Check(name, True, check())
            except Unhealthy as exc:
                results[name] = Check(name, False, str(exc))
            except Exception as exc:  # a check's own bug must read as failing, not crash /healthz
                results[name] = Check(name, False, f"check error: {type(exc).__name__}: {exc}")

        threads = [threading.Thread(target=one, args=item, name=f"healthz-{item[0]}", daemon=True)
                   for item in checks.items()]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + CHECK_TIMEOUT_SECONDS
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return [results.get(name) or Check(name, False,
                                            f"no answer within {CHECK_TIMEOUT_SECONDS:g} s")
                for name in checks]

    def database(self) -> str:
        """Readable, and the write lock can be taken (then released unused)."""
        uri = f"{self.config.database_path.resolve().as_uri()}?mode=rw"
        try:
            conn = sqlite3.connect(uri, uri=True, timeout=CHECK_TIMEOUT_SECONDS * 0.75,
                                   isolation_level=None)
            try:
                conn.execute("SELECT 1 FROM studies LIMIT 1").fetchall()
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("ROLLBACK")
            finally:
                conn.close()
        except sqlite3.Error as exc:
            raise Unhealthy(f"state database {self.config.database_path.name}: {exc}") from None
        return "read and write lock ok"

    def disk(self) -> str:
        free = free_mb(self.config.spool_dir)
        need = self.config.node.min_free_disk_mb
        if free < need:
            raise Unhealthy(f"{free:.0f} MiB free for the spool, below node.min_free_disk_mb "
                            f"({need} MiB): C-STORE answers out of resources")
        return f"{free:.0f} MiB free"

    def broker(self) -> str:
        if self.config.queue.embedded:
            from workers.app import queue_folders

            folder = queue_folders(self.config)["messages"]
            probe = folder / f".tmp-healthz-{os.getpid()}-{threading.get_ident()}"
            try:
                os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
                probe.unlink()
            except OSError as exc:
                raise Unhealthy(f"embedded queue folder not writable: {exc.strerror}") from None
            return "embedded queue folder writable"
        import redis

        from workers.app import redis_tls, redis_url

        where = urlsplit(self.config.queue.broker).netloc
        timeout = CHECK_TIMEOUT_SECONDS * 0.75
        client = redis.Redis.from_url(redis_url(self.config), socket_timeout=timeout,
                                      socket_connect_timeout=timeout,
                                      **(redis_tls(self.config) or {}))
        try:
            client.ping()
        except redis.RedisError as exc:
            raise Unhealthy(f"Redis at {where} does not answer: {type(exc).__name__}: "
                            f"{str(exc)[:200]}") from None
        finally:
            client.close()
        return f"Redis at {where} answers"

    def receivers(self) -> str:
        """Every receiver process runs and holds a socket listening on the DICOM port."""
        port = self.config.node.port
        procs = list(self.processes.receivers)
        listening = listening_sockets(port)
        problems = []
        for proc in procs:
            if not proc.is_alive():
                problems.append(f"{proc.name} is not running (exit code {proc.exitcode})")
            elif proc.pid is None or not holds_socket(proc.pid, listening):
                problems.append(f"{proc.name} (pid {proc.pid}) is not listening on port {port}")
        missing = self.config.node.receivers - len(procs)
        if missing > 0:
            problems.append(f"{missing} of {self.config.node.receivers} receivers not started")
        if problems:
            raise Unhealthy("; ".join(problems))
        return f"{len(procs)} listening on port {port}"

    def worker(self) -> str:
        worker = self.processes.worker
        if worker is None:
            raise Unhealthy("the local worker has not started")
        code = worker.poll()
        if code is not None:
            raise Unhealthy(f"the local worker exited with code {code}")
        return f"local worker running (pid {worker.pid})"


def listening_sockets(port: int) -> set[str]:
    """Inodes of the TCP sockets listening on ``port`` in this network namespace (Linux)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # LISTEN
                inodes.add(fields[9])
    return inodes


def holds_socket(pid: int, inodes: set[str]) -> bool:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in inodes:
            return True
    return False


# --- the status page's data ----------------------------------------------------------------------

MILESTONES = ("stable", "drafted", "sent")
STUDIES_SQL = f"""
SELECT s.study_key, s.state, s.revision, s.reason, s.revision_started_at,
       (SELECT COUNT(DISTINCT sop_instance_uid) FROM instances i
         WHERE i.study_uid = s.study_uid) AS images,
       {", ".join(f'''(SELECT MAX(at) FROM transitions t WHERE t.study_uid = s.study_uid
         AND t.revision = s.revision AND t.state = '{m}') AS {m}_at''' for m in MILESTONES)}
FROM studies s ORDER BY s.last_received_at DESC LIMIT ?
"""
OUTBOX_SQL = """
SELECT o.id, s.study_key, o.study_uid, o.destination, o.state, o.attempts, o.next_attempt_at,
       o.last_status, o.reason, o.updated_at
FROM outbox o LEFT JOIN studies s ON s.study_uid = o.study_uid
WHERE o.state = 'dead' OR (o.state IN ('pending', 'sending') AND o.attempts > 0)
ORDER BY o.updated_at DESC LIMIT ?
"""
OUTBOX_COUNTS_SQL = """
SELECT COALESCE(SUM(state = 'dead'), 0) AS dead, COALESCE(SUM(state != 'dead'), 0) AS retrying
FROM outbox WHERE state = 'dead' OR (state IN ('pending', 'sending') AND attempts > 0)
"""


def status_snapshot(config: Config, store: Store, health: list[Check]) -> dict[str, Any]:
    """Everything the status page shows, as JSON-ready data without patient identifiers."""
    db = store.db
    counts = store.counts_by_state()
    jobs = dict(db.execute(
        f"SELECT state, COUNT(*) FROM jobs WHERE state IN {JOB_STATES} GROUP BY state").fetchall())
    studies = [
        {"study": r["study_key"], "state": r["state"], "revision": r["revision"],
         "images": r["images"], "reason": r["reason"], "received_at": r["revision_started_at"],
         **{f"{m}_at": r[f"{m}_at"] for m in MILESTONES}}
        for r in db.execute(STUDIES_SQL, (RECENT_STUDIES,))
    ]
    outbox = [
        {"id": r["id"], "study": r["study_key"] or study_key(r["study_uid"]),
         "destination": r["destination"], "state": r["state"], "attempts": r["attempts"],
         "next_attempt_at": r["next_attempt_at"] if r["state"] == "pending" else None,
         "status": r["last_status"], "reason": r["reason"], "updated_at": r["updated_at"]}
        for r in db.execute(OUTBOX_SQL, (OUTBOX_FAILURES,))
    ]
    return {
        "node": {"ae_title": config.node.ae_title, "dicom_port": config.node.port,
                 "version": __version__, "now": time.time(), "refresh_seconds": REFRESH_SECONDS,
                 "destinations": [d.name for d in config.destinations]},
        "health": {"ok": all(c.ok for c in health), "checks": [asdict(c) for c in health]},
        "counts": {s.value: counts.get(s.value, 0) for s in StudyState},
        "queue": {s: jobs.get(s, 0) for s in JOB_STATES},
        "outbox_counts": dict(db.execute(OUTBOX_COUNTS_SQL).fetchone()),
        "studies": studies,
        "outbox": outbox,
        "feedback": feedback_snapshot(store, config.feedback),
    }


# --- the server ----------------------------------------------------------------------------------


class StatusServer(ThreadingHTTPServer):
    """The loopback HTTP server; ``start`` serves on a thread, ``stop`` ends it."""

    daemon_threads = True

    def __init__(self, config: Config, processes: Processes):
        host, port = config.http.host, config.http.port
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, port), _Handler)
        self.config = config
        self.store = Store(config.database_path, timeout=CHECK_TIMEOUT_SECONDS)
        self.health = HealthChecks(config, processes)
        self.registry = scrape_registry(config.state_dir, StateCollector(config, self.store))
        web = resources.files("cxr_node") / "web"
        self.static = {path: (web.joinpath(name).read_bytes(), kind)
                       for path, (name, kind) in STATIC.items()}
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def start(self) -> None:
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="http", daemon=True)
        self._thread.start()
        log.info("http.listening", host=self.config.http.host, port=self.port)

    def stop(self) -> None:
        self.shutdown()
        self.server_close()

    # routes: each answers (status, content type, body)

    def metrics(self) -> tuple[int, str, bytes]:
        body, kind = exposition(self.registry)
        return 200, kind, body

    def healthz(self) -> tuple[int, str, bytes]:
        checks = self.health.run()
        failing = [c.name for c in checks if not c.ok]
        body = {"status": "failing" if failing else "ok", "failing": failing,
                "checks": {c.name: {"ok": c.ok, "detail": c.detail} for c in checks}}
        return 503 if failing else 200, "application/json", _json(body)

    def api_status(self) -> tuple[int, str, bytes]:
        return 200, "application/json", _json(status_snapshot(self.config, self.store,
                                                              self.health.run()))

    def allows_host(self, header: str | None) -> bool:
        """Whether a request's Host names this endpoint: its address, localhost on loopback, or
        a name in ``http.allowed_hosts``. A request without Host (HTTP/1.0 tools) is no browser."""
        if header is None:
            return True
        host = header.strip().lower()
        if host.startswith("["):  # [v6 address]:port
            host, _, rest = host[1:].partition("]")
            port = rest.removeprefix(":")
        else:
            host, _, port = host.rpartition(":") if host.count(":") == 1 else (host, "", "")
        if port and port != str(self.port):
            return False
        own = self.config.http.host.lower()
        names = {own, *self.config.http.allowed_hosts}
        try:
            loopback = ipaddress.ip_address(own).is_loopback
        except ValueError:
            loopback = own == "localhost"
        if loopback:
            names |= {"localhost", "127.0.0.1", "::1"}
        return host in names

    def route(self, path: str) -> tuple[int, str, bytes]:
        routes = {"/metrics": self.metrics, "/healthz": self.healthz,
                  "/api/status": self.api_status}
        if path in routes:
            return routes[path]()
        if path in self.static:
            body, kind = self.static[path]
            return 200, kind, body
        return 404, "text/plain; charset=utf-8", b"not found\n"


class _Handler(BaseHTTPRequestHandler):
    server: StatusServer
    server_version = "cxr-node"
    sys_version = ""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = urlsplit(self.path).path
        if not self.server.allows_host(self.headers.get("Host")):
            # DNS rebinding: a web page whose name resolves to this machine must not read it
            status, kind, body = 421, "text/plain; charset=utf-8", b"unknown host name\n"
        else:
            try:
                status, kind, body = self.server.route(path)
            except Exception:
                log.exception("http.error", path=path[:200])
                status, kind, body = 500, "text/plain; charset=utf-8", b"internal error\n"
            finally:
                self.server.store.close()  # this request thread's connection
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        for name, value in SECURITY_HEADERS.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Requests are not logged: a scraper every few seconds would drown the node's log."""


def _json(data: Any) -> bytes:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()
