"""Mistakes an operator makes fail fast: one line ``cohort <cmd>: error: ...``, exit 2, no traceback, no state.

Each case is one of the bad inputs of issue 12 ("Why"): a listen host that does not resolve, a used port, a used
state_dir, a state_dir that is a file, a misspelled task, a config error from an environment variable or ``--set``,
a wrong CA or server name at a site, the same site started twice, and a requested stop after a failed job.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from support import (
    CoordinatorFactory,
    ParticipantFactory,
    Pki,
    coordinator_config,
    participant_config,
    poll_until,
    running,
    wait_ready_file,
    wait_until,
)

from common import config as config_loader
from common.errors import ConfigError
from coordinator.config import ENV_PREFIX, CoordinatorConfig
from coordinator.daemon import CoordinatorDaemon

ROOT = Path(__file__).resolve().parent.parent


def cohort(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cohort_cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


def one_line_error(result: subprocess.CompletedProcess[str], command: str) -> str:
    """The run's error line, checked to be the one ``cohort <cmd>: error:`` line, exit 2, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith(f"cohort {command}: error: ")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def coordinator_yaml(pki: Pki, path: Path, state_dir: Path, listen: str = "127.0.0.1:0") -> Path:
    c = pki.coordinator
    path.write_text(
        "federation: {name: test, sites: [site-a, site-b]}\n"
        f"server: {{listen: '{listen}', tls: {{ca: '{c.ca}', cert: '{c.cert}', key: '{c.key}'}}}}\n"
        f"state_dir: '{state_dir}'\n"
    )
    return path


def participant_yaml(pki: Pki, path: Path, address: str, data_dir: Path, task: str = "breast_cancer") -> Path:
    s = pki.site("site-a")
    path.write_text(
        f"task: {task}\ndata_dir: '{data_dir}'\ncoordinator: {{address: '{address}'}}\n"
        f"tls: {{ca: '{s.ca}', cert: '{s.cert}', key: '{s.key}'}}\n"
        "reconnect: {initial_backoff_s: 0.05, max_backoff_s: 0.2}\n"
    )
    return path


# -- configuration layers name what the operator typed -------------------------------------------------------------
def test_an_environment_variable_error_names_the_variable(pki: Pki, tmp_path: Path) -> None:
    config = coordinator_yaml(pki, tmp_path / "c.yaml", tmp_path / "state")
    name = f"{ENV_PREFIX}SERVER__HEARTBEAT_INTERVAL_S"
    with pytest.raises(ConfigError) as info:
        config_loader.load(CoordinatorConfig, config, env={name: "soon"}, env_prefix=ENV_PREFIX)
    assert str(info.value).startswith(f"environment variable {name}: server.heartbeat_interval_s: expected a number")
    assert str(config) not in str(info.value)


def test_a_set_flag_error_names_the_flag(pki: Pki, tmp_path: Path) -> None:
    config = coordinator_yaml(pki, tmp_path / "c.yaml", tmp_path / "state")
    with pytest.raises(ConfigError) as info:
        config_loader.load(CoordinatorConfig, config, overrides=["server.tls.bogus=1"])
    assert str(info.value).startswith("--set server.tls.bogus=1: server.tls.bogus: unknown key")
    # An error in the file itself still names the file.
    bad = tmp_path / "bad.yaml"
    bad.write_text(config.read_text().replace("state_dir:", "state_dirr:"))
    with pytest.raises(ConfigError) as info:
        config_loader.load(CoordinatorConfig, bad, overrides=["server.heartbeat_interval_s=3"])
    assert str(info.value).startswith(f"{bad}: state_dirr: unknown key")


# -- the coordinator ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_listen_host_that_does_not_resolve_is_one_line(pki: Pki, tmp_path: Path) -> None:
    config = coordinator_yaml(pki, tmp_path / "c.yaml", tmp_path / "state", listen="no-such-host.invalid:50051")
    line = one_line_error(cohort("coordinator", "--config", str(config)), "coordinator")
    assert "server.listen: host 'no-such-host.invalid' does not resolve" in line
    assert not (tmp_path / "state" / "coordinator.db").exists()


@pytest.mark.slow
def test_a_state_dir_that_is_a_file_is_one_line(pki: Pki, tmp_path: Path) -> None:
    (tmp_path / "state").write_text("not a directory")
    config = coordinator_yaml(pki, tmp_path / "c.yaml", tmp_path / "state")
    line = one_line_error(cohort("coordinator", "--config", str(config)), "coordinator")
    assert "state_dir" in line
    assert "is not a directory" in line


@pytest.mark.slow
def test_an_environment_variable_error_from_the_command_line(pki: Pki, tmp_path: Path) -> None:
    config = coordinator_yaml(pki, tmp_path / "c.yaml", tmp_path / "state")
    name = f"{ENV_PREFIX}SERVER__LISTEN"
    line = one_line_error(cohort("coordinator", "--config", str(config), env={name: "nowhere"}), "coordinator")
    assert line.startswith(f"cohort coordinator: error: environment variable {name}: server.listen")
    line = one_line_error(
        cohort("coordinator", "--config", str(config), "--set", "server.shutdown_grace_s=-1"), "coordinator"
    )
    assert line.startswith("cohort coordinator: error: --set server.shutdown_grace_s=-1: server.shutdown_grace_s")


async def test_a_second_coordinator_on_the_same_state_dir_is_refused(
    pki: Pki, tmp_path: Path, coordinator_factory: CoordinatorFactory
) -> None:
    first = await coordinator_factory(coordinator_config(pki, tmp_path / "state"))
    second = CoordinatorDaemon(coordinator_config(pki, tmp_path / "state"))
    with pytest.raises(ConfigError) as info:
        await second.start()
    assert f"state_dir: {tmp_path / 'state'} is in use by another coordinator (pid {os.getpid()})" in str(info.value)
    assert first.coordinator.store.is_open  # the first one is untouched
    # Once the first is gone, the state_dir is free again.
    await first.close("test")
    third = await coordinator_factory(coordinator_config(pki, tmp_path / "state"))
    assert third.address


async def test_a_second_coordinator_on_a_used_port_fails_clearly(
    pki: Pki, tmp_path: Path, coordinator_factory: CoordinatorFactory
) -> None:
    from dataclasses import replace

    first = await coordinator_factory(coordinator_config(pki, tmp_path / "one"))
    config = coordinator_config(pki, tmp_path / "two")
    config = replace(config, server=replace(config.server, listen=first.address))
    second = CoordinatorDaemon(config)
    with pytest.raises(ConfigError) as info:
        await second.start()
    assert f"server.listen: cannot listen on {first.address}: the address is already in use" in str(info.value)
    # Nothing was left open: the second state_dir can be used at once by a coordinator on a free port.
    await coordinator_factory(coordinator_config(pki, tmp_path / "two"))


@pytest.mark.slow
def test_a_used_port_and_state_dir_from_the_command_line(pki: Pki, tmp_path: Path) -> None:
    config = coordinator_yaml(pki, tmp_path / "c.yaml", tmp_path / "state")
    proc, address = _coordinator_process(config, tmp_path / "addr")
    try:
        line = one_line_error(cohort("coordinator", "--config", str(config)), "coordinator")
        assert f"is in use by another coordinator (pid {proc.pid})" in line
        other = coordinator_yaml(pki, tmp_path / "c2.yaml", tmp_path / "state2", listen=address)
        line = one_line_error(cohort("coordinator", "--config", str(other)), "coordinator")
        assert f"cannot listen on {address}: the address is already in use" in line
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert proc.returncode == 0


@pytest.mark.slow
def test_a_requested_stop_exits_0_after_a_failed_job(pki: Pki, tmp_path: Path) -> None:
    config = coordinator_yaml(pki, tmp_path / "c.yaml", tmp_path / "state")
    # No site ever connects: the job fails after its short wait; the coordinator keeps serving.
    with config.open("a") as f:
        f.write("job: {task: breast_cancer, rounds: 1, min_sites: 1, wait_for_sites_s: 0.2}\n")
    proc, _ = _coordinator_process(config, tmp_path / "addr")
    try:
        from coordinator.state.store import SqliteStore

        def failed() -> bool:
            store = SqliteStore(tmp_path / "state" / "coordinator.db")
            jobs = store.jobs()
            store.close()
            return bool(jobs) and jobs[-1]["state"] == "failed"

        wait_until(failed, 60, "the job to fail", alive=running(proc), interval=0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert proc.returncode == 0


# -- a site --------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_misspelled_task_at_a_site_is_one_line(pki: Pki, tmp_path: Path, site_data: dict[str, Path]) -> None:
    config = participant_yaml(pki, tmp_path / "p.yaml", "127.0.0.1:9", site_data["site-a"], task="digts")
    line = one_line_error(cohort("participant", "--config", str(config)), "participant")
    assert "task: task 'digts' is neither a built-in task" in line


def _coordinator_process(config: Path, ready: Path) -> tuple[subprocess.Popen[bytes], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "cohort_cli", "coordinator", "--config", str(config), "--ready-file", str(ready)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return proc, wait_ready_file(ready, proc)


@pytest.mark.slow
def test_a_server_name_mismatch_at_a_site_names_expected_and_presented(
    pki: Pki, tmp_path: Path, site_data: dict[str, Path]
) -> None:
    proc, address = _coordinator_process(coordinator_yaml(pki, tmp_path / "c.yaml", tmp_path / "s"), tmp_path / "r")
    try:
        config = participant_yaml(pki, tmp_path / "p.yaml", address, site_data["site-a"])
        result = cohort("participant", "--config", str(config), "--set", "coordinator.server_name=coord.example")
        line = one_line_error(result, "participant")
        assert "expected server name 'coord.example'" in line
        assert "presents localhost, 127.0.0.1" in line
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.mark.slow
def test_a_coordinator_from_another_ca_names_the_ca_file(pki: Pki, tmp_path: Path, site_data: dict[str, Path]) -> None:
    from common.ca import init_federation

    other = init_federation(tmp_path / "other", sites=("site-a",), admins=("admin",), federation="test")
    c = other["coordinator"]
    config = tmp_path / "c.yaml"
    config.write_text(
        "federation: {name: test, sites: [site-a]}\n"
        f"server: {{listen: '127.0.0.1:0', tls: {{ca: '{c.ca}', cert: '{c.cert}', key: '{c.key}'}}}}\n"
        f"state_dir: '{tmp_path / 's'}'\n"
    )
    proc, address = _coordinator_process(config, tmp_path / "r")
    try:
        site_config = participant_yaml(pki, tmp_path / "p.yaml", address, site_data["site-a"])
        line = one_line_error(cohort("participant", "--config", str(site_config)), "participant")
        assert f"which the CA in {pki.site('site-a').ca} did not issue" in line
        assert "expected server name '127.0.0.1'" in line
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


async def test_a_second_daemon_with_the_same_site_identity_is_told_duplicate_session(
    pki: Pki,
    site_data: dict[str, Path],
    tmp_path: Path,
    coordinator_factory: CoordinatorFactory,
    participant_factory: ParticipantFactory,
) -> None:
    import participant.daemon as participant_daemon

    coord = await coordinator_factory(coordinator_config(pki, tmp_path / "state"))
    config = participant_config(pki.site("site-a"), coord.address, site_data["site-a"])
    first = await participant_factory(config)
    await poll_until(lambda: first.joined.is_set(), what="the first daemon joined")
    # Two processes in one test: give the second its own instance tag, as a second process would have.
    original = participant_daemon.INSTANCE
    participant_daemon.INSTANCE = f"{socket.gethostname()} pid 1 second"
    try:
        second = await participant_factory(config)
        await poll_until(lambda: second.joined.is_set(), what="the second daemon joined")
    finally:
        participant_daemon.INSTANCE = original
    # The older one is told and stops for good; the newer one keeps the site's session.
    await poll_until(lambda: first.error is not None, what="the first daemon was told")
    assert first.error is not None
    assert "duplicate session" in first.error
    assert "pid 1 second" in first.error  # which daemon won
    await first.wait_stopped()
    events = coord.coordinator.store.audit_events("duplicate_session")
    assert [(e["actor"], e["detail"]["winner"], e["detail"]["replaced"]) for e in events] == [
        ("site-a", f"{socket.gethostname()} pid 1 second", original)
    ]
    sessions = coord.coordinator.registry.connected()
    assert [s.instance for s in sessions] == [f"{socket.gethostname()} pid 1 second"]
    assert second.error is None
    assert second.joined.is_set()
