"""Exclusive locks on files (``fcntl.flock``): one search per folder, one first creation of a
runs root's MLflow store.

The kernel releases a lock when its holder dies, however it dies, so a killed search leaves no
stale lock to clean up: the next run simply takes it. Locks hold between processes of one machine
(and on file systems with working ``flock``); the search driver runs on one machine.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from wsss.errors import UserError


@contextlib.contextmanager
def held(path: Path, what: str | None = None) -> Iterator[None]:
    """Hold the lock file ``path`` while the block runs. With ``what`` (what the lock protects,
    for the message) a lock held elsewhere is a `UserError` naming its holder; without, wait for
    it: for short critical sections every process must pass, such as creating a database."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (fcntl.LOCK_NB if what else 0))
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise UserError(f"{what} is in use by {holder} (lock {path}); wait for it to end, "
                            f"or choose another name (--set name=...)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the lock
