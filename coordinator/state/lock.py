"""The coordinator's exclusive hold on its state directory.

Two coordinators on one ``state_dir`` would both write the same SQLite database, model files and spool: two jobs
with the same numbering, rounds committed twice, a split federation. The first coordinator takes an exclusive
``flock`` on ``state_dir/coordinator.lock`` (released by the kernel when its process ends, however it ends); a
second one is refused at start-up with the holder's process id, before it opens anything.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from common.errors import ConfigError

LOCK_NAME = "coordinator.lock"


class StateLock:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> StateLock:
        """Take the lock or raise :class:`ConfigError` naming the state directory and the process that holds it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(
                f"state_dir: {self.path.parent} is in use by another coordinator (pid {holder}); "
                "stop it first, or give this one its own state_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None
