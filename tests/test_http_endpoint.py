"""The HTTP endpoint answers only to its own names: a web page whose host name an attacker points
at 127.0.0.1 (DNS rebinding) cannot read the status page or the metrics from a browser."""

from __future__ import annotations

import http.client
from collections.abc import Iterator

import pytest
from nodeproc import NodeProcess, free_port, write_config


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    config = write_config(tmp_path_factory.mktemp("http"), http={
        "enabled": True, "host": "127.0.0.1", "port": free_port(),
        "allowed_hosts": ["cxr-node.hospital.example"]})
    with NodeProcess(config) as node:
        yield node


def get(port: int, path: str, host: str | None) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest("GET", path, skip_host=True)
        if host is not None:
            conn.putheader("Host", host)
        conn.endheaders()
        return conn.getresponse().status
    finally:
        conn.close()


@pytest.mark.parametrize("path", ["/", "/api/status", "/metrics"])
@pytest.mark.parametrize(("host", "answered"), [
    ("127.0.0.1:{port}", True),
    ("localhost:{port}", True),
    ("LOCALHOST", True),
    ("cxr-node.hospital.example:{port}", True),
    (None, True),
    ("attacker.example:{port}", False),
    ("127.0.0.1.attacker.example:{port}", False),
    ("127.0.0.1:1", False),
    ("", False),
])
def test_only_the_endpoints_own_names_are_answered(node: NodeProcess, path: str,
                                                   host: str | None, answered: bool):
    port = int(node.config["http"]["port"])
    status = get(port, path, None if host is None else host.format(port=port))
    assert (status == 200) == answered and (answered or status == 421), status
