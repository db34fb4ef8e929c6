"""Ten participant daemons given SIGTERM in the middle of a job all exit, with code 0, within the drain timeout.

A regression test (issue 12): participants often needed SIGKILL after SIGTERM while they trained or streamed.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from support import SITES, wait_until

from common.ca import init_federation

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
DRAIN_TIMEOUT_S = 10.0  # what an orchestrator gives a site before SIGKILL (systemd's and Docker's are larger)
N = 10


def _count(db: Path, sql: str) -> int:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            return int(conn.execute(sql).fetchone()[0])
    except sqlite3.Error:
        return 0


def _wait(predicate: Callable[[], bool], procs: list[subprocess.Popen[str]], timeout: float, what: str) -> None:
    def alive() -> str | None:
        gone = [p for p in procs if p.poll() is not None]
        return str(gone[0].communicate()) if gone else None

    wait_until(predicate, timeout, what, alive=alive, interval=0.1)


def test_ten_sites_exit_on_sigterm_within_the_drain_timeout(tmp_path: Path, site_data: dict[str, Path]) -> None:
    sites = tuple(f"site-{i:02d}" for i in range(N))
    ids = init_federation(tmp_path / "certs", sites=sites, admins=("admin",), federation="test")
    c = ids["coordinator"]
    config = tmp_path / "coordinator.yaml"
    config.write_text(
        f"federation: {{name: test, sites: [{', '.join(sites)}]}}\n"
        f"server: {{listen: '127.0.0.1:0', heartbeat_interval_s: 2, tls: {{ca: '{c.ca}', cert: '{c.cert}', "
        f"key: '{c.key}'}}}}\n"
        f"state_dir: '{tmp_path / 'state'}'\n"
        f"job: {{task: breast_cancer, rounds: 500, min_sites: {N}, fraction: 1.0, wait_for_sites_s: 300, "
        "round_timeout_s: 300, evaluate_every: 0, params: {local_epochs: 3, batch_size: 8}}\n"
    )
    ready = tmp_path / "addr"
    coordinator = subprocess.Popen(
        [sys.executable, "-m", "cohort_cli", "coordinator", "--config", str(config), "--ready-file", str(ready)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    participants: list[subprocess.Popen[str]] = []
    try:
        _wait(ready.exists, [coordinator], 60, "the coordinator")
        address = ready.read_text().strip()
        for i, site in enumerate(sites):
            s = ids[f"site:{site}"]
            cfg = tmp_path / f"{site}.yaml"
            cfg.write_text(
                f"task: breast_cancer\ndata_dir: '{site_data[SITES[i % len(SITES)]]}'\n"
                f"coordinator: {{address: '{address}'}}\n"
                f"tls: {{ca: '{s.ca}', cert: '{s.cert}', key: '{s.key}'}}\n"
                "reconnect: {initial_backoff_s: 0.1, max_backoff_s: 1}\n"
            )
            participants.append(
                subprocess.Popen(
                    [sys.executable, "-m", "cohort_cli", "--log-level", "warning", "participant", "--config", str(cfg)],
                    cwd=ROOT,
                    env={**os.environ, "PYTHONFAULTHANDLER": "1"},
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            )
        db = tmp_path / "state" / "coordinator.db"
        # Mid-job: every site joined and a few rounds committed, so sites are training, uploading or downloading.
        _wait(
            lambda: _count(db, "SELECT count(*) FROM rounds WHERE state = 'completed'") >= 2,
            [coordinator, *participants],
            300,
            "two rounds with all ten sites",
        )
        for p in participants:
            p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        codes: list[int | None] = []
        for p in participants:
            try:
                codes.append(p.wait(timeout=max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                codes.append(None)
        for p in participants:
            if p.poll() is None:
                p.send_signal(signal.SIGABRT)  # faulthandler: where it hangs
        outputs = [p.communicate()[0][-3000:] for p in participants]
        assert codes == [0] * N, outputs
    finally:
        for p in participants:
            if p.poll() is None:
                p.kill()
                p.wait()
        coordinator.send_signal(signal.SIGTERM)
        coordinator.wait(timeout=60)
