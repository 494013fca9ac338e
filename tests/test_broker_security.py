"""The broker as an attacker would try it: secrets in URLs, TLS without checks, one shared login,
Celery remote control. Real redis-server (ACL users from config/redis-users.acl, TLS from
certificates made by openssl) and a real Celery worker consuming as the workers' user.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery
from celery.contrib.testing.worker import start_worker
from redisserver import (
    NODE_PASSWORD,
    REDIS_ENV,
    WORKER_PASSWORD,
    RedisServer,
    redis_queue,
)
from test_tls import Identity, make_identity

from cxr_node.config import (
    BROKER_PASSWORD_ENV,
    Config,
    ConfigError,
    load_config,
)
from workers.app import make_celery

QUEUE = "cxr.draft"
ECHO = "cxr.test_echo"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.yaml"
    path.write_text(text)
    return path


# --- configuration -----------------------------------------------------------------------------

REDIS_USERS = "username: cxr-node, worker_username: cxr-worker"


@pytest.mark.parametrize(("broker", "secret"), [
    ("redis://:hunter2@127.0.0.1:6379/0", "hunter2"),
    ("redis://cxr-node:hunter2@127.0.0.1:6379/0", "hunter2"),
    ("redis://127.0.0.1:6379/0?password=hunter2", "hunter2"),
    ("rediss://127.0.0.1:6379/0?ssl_cert_reqs=CERT_NONE&password=hunter2", "hunter2"),
], ids=["password", "user-and-password", "query-password", "cert-none"])
def test_a_secret_anywhere_in_the_broker_url_is_refused_and_never_printed(
    tmp_path: Path, broker: str, secret: str,
):
    path = write(tmp_path, f"queue: {{broker: '{broker}', {REDIS_USERS}}}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert secret not in str(err.value) and "CERT_NONE" not in str(err.value)
    assert f"{path}:1: 'queue.broker'" in str(err.value)
    done = subprocess.run([sys.executable, "-m", "cxr_node", "config", "check", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and secret not in done.stdout + done.stderr


@pytest.mark.parametrize(("queue", "expected"), [
    ("{broker: 'redis://127.0.0.1:6379/0'}", "queue.username and queue.worker_username"),
    ("{broker: 'redis://127.0.0.1:6379/0', username: a, worker_username: a}",
     "different from queue.username"),
    (f"{{broker: 'rediss://127.0.0.1:6379/0', {REDIS_USERS}}}", "queue.tls with ca_certificates"),
    (f"{{broker: 'redis://127.0.0.1:6379/0', {REDIS_USERS}, tls: {{ca_certificates: ca.pem}}}}",
     "a rediss:// broker URL"),
])
def test_redis_needs_two_users_and_checked_tls(tmp_path: Path, queue: str, expected: str):
    with pytest.raises(ConfigError, match=expected):
        load_config(write(tmp_path, f"queue: {queue}\n"))


def test_config_check_shows_whether_each_password_is_there_never_what(tmp_path: Path):
    path = write(tmp_path, f"queue: {{broker: 'redis://127.0.0.1:6379/0', {REDIS_USERS}}}\n")
    env = {"PATH": "/usr/bin:/bin", BROKER_PASSWORD_ENV: NODE_PASSWORD}
    done = subprocess.run([sys.executable, "-m", "cxr_node", "config", "check", str(path)],
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    assert "broker_password: '***'" in done.stdout
    assert "worker_broker_password: null" in done.stdout
    assert NODE_PASSWORD not in done.stdout + done.stderr


# --- a real Redis with the shipped ACL users ---------------------------------------------------


def config_for(tmp_path: Path, server: RedisServer, tls: Path | None = None) -> Config:
    queue = redis_queue(server.port, scheme="rediss" if tls else "redis")
    if tls:
        queue["tls"] = {"ca_certificates": str(tls)}
    return Config.model_validate({"node": {"state_dir": str(tmp_path / "state")}, "queue": queue})


@pytest.fixture
def passwords(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in REDIS_ENV.items():
        monkeypatch.setenv(name, value)


def echo_worker(config: Config) -> Celery:
    """The workers' Celery app, logged in as the workers' user, with a task that echoes."""
    app = make_celery(config, role="worker")
    app.task(name=ECHO)(echo)
    return app


def echo(value: object) -> object:
    return value


@pytest.fixture
def plain_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    yield server
    server.close()


@pytest.mark.slow
def test_node_and_workers_each_have_only_what_the_queue_needs(
    tmp_path: Path, plain_redis: RedisServer, passwords: None,
):
    config = config_for(tmp_path, plain_redis)
    node = make_celery(config, role="node")
    with start_worker(echo_worker(config), queues=[QUEUE], perform_ping_check=False,
                      pool="solo", loglevel="WARNING", shutdown_timeout=30):
        result = node.send_task(ECHO, args=[["drafted"]], queue=QUEUE)
        assert result.get(timeout=30) == ["drafted"]
        result.forget()
    # Either password opens nothing beyond the queue: no administration, no other key.
    admin = plain_redis.client()
    admin.set("hospital:other-app", "x")
    for user, password in (("cxr-node", NODE_PASSWORD), ("cxr-worker", WORKER_PASSWORD)):
        client = plain_redis.client(user, password)
        for attempt in (client.flushall, lambda c=client: c.config_get("*"), client.keys,
                        lambda c=client: c.get("hospital:other-app"), client.acl_list):
            with pytest.raises(redis.exceptions.NoPermissionError):
                attempt()
    # The node cannot take drafts off the queue (it is not a worker), and wrong passwords fail.
    with pytest.raises(redis.exceptions.NoPermissionError):
        plain_redis.client("cxr-node", NODE_PASSWORD).brpop([QUEUE], timeout=1)
    with pytest.raises(redis.exceptions.AuthenticationError):
        plain_redis.client("cxr-worker", NODE_PASSWORD).ping()
    assert admin.get("hospital:other-app") == b"x"


@pytest.mark.slow
def test_a_draft_a_worker_took_and_never_finished_goes_back_on_the_queue(
    tmp_path: Path, plain_redis: RedisServer, passwords: None,
):
    """Late acknowledgement under the workers' ACL: what a lost worker held is restored (the
    restore runs in a MULTI/EXEC guarded by WATCH, under a lock), never dropped."""
    config = config_for(tmp_path, plain_redis)
    make_celery(config, role="node").send_task(ECHO, args=["held"], queue=QUEUE)
    admin = plain_redis.client()
    with make_celery(config, role="worker").connection_for_read() as connection:
        queue = connection.SimpleQueue(QUEUE)
        assert queue.get(timeout=10).payload  # taken, not acknowledged
        assert admin.llen(QUEUE) == 0 and admin.hlen("unacked") == 1
        queue.channel.qos.restore_visible(num=10, interval=1)  # the periodic scan
        queue.channel.qos.restore_unacked()  # what a worker gives back when it stops
        assert admin.llen(QUEUE) == 1 and admin.hlen("unacked") == 0
    assert admin.acl_log() == []  # nothing the workers' user did was refused


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_a_remote_control_broadcast_does_not_reach_the_workers(
    tmp_path: Path, plain_redis: RedisServer, passwords: None,
):
    """Celery's remote control would let anyone who can publish to Redis shut workers down."""
    config = config_for(tmp_path, plain_redis)
    node = make_celery(config, role="node")
    attacker = Celery("attacker", broker=f"redis://admin:admin-secret@127.0.0.1:{plain_redis.port}/0",
                      set_as_current=False)
    with start_worker(echo_worker(config), queues=[QUEUE], perform_ping_check=False,
                      pool="solo", loglevel="WARNING", shutdown_timeout=30):
        assert attacker.control.ping(timeout=2) == []  # no worker listens to broadcasts
        attacker.control.broadcast("shutdown")
        time.sleep(1)
        assert node.send_task(ECHO, args=["still there"], queue=QUEUE).get(timeout=30) == (
            "still there")


@pytest.fixture(scope="module")
def redis_pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Identity]:
    d = tmp_path_factory.mktemp("redis-pki")
    ca = make_identity(d, "redis-ca")
    return {"ca": ca, "right": make_identity(d, "redis", ca, san="IP:127.0.0.1"),
            "wrong": make_identity(d, "elsewhere", ca, san="DNS:cache.hospital.example")}


@pytest.mark.slow
@pytest.mark.parametrize("certificate", ["right", "wrong"])
def test_rediss_checks_the_server_certificate_and_its_name(
    tmp_path: Path, redis_pki: dict[str, Identity], certificate: str, passwords: None,
):
    identity, ca = redis_pki[certificate], redis_pki["ca"]
    server = RedisServer(tmp_path, tls=(identity.cert, identity.key, ca.cert))
    try:
        config = config_for(tmp_path, server, tls=redis_pki["ca"].cert)
        connection = make_celery(config, role="node").connection_for_write()
        try:
            if certificate == "right":
                connection.ensure_connection(max_retries=1)
                assert connection.default_channel.client.ping()
            else:
                with pytest.raises(Exception, match="certificate is not valid for '127.0.0.1'"):
                    connection.ensure_connection(max_retries=1)
                    connection.default_channel.client.ping()
        finally:
            connection.release()
    finally:
        server.close()
