"""Shared fixtures: the sample data (all from this repository or pinned packages) and the peers
the tests talk to."""

from __future__ import annotations

import hashlib
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from redisserver import RedisServer
from samples import NIH_IMAGES, build_samples

from workers.demo import build_demo_model

# Real radiology report text: the Indiana University chest X-ray reports (Open-i), CC BY-NC-ND 4.0,
# so never kept in this repository. The torchxrayvision wheel carries the published archive
# unchanged; scripts/setup.sh downloads that wheel (hash-checked) and the tests read it from there.
REPORTS_WHEEL = (Path(sys.prefix) / "share" / "cxr-node-test-data"
                 / "torchxrayvision-1.5.7-py3-none-any.whl")
REPORTS_MEMBER = "torchxrayvision/data/NLMCXR_reports.tgz"
REPORTS_SHA256 = "8fb6de7eec73d8c3665067ad4bb003ccd57f971ae316d2642e1627ac7268667a"


@pytest.fixture(scope="session")
def cxr_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real CR/DX files in every transfer syntax the tests need (tests/samples.py says which)."""
    return build_samples(tmp_path_factory.mktemp("samples"))


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random-weight demo model, built once (as `cxr-node model demo` builds it); tests
    only read it."""
    return build_demo_model(tmp_path_factory.mktemp("models") / "demo")


@pytest.fixture(scope="session")
def nih_images() -> Path:
    """Four NIH ChestX-ray14 PNGs kept in tests/data (see its README for the citation)."""
    return NIH_IMAGES


@pytest.fixture(scope="session")
def iu_reports(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """NLMCXR_reports.tgz, unmodified, taken out of the wheel that scripts/setup.sh downloads."""
    if not REPORTS_WHEEL.is_file():
        pytest.fail(f"{REPORTS_WHEEL} is missing: scripts/setup.sh downloads it (the Indiana "
                    "University reports are not kept in the repository: CC BY-NC-ND)")
    with zipfile.ZipFile(REPORTS_WHEEL) as wheel:
        data = wheel.read(REPORTS_MEMBER)
    assert hashlib.sha256(data).hexdigest() == REPORTS_SHA256, f"{REPORTS_MEMBER} changed"
    path = tmp_path_factory.mktemp("iu-reports") / "NLMCXR_reports.tgz"
    path.write_bytes(data)
    return path


@pytest.fixture
def redis_port(tmp_path: Path) -> Iterator[int]:
    """A private redis-server on 127.0.0.1 with the node's and the workers' ACL users
    (tests/redisserver.py), no persistence; stopped afterwards."""
    server = RedisServer(tmp_path)
    try:
        yield server.port
    finally:
        server.close()
