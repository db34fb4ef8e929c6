"""Child Python processes for the demo and the benchmarks: each logs to its own file, all are stopped on exit."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

from common.errors import CohortError


class Processes:
    """``start(name, argv)`` runs ``python <argv>`` in ``cwd`` with its output in ``log_dir/<name>.log``."""

    def __init__(self, log_dir: Path, cwd: Path) -> None:
        self.log_dir = log_dir
        self.cwd = cwd
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: list[IO[bytes]] = []

    def start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = (self.log_dir / f"{name}.log").open("wb")
        self._logs.append(log)
        proc = subprocess.Popen(
            [sys.executable, *argv],
            cwd=self.cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
            start_new_session=True,
        )
        self.procs[name] = proc
        return proc

    def tail(self, name: str, lines: int = 30) -> str:
        path = self.log_dir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise CohortError(
                    f"{name} exited with code {proc.returncode}; see {self.log_dir / (name + '.log')}:\n"
                    f"{self.tail(name, 10)}"
                )

    def pause(self, seconds: float, on: str) -> None:
        """Wait ``seconds``, or less if process ``on`` exits first."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.procs[on].wait(timeout=seconds)

    def wait_for_file(self, path: Path, timeout: float, on: str) -> str:
        """The stripped text of ``path`` once a process wrote it (``on`` exiting first fails fast)."""
        deadline = time.monotonic() + timeout
        while not path.exists():
            self.check_alive()
            if time.monotonic() > deadline:
                raise CohortError(f"{path.name} did not appear within {timeout:.0f}s; see {self.log_dir}")
            self.pause(0.1, on)
        return path.read_text().strip()

    def stop_all(self, timeout: float = 15.0) -> None:
        """SIGTERM to all, then SIGKILL to whatever has not exited within ``timeout``."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for log in self._logs:
            log.close()
