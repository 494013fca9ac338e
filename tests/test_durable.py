"""Durable file moves: the received file ends up whole, private, and under its final name."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cxr_node.durable import move_durably


def test_move_within_a_file_system_renames(tmp_path: Path):
    source = tmp_path / "incoming" / "tmp123.dcm"
    source.parent.mkdir()
    source.write_bytes(b"dataset")
    inode = source.stat().st_ino
    target = tmp_path / "spool" / "study" / "1.2.3.dcm"
    move_durably(source, target)
    assert not source.exists()
    assert target.read_bytes() == b"dataset" and target.stat().st_ino == inode
    assert target.stat().st_mode & 0o777 == 0o600
    assert target.parent.stat().st_mode & 0o777 == 0o700


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="needs a second file system")
def test_move_to_another_file_system_copies_then_removes_the_source(tmp_path: Path):
    """The quarantine may be configured on another disk than the spool."""
    if os.stat("/dev/shm").st_dev == tmp_path.stat().st_dev:
        pytest.skip("/dev/shm is on the same file system here")
    source = tmp_path / "tmp123.dcm"
    data = os.urandom(3 << 20)
    source.write_bytes(data)
    target = Path("/dev/shm") / f"cxr-node-test-{os.getpid()}" / "refused.dcm"
    try:
        move_durably(source, target)
        assert not source.exists()
        assert target.read_bytes() == data
        assert target.stat().st_mode & 0o777 == 0o600
        assert not [p for p in target.parent.iterdir() if p.name.startswith(".tmp-")]
    finally:
        target.unlink(missing_ok=True)
        target.parent.rmdir()
