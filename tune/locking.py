"""Locks on files (``fcntl.flock``): one search per folder, one first creation of a runs root's
MLflow store, and a runs root's stores not collected (`tune.cleanup`) while a command uses them.

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


class Busy(UserError):
    """A lock that must not be waited for is held by another process."""


@contextlib.contextmanager
def held(path: Path, what: str | None = None, shared: bool = False) -> Iterator[None]:
    """Hold the lock file ``path`` while the block runs. With ``what`` (what the lock protects,
    for the message) a lock held elsewhere is `Busy`, naming its holder; without, wait for it:
    for short critical sections every process must pass, such as creating a database.
    ``shared`` locks (many holders, no name recorded) exclude only the exclusive holder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
                        | (fcntl.LOCK_NB if what else 0))
        except BlockingIOError:
            raise Busy(f"{what} is in use by {_holder(fd)} (lock {path}); wait for it to end, "
                       f"or choose another name (--set name=...)") from None
        if not shared:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _holder(fd: int) -> str:
    return os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"


def holder(path: Path) -> str | None:
    """Who holds the exclusive lock ``path`` now (None: nobody), without waiting for it."""
    if not path.is_file():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        return _holder(fd)
    finally:
        os.close(fd)
