"""A real redis-server for tests: loopback only, no persistence, and the ACL users of
config/redis-users.acl (node and workers each with their own password), as production runs it."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import redis
from nodeproc import accepts, free_port, wait_for

from cxr_node.config import BROKER_PASSWORD_ENV, WORKER_BROKER_PASSWORD_ENV

REPO = Path(__file__).resolve().parents[1]
NODE_USER, WORKER_USER = "cxr-node", "cxr-worker"
NODE_PASSWORD, WORKER_PASSWORD = "s3cret:/@x", "w0rker#?%y"  # characters a URL must escape
# what the node's and a worker's environment carry (the systemd credentials, in tests)
REDIS_ENV = {BROKER_PASSWORD_ENV: NODE_PASSWORD, WORKER_BROKER_PASSWORD_ENV: WORKER_PASSWORD}


def acl_file(directory: Path) -> Path:
    """config/redis-users.acl with the test passwords' hashes filled in, and an admin user (an
    attacker holding the broker's own keys, for the tests that need one)."""
    text = (REPO / "config" / "redis-users.acl").read_text()
    for role, password in (("node's", NODE_PASSWORD), ("workers'", WORKER_PASSWORD)):
        text = text.replace(f"#<sha256 of the {role} password>",
                            "#" + hashlib.sha256(password.encode()).hexdigest())
    assert "#<sha256" not in text
    text += "\nuser admin on >admin-secret ~* &* +@all\n"
    path = directory / "users.acl"
    path.write_text(text)
    return path


class RedisServer:
    """redis-server on 127.0.0.1 with the ACL file, plain or TLS only; stopped by ``close``."""

    def __init__(self, directory: Path, tls: tuple[Path, Path, Path] | None = None):
        """``tls``: (certificate, key, CA certificate) for a TLS-only server."""
        self.port = free_port()
        args = ["redis-server", "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(directory), "--aclfile", str(acl_file(directory))]
        if tls:
            cert, key, ca = tls
            args += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(cert),
                     "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca),
                     "--tls-auth-clients", "no"]
        else:
            args += ["--port", str(self.port)]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL)
        if not wait_for(lambda: accepts(self.port, timeout=0.2), 10):
            self.close()
            raise TimeoutError("redis-server did not start")

    def client(self, user: str = "admin", password: str = "admin-secret") -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, username=user, password=password,
                           socket_timeout=5)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(timeout=10)


def redis_queue(port: int, scheme: str = "redis", **settings: object) -> dict[str, object]:
    """The `queue:` section of a node using this Redis, with both users."""
    return {"broker": f"{scheme}://127.0.0.1:{port}/0", "username": NODE_USER,
            "worker_username": WORKER_USER, **settings}
