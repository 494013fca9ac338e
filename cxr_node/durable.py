"""Durable file writes: a file is either absent or whole on disk, never half-written.

Temp file in the target directory, fsync, rename, fsync the directory: after this returns, a power
cut cannot lose the file. Everything is private to the node's user (files 0600, directories 0700).
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

FILE_MODE = 0o600
DIR_MODE = 0o700


def private_dir(path: Path) -> Path:
    """Create a directory, and any missing parent, readable only by the node's user."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    for directory in reversed(missing):
        directory.mkdir(mode=DIR_MODE, exist_ok=True)
    return path


def private_opener(path: str, flags: int) -> int:
    """An ``opener`` for open(): a file it creates is private to the node's user (0600)."""
    return os.open(path, flags, FILE_MODE)


def write_atomic(path: Path, chunks: bytes | Iterable[bytes], fsync: bool = True) -> None:
    """Write ``chunks`` to ``path`` so that the file appears complete or not at all."""
    directory = private_dir(path.parent)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as fh:
            for chunk in [chunks] if isinstance(chunks, bytes) else chunks:
                fh.write(chunk)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if fsync:
        fsync_dir(directory)


def move_durably(source: Path, path: Path, fsync: bool = True) -> None:
    """Move a finished file to ``path`` (0600) so that it is there whole after a power cut.

    A rename when both are on one file system, else a copy through ``write_atomic``.
    """
    directory = private_dir(path.parent)
    if fsync:
        with source.open("rb") as fh:
            os.fsync(fh.fileno())
    os.chmod(source, FILE_MODE)
    try:
        os.replace(source, path)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        with source.open("rb") as fh:
            write_atomic(path, iter(lambda: fh.read(1 << 20), b""), fsync=fsync)
        source.unlink()
        return
    if fsync:
        fsync_dir(directory)


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class OutsideRoot(PermissionError):
    """A path that would resolve outside the folder it must stay in."""


def confined(path: Path, root: Path) -> Path:
    """``path``, resolved, if it stays inside ``root`` after following every symlink; else raise.

    The last check before the node writes a file: whatever built the name, and whatever links
    someone planted on the way, the file lands under ``root`` (itself resolved, so a state
    directory that is a symlink is fine).
    """
    try:
        resolved, base = path.resolve(), root.resolve()
    except (OSError, ValueError) as exc:  # a NUL byte, a symlink loop
        raise OutsideRoot(errno.EPERM, f"cannot resolve a path under {root}: {exc}") from None
    if resolved != base and base not in resolved.parents:
        raise OutsideRoot(errno.EPERM, f"a path resolves outside {root}")
    return resolved


def free_mb(path: Path) -> float:
    """Free space for the node's user on the file system holding ``path``, in MiB."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize / 2**20
