"""Processes the node starts end with it: Linux's parent-death signal, set by the child itself.

A ``preexec_fn`` would do it between fork and exec, but that is unsafe in a process with threads
running (the node has its stage threads): the child of a fork may deadlock on a lock another
thread held. So the child asks for the signal first thing, and checks that its parent is still
the process that started it; if that parent died before the request was made, it stops at once.
"""

from __future__ import annotations

import ctypes
import os
import signal

PARENT_PID_ENV = "CXR_NODE_PARENT_PID"
PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int | None = None) -> None:
    """Have Linux send this process SIGTERM when its parent dies, so no orphan keeps a port or a GPU.

    ``parent`` is the process id that started this one, if known: when the parent is already
    another process (the starter died first and this one was adopted), SIGTERM comes now.
    """
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if parent is not None and os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)


def starter_env(environ: dict[str, str]) -> dict[str, str]:
    """``environ`` for a child that calls ``end_with_starter`` first thing."""
    return {**environ, PARENT_PID_ENV: str(os.getpid())}


def end_with_starter() -> None:
    """In a process started with ``starter_env``: ``die_with_parent``, checked against the starter.
    Elsewhere (systemd, a shell) nothing changes."""
    value = os.environ.get(PARENT_PID_ENV, "")
    if value.isdigit():
        die_with_parent(int(value))
