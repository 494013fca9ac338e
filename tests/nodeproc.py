"""Run the real node as a subprocess and talk to it with the real dcmtk tools."""

from __future__ import annotations

import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pydicom
import yaml

STORESCU = "/usr/bin/storescu"
# The demo model on the CPU, quick; its random weights repeat words unless told not to.
DEMO_MODEL = {"device": "cpu", "quantization": "none", "image_size": 256,
              "generation": {"max_new_tokens": 24, "no_repeat_ngram_size": 1}}

# storescu's option that proposes each transfer syntax (it proposes uncompressed ones by default).
PROPOSE = {
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.5": "-xr",
    "1.2.840.10008.1.2.1.99": "-xd",
}


def accepts(port: int, timeout: float = 1.0) -> bool:
    """Whether something listens on 127.0.0.1:``port`` (of the caller's network namespace)."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=timeout).close()
        return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(directory: Path, **sections: Any) -> Path:
    """A node configuration under ``directory``; ``sections`` are merged over the test default."""
    config: dict[str, Any] = {
        "node": {"state_dir": str(directory / "state"), "port": free_port(),
                 "min_free_disk_mb": 1, "receivers": 2, "acse_timeout_seconds": 5},
        "accept": [{"ae_title": "*", "network": "127.0.0.1/32"}],
        "study": {"settle_seconds": 1, "max_wait_seconds": 60},
        "queue": {"local_worker": False},
        "http": {"enabled": False},
    }
    for name, value in sections.items():
        if isinstance(value, dict) and isinstance(config.get(name), dict):
            config[name] = {**config[name], **value}
        else:
            config[name] = value
    path = directory / "cxr-node.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


class NodeProcess:
    """`cxr-node serve` in its own process group, with its JSON log captured to a file."""

    def __init__(self, config_path: Path, env: dict[str, str] | None = None,
                 netns: str | None = None):
        self.config_path = config_path
        self.netns = netns
        self.config = yaml.safe_load(config_path.read_text())
        self.port = self.config["node"]["port"]
        self.state_dir = Path(self.config["node"]["state_dir"])
        self.log_path = config_path.parent / f"node-{int(time.time() * 1000)}.log"
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> NodeProcess:
        serve = [sys.executable, "-m", "cxr_node", "serve", "--config", str(self.config_path)]
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                in_netns(self.netns, serve),
                stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True,
            )
        if not wait_for(lambda: "node.ready" in self.log() or self.proc.poll() is not None,
                        timeout):
            raise TimeoutError(f"node did not start:\n{self.log()}")
        if self.proc.poll() is not None:
            raise RuntimeError(f"node exited with {self.proc.returncode}:\n{self.log()}")
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def db(self, sql: str, *args: object) -> list[sqlite3.Row]:
        """Rows from the node's state database (read while the node runs, or after)."""
        conn = sqlite3.connect(self.state_dir / "cxr-node.sqlite3")
        conn.row_factory = sqlite3.Row
        try:
            return conn.execute(sql, args).fetchall()
        finally:
            conn.close()

    def states(self) -> list[str]:
        return [r["state"] for r in self.db("SELECT state FROM studies ORDER BY first_received_at")]

    def events(self, name: str) -> list[dict[str, Any]]:
        import json

        out = []
        for line in self.log().splitlines():
            if f'"{name}"' in line:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
        return [e for e in out if e.get("event") == name]

    def receiver_pids(self) -> set[int]:
        """The node's receiver processes (multiprocessing spawn children), from /proc."""
        pids = set()
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
                cmdline = (stat.parent / "cmdline").read_bytes()
            except (OSError, IndexError, ValueError):
                continue
            if self.proc and parent == self.proc.pid and b"spawn_main" in cmdline:
                pids.add(int(stat.parent.name))
        return pids

    def stop(self, timeout: float = 60) -> int:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode if self.proc else 0

    def kill(self) -> None:
        """SIGKILL the node and every process it started, as a power cut of the service would."""
        if self.proc:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()

    def __enter__(self) -> NodeProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.kill()


def memory_mib(pid: int, field: str = "VmRSS") -> float:
    """A process's memory from /proc (VmRSS: resident now; VmHWM: the most it ever was)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def in_netns(netns: str | None, argv: list[str]) -> list[str]:
    """``argv`` run inside the named network namespace (tests/pacs.py), or as is."""
    return ["ip", "netns", "exec", netns, *argv] if netns else argv


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


def storescu_args(files: Iterable[Path]) -> list[tuple[str, list[Path]]]:
    """Group files by the storescu option that proposes their transfer syntax."""
    groups: dict[str, list[Path]] = defaultdict(list)
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True, force=True)
        ts = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
        groups[PROPOSE.get(ts, "-x=")].append(f)
    return list(groups.items())


RESPONSE = re.compile(r"Received Store Response \(([^)]*)\)")
SENDING = re.compile(r"Sending file: (.+)$")


def storescu(port: int, files: Iterable[Path], aet: str = "MODALITY1", aec: str = "CXR_NODE",
             host: str = "127.0.0.1", extra: Iterable[str] = (),
             netns: str | None = None) -> dict[str, str]:
    """Send with dcmtk's storescu (a real modality client); answer {file: response text}.

    storescu exits 0 even when the node refused a file, so the per-file response is parsed.
    """
    results: dict[str, str] = {}
    for option, group in storescu_args(files):
        out = run_storescu([option, *extra, "-aet", aet, "-aec", aec, host, str(port),
                            *map(str, group)], netns=netns)
        results.update(parse_storescu(out))
        for f in group:
            results.setdefault(str(f), "no response")
    return results


def storescu_in_background(port: int, files: Iterable[Path],
                           aet: str = "MODALITY1") -> subprocess.Popen[str]:
    """A modality sending uncompressed files over one association, while the test does things."""
    return subprocess.Popen(
        [STORESCU, "-v", "-aet", aet, "-aec", "CXR_NODE", "127.0.0.1", str(port),
         *map(str, files)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def run_storescu(args: list[str], timeout: float = 300, netns: str | None = None) -> str:
    done = subprocess.run(in_netns(netns, [STORESCU, "-v", *args]), capture_output=True,
                          text=True, timeout=timeout)
    return done.stdout + done.stderr


def parse_storescu(output: str) -> dict[str, str]:
    results, current = {}, None
    for line in output.splitlines():
        if m := SENDING.search(line):
            current = m.group(1).strip()
        elif (m := RESPONSE.search(line)) and current:
            results[current] = m.group(1)
            current = None
    return results


class WorkerProcess:
    """`cxr-node worker` in its own process group (a GPU host's worker, here on the CPU)."""

    def __init__(self, config_path: Path, env: dict[str, str] | None = None, name: str = "w1"):
        self.config_path = config_path
        self.log_path = config_path.parent / f"worker-{name}-{int(time.time() * 1000)}.log"
        self.env = {**os.environ, **(env or {})}
        self.name = name
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cxr_node", "worker", "--config", str(self.config_path),
                 "--hostname", f"{self.name}@test"],
                stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True,
            )
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL the worker and its pool processes: a GPU host that lost power."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
