"""The data directory's lock: one broker, or one offline reshard, uses a directory at a time.

``DATA/broker.lock`` is held with an exclusive, non-blocking ``flock`` for as long as
the process works on the directory. The kernel releases it when the descriptor is
closed or the process dies (even by ``kill -9``), so a stale lock never outlives its
owner. The file's content (the owner's pid: a broker's or an offline reshard's) is for
people, so that a refusal can say who holds the directory; the lock is the ``flock``.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Final

LOCK_NAME: Final = "broker.lock"


class DataDirInUse(Exception):
    """Another process holds the lock; ``pid`` is the holder's as its lock file names it
    (None when the file names nobody)."""

    def __init__(self, message: str, pid: int | None = None) -> None:
        super().__init__(message)
        self.pid = pid


def _holder(fd: int) -> int | None:
    """The pid written in the lock file, if it is a number."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def lock_data_dir(data_dir: Path, owner_pid: int | None = None) -> int:
    """Take the lock on ``data_dir`` and return its descriptor (close it to release).

    Raises ``DataDirInUse`` when another process holds it, ``OSError`` when the lock
    file cannot be opened. With ``owner_pid`` the file is rewritten to name the owner.
    """
    fd = os.open(Path(data_dir) / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = _holder(fd)
        os.close(fd)
        held = f" by pid {pid}" if pid is not None else ""
        raise DataDirInUse(f"{Path(data_dir) / LOCK_NAME} is locked{held}", pid) from None
    if owner_pid is not None:
        os.ftruncate(fd, 0)
        os.write(fd, f"{owner_pid}\n".encode())
    return fd
