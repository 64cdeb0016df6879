"""One moe command at a time in a directory: ``moe train`` (and ``moe eval``) hold their run
directory, ``moe sweep`` its out_dir, for as long as they run.

The hold is an advisory ``flock`` on a hidden file in the directory (``LOCK_FILE``). The
kernel drops it when the holder exits however it ends, so a killed run leaves no stale
lock and its resume is not refused; while it runs, a second command in the same directory
(a resume started beside a run still going, a second sweep over the same out_dir, which
would delete the first one's unfinished trials) is one error before it writes anything.
The lock file lives only as long as the hold. It holds between processes on one machine and on file systems that pass ``flock`` on
(local disks, NFSv4, Lustre with ``flock`` mounts); it is no protection against other tools.
"""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from moe.config import ConfigError

LOCK_FILE = ".moe.lock"


@contextmanager
def held_directory(directory: Path, key: str) -> Iterator[None]:
    """Hold ``directory`` (which exists) for the block; ``ConfigError`` naming ``key`` (the
    setting that chose the directory) and the holder when another process holds it. The
    lock file goes when the hold ends: nobody waits on it (the lock is tried, never waited
    for), so a process that opened it just before is refused, and one that comes after
    makes a new one."""
    fd = _locked(directory / LOCK_FILE, key)
    try:
        os.ftruncate(fd, 0)
        started = datetime.now().isoformat(timespec="seconds")
        os.pwrite(fd, f"moe pid {os.getpid()} on {socket.gethostname()} (since {started})\n".encode(), 0)
        try:
            yield
        finally:
            (directory / LOCK_FILE).unlink(missing_ok=True)
    finally:
        os.close(fd)


def _locked(path: Path, key: str) -> int:
    """An open descriptor of ``path`` holding its lock. A file its holder removed between
    our open and our lock is not the lock any more: opened again, as new."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise ConfigError(
                f"{key}={str(path.parent)!r} is in use by {holder}; wait for that to end, or choose another {key}"
            ) from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)
