"""Shared fixtures: where the real sample data lives, and the peers the tests talk to."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CXR_NODE_SHARED_DATA", REPO.parent / "shared" / "data"))
CXR_DIR = SHARED_DATA / "dicom-cxr"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"sample data not found at {SHARED_DATA}; set CXR_NODE_SHARED_DATA")
    return SHARED_DATA


@pytest.fixture(scope="session")
def cxr_dir(shared_data: Path) -> Path:
    return shared_data / "dicom-cxr"
