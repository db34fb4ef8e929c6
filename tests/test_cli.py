"""The `cohort` command as an operator runs it: real processes, signals and exit codes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from support import Pki, wait_ready_file

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def cohort(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cohort_cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=cwd,
        env=env,
    )


def wait_for(path: Path, proc: subprocess.Popen[str], timeout: float = 30) -> str:
    return wait_ready_file(path, proc, timeout, lambda: str(proc.communicate()))


def test_coordinator_process_serves_status_and_stops_on_sigterm(pki: Pki, tmp_path: Path) -> None:
    config = tmp_path / "coordinator.yaml"
    c = pki.coordinator
    config.write_text(
        "federation: {name: test, sites: [site-a, site-b]}\n"
        f"server: {{listen: '127.0.0.1:0', tls: {{ca: '{c.ca}', cert: '{c.cert}', key: '{c.key}'}}}}\n"
        f"state_dir: '{tmp_path / 'state'}'\n"
    )
    ready = tmp_path / "addr"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cohort_cli", "coordinator", "--config", str(config), "--ready-file", str(ready)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        address = wait_for(ready, proc)
        admin_dir = str(pki.admin.cert.parent)
        result = cohort("status", "--coordinator", address, "--tls-dir", admin_dir, "--json", cwd=ROOT)
        assert result.returncode == 0, result.stderr
        status = json.loads(result.stdout)
        assert status["federation"] == "test"
        assert [s["site_id"] for s in status["sites"]] == ["site-a", "site-b"]
        # A participant certificate is not an admin: the client says so before dialing.
        site_dir = str(pki.site("site-a").cert.parent)
        result = cohort("status", "--coordinator", address, "--tls-dir", site_dir, cwd=ROOT)
        assert result.returncode == 2
        assert "needs an admin certificate" in result.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "closing" in out


def test_config_errors_are_one_clear_line(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("federation: {sites: [a]}\nserver: {listen: '127.0.0.1:0', tlz: {}}\n")
    result = cohort("coordinator", "--config", str(config), cwd=ROOT)
    assert result.returncode == 2
    assert "server.tlz: unknown key" in result.stderr
    assert "Traceback" not in result.stderr


def test_participant_refuses_a_missing_certificate(tmp_path: Path) -> None:
    config = tmp_path / "p.yaml"
    config.write_text(
        f"task: breast_cancer\ndata_dir: '{tmp_path}'\ntls: {{ca: '{tmp_path}/ca.crt', cert: x.crt, key: x.key}}\n"
    )
    result = cohort("participant", "--config", str(config), cwd=ROOT, env={**os.environ, "COHORT_LOG_LEVEL": "error"})
    assert result.returncode == 2
    assert "ca.crt" in result.stderr
    assert "Traceback" not in result.stderr
