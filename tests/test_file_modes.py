"""What the coordinator and a participant write is theirs alone, whatever the umask (issue 9, item 3).

Every directory they create is 0700 and every file 0600; an existing directory (or file) that group or others may
write is refused, one they may only read is tightened. A real federation runs under umask 000 and 022 and every path
it leaves (and the spooled updates of an open round) is checked; the certificate commands follow the same rules.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from support import (
    SITES,
    CoordinatorFactory,
    ParticipantFactory,
    Pki,
    channel,
    coordinator_config,
    job_config,
    join_request,
    participant_config,
    poll_until,
    runner_of,
    wait_ready_file,
)

from common import ca, files
from common.certs import Role
from common.errors import ConfigError
from common.proto.cohort.v1 import cohort_pb2 as pb
from common.proto.cohort.v1 import cohort_pb2_grpc as pb_grpc
from coordinator.config import PrivacyConfig
from coordinator.daemon import CoordinatorDaemon
from participant.config import RecordPrivacyConfig
from participant.record_dp import SiteBudget

ROOT = Path(__file__).resolve().parent.parent
UMASKS = [pytest.param(0o000, id="umask000"), pytest.param(0o022, id="umask022")]


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def loose(root: Path) -> list[str]:
    """Every path under ``root`` (and ``root``) that group or others may read, write or traverse."""
    paths = [root, *root.rglob("*")]
    return [f"{p} {mode(p):04o}" for p in paths if not p.is_symlink() and mode(p) & 0o077]


def relative_paths(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


def shared_dir(path: Path, bits: int) -> Path:
    path.mkdir(parents=True)
    path.chmod(bits)
    return path


# --- the helpers ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask", UMASKS)
def test_created_directories_and_files_are_owner_only(tmp_path: Path, mask: int) -> None:
    with umask(mask):
        deep = files.private_dir(tmp_path / "a" / "b" / "c")
        files.write_atomic(deep / "ledger.json", b"{}")
        files.write_atomic(deep / "tls.crt", b"public", mode=0o644)
        with files.open_private(deep / "update.part") as f:
            f.write(b"x")
        files.create_private(deep / "model.tmp")
    assert [mode(tmp_path / p) for p in ("a", "a/b", "a/b/c")] == [0o700] * 3
    assert {p.name: mode(p) for p in deep.iterdir()} == {
        "ledger.json": 0o600,
        "tls.crt": 0o644,  # asked for: a certificate is public
        "update.part": 0o600,
        "model.tmp": 0o600,
    }


@pytest.mark.parametrize("bits", [0o777, 0o770, 0o722, 0o1777])
def test_a_directory_others_may_write_is_refused(tmp_path: Path, bits: int) -> None:
    path = shared_dir(tmp_path / "shared", bits)
    with pytest.raises(ConfigError, match=r"state_dir: directory .*shared is writable by group or others"):
        files.private_dir(path, "state_dir")
    with pytest.raises(ConfigError, match="chmod"):
        files.check_not_shared(path, "state_dir")
    assert mode(path) == bits  # refused, not changed


def test_a_directory_others_may_read_is_tightened_only_when_asked(tmp_path: Path) -> None:
    mine, shared = shared_dir(tmp_path / "mine", 0o755), shared_dir(tmp_path / "shared", 0o755)
    files.private_dir(mine, "state_dir")
    files.private_dir(shared, "ledger directory", tighten=False)
    assert (mode(mine), mode(shared)) == (0o700, 0o755)


def test_private_writes_do_not_follow_a_planted_symlink(tmp_path: Path) -> None:
    target = tmp_path / "victim"
    target.write_bytes(b"keep")
    (tmp_path / "update.part").symlink_to(target)
    with pytest.raises(OSError, match=r"symbolic links|Too many levels"):
        files.open_private(tmp_path / "update.part")
    files.write_atomic(tmp_path / "update.part", b"new")  # replaces the link itself, never writes through it
    assert target.read_bytes() == b"keep"
    assert not (tmp_path / "update.part").is_symlink()


def test_private_tree_tightens_old_files_and_refuses_shared_ones(tmp_path: Path) -> None:
    root = shared_dir(tmp_path / "state", 0o755)
    shared_dir(root / "models", 0o755)
    (root / "models" / "m.safetensors").write_bytes(b"m")
    (root / "models" / "m.safetensors").chmod(0o644)
    files.private_tree(root, "state_dir")
    assert loose(root) == []
    (root / "coordinator.db").write_bytes(b"db")
    (root / "coordinator.db").chmod(0o666)
    with pytest.raises(ConfigError, match=r"file .*coordinator.db is writable by group or others"):
        files.private_tree(root, "state_dir")


# --- the coordinator ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [0o770, 0o777])
async def test_coordinator_refuses_a_state_dir_others_may_write(pki: Pki, tmp_path: Path, bits: int) -> None:
    state = shared_dir(tmp_path / "state", bits)
    daemon = CoordinatorDaemon(coordinator_config(pki, state))
    with pytest.raises(ConfigError, match=r"^state_dir: directory .* is writable by group or others"):
        await daemon.start()
    assert list(state.iterdir()) == []  # nothing was created in it


async def test_coordinator_tightens_a_state_dir_an_older_version_left_readable(
    pki: Pki, tmp_path: Path, coordinator_factory: CoordinatorFactory
) -> None:
    state = shared_dir(tmp_path / "state", 0o755)
    shared_dir(state / "models", 0o755)
    (state / "models" / "old.safetensors").write_bytes(b"old")
    (state / "models" / "old.safetensors").chmod(0o644)
    await coordinator_factory(coordinator_config(pki, state))
    assert loose(state) == []


@pytest.mark.slow
def test_cohort_coordinator_exits_with_one_line_on_a_shared_state_dir(pki: Pki, tmp_path: Path) -> None:
    state = shared_dir(tmp_path / "state", 0o777)
    c = pki.coordinator
    config = tmp_path / "coordinator.yaml"
    config.write_text(
        "federation: {name: test, sites: [site-a]}\n"
        f"server: {{listen: '127.0.0.1:0', tls: {{ca: '{c.ca}', cert: '{c.cert}', key: '{c.key}'}}}}\n"
        f"state_dir: '{state}'\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "cohort_cli", "coordinator", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"cohort coordinator: error: state_dir: directory {state} is writable by group")


@pytest.mark.slow
def test_cohort_coordinator_under_umask_000_writes_owner_only(pki: Pki, tmp_path: Path) -> None:
    """The real command (its filter process and ready file included), started with a umask that removes nothing."""
    c = pki.coordinator
    config, ready, state = tmp_path / "coordinator.yaml", tmp_path / "run" / "ready", tmp_path / "state"
    (tmp_path / "run").mkdir(mode=0o700)
    config.write_text(
        "federation: {name: test, sites: [site-a]}\n"
        f"server: {{listen: '127.0.0.1:0', tls: {{ca: '{c.ca}', cert: '{c.cert}', key: '{c.key}'}}}}\n"
        f"state_dir: '{state}'\n"
    )
    argv = [sys.executable, "-m", "cohort_cli", "coordinator", "--config", str(config), "--ready-file", str(ready)]
    proc = subprocess.Popen(argv, cwd=ROOT, stderr=subprocess.PIPE, text=True, umask=0)
    try:
        wait_ready_file(ready, proc, 60, lambda: str(proc.communicate()))
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert loose(state) == []
    assert loose(tmp_path / "run") == []
    assert {"coordinator.db", "models"} <= {p.name for p in state.iterdir()}


# --- a participant's privacy ledger -------------------------------------------------------------------------------


def test_ledger_others_may_write_is_refused_and_a_readable_one_tightened(tmp_path: Path) -> None:
    shared = shared_dir(tmp_path / "shared", 0o777)
    with pytest.raises(ConfigError, match=r"state_file's directory: directory .* is writable by group"):
        SiteBudget(1.0, 1e-5, shared / "privacy.json")
    budget = SiteBudget(1.0, 1e-5, tmp_path / "site" / "privacy.json")
    budget.record(10, 0.1, 1.0)
    ledger = tmp_path / "site" / "privacy.json"
    ledger.chmod(0o664)
    with pytest.raises(ConfigError, match=r"privacy.state_file: file .* is writable by group or others"):
        SiteBudget(1.0, 1e-5, ledger)
    ledger.chmod(0o644)
    assert SiteBudget(1.0, 1e-5, ledger).steps == 10  # read back, and now owner-only
    assert mode(ledger) == 0o600


# --- a real federation, under a permissive and the usual umask ------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("mask", UMASKS)
async def test_nothing_a_federation_writes_is_readable_by_others(
    pki: Pki,
    site_data: dict[str, Path],
    tmp_path: Path,
    coordinator_factory: CoordinatorFactory,
    participant_factory: ParticipantFactory,
    mask: int,
) -> None:
    """Plaintext updates (secure aggregation off) spooled in an open round, models, SQLite and its WAL, ledgers."""
    with umask(mask):
        job = replace(
            job_config(rounds=1, min_sites=2, min_available_sites=3, evaluate_every=0, round_timeout_s=120),
            privacy=PrivacyConfig(unit="record", delta=1e-5),
        )
        state = tmp_path / "coordinator" / "state"  # the parent does not exist either: created 0700 as well
        coord = await coordinator_factory(coordinator_config(pki, state, sites=SITES[:3], job=job))
        runner = runner_of(coord)
        ledgers = {site: tmp_path / site / "ledger" / "privacy.json" for site in SITES[:2]}
        async with contextlib.AsyncExitStack() as stack:
            # The third site joins by hand and keeps the round open until the test has looked at the spool.
            ch = await stack.enter_async_context(channel(coord.address, pki.site(SITES[2]), pki.coordinator.ca))
            stub = pb_grpc.FederationStub(ch)
            joined = await stub.Join(join_request(), timeout=10)
            stream = stub.WaitForWork(pb.WaitRequest(session_id=joined.session_id))
            stack.callback(stream.cancel)
            leave = asyncio.Event()
            interval = coord.config.server.heartbeat_interval_s
            beats = asyncio.create_task(heartbeats(stub, joined.session_id, leave, interval))
            for site in SITES[:2]:
                privacy = RecordPrivacyConfig(enabled=True, target_epsilon=1e9, state_file=ledgers[site])
                cfg = participant_config(pki.site(site), coord.address, site_data[site])
                await participant_factory(replace(cfg, privacy=privacy))

            def spooled() -> list[Path]:
                return sorted(state.glob("spool/*/round-1-*/*.update"))

            await poll_until(lambda: len(spooled()) == 2, timeout=120, what="both real sites' spooled updates")
            open_round = loose(tmp_path)
            leave.set()
            await beats
        # Without its heartbeats the third site drops out; the round closes with the two others.
        await poll_until(lambda: runner.state != "running", timeout=120, what="the job to finish")
    assert runner.state == "finished", runner.detail
    assert open_round == []
    assert loose(tmp_path) == []
    written = relative_paths(tmp_path)
    assert {"coordinator/state/coordinator.db", "coordinator/state/coordinator.db-wal"} <= written
    assert any(p.startswith("coordinator/state/models/") and p.endswith(".safetensors") for p in written)
    assert all(path.exists() for path in ledgers.values())


async def heartbeats(
    stub: pb_grpc.FederationAsyncStub, session_id: str, stop: asyncio.Event, interval_s: float
) -> None:
    while not stop.is_set():
        await stub.Heartbeat(pb.HeartbeatRequest(session_id=session_id), timeout=10)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval_s / 4)


# --- certificate commands ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask", UMASKS)
def test_cert_commands_create_owner_only_directories(tmp_path: Path, mask: int) -> None:
    with umask(mask):
        ids = ca.init_federation(tmp_path / "pki", sites=["site-a"], federation="test")
        key_path, _ = ca.create_csr(tmp_path / "csr", "site-b")
    dirs = [p for p in (tmp_path / "pki").rglob("*") if p.is_dir()] + [tmp_path / "pki", key_path.parent]
    assert {mode(d) for d in dirs} == {0o700}
    assert {mode(f.key) for f in ids.values()} | {mode(key_path)} == {0o600}
    assert {mode(f.cert) for f in ids.values()} == {0o644}


def test_cert_commands_refuse_directories_others_may_write(tmp_path: Path) -> None:
    ids = ca.init_federation(tmp_path / "pki", sites=["site-a"], federation="test")
    ca_dir = ids["coordinator"].ca.parent.parent / "ca"
    shared = shared_dir(tmp_path / "shared", 0o777)
    with pytest.raises(ConfigError, match=r"--out: directory .*shared is writable by group or others"):
        ca.init_federation(shared, sites=["site-a"])
    assert list(shared.iterdir()) == []  # refused before anything was written
    with pytest.raises(ConfigError, match="writable by group or others"):
        ca.issue_identity(ca_dir, shared, "site-c", Role.PARTICIPANT)
    with pytest.raises(ConfigError, match="writable by group or others"):
        ca.create_csr(shared_dir(tmp_path / "group", 0o775), "site-d")
    assert list(shared.iterdir()) == []


def test_cert_commands_tighten_a_key_directory_but_not_a_certificate_outbox(tmp_path: Path) -> None:
    ids = ca.init_federation(tmp_path / "pki", sites=["site-a"], federation="test")
    ca_dir = ids["coordinator"].ca.parent.parent / "ca"
    keys = shared_dir(tmp_path / "keys", 0o755)
    ca.issue_identity(ca_dir, keys, "site-c", Role.PARTICIPANT)
    assert mode(keys) == 0o700
    _, csr = ca.create_csr(tmp_path / "site-d", "site-d")
    outbox = shared_dir(tmp_path / "outbox", 0o755)
    ca.sign_csr(ca_dir, csr, outbox / "site-d.crt")
    assert mode(outbox) == 0o755  # only certificates went there; they are public
    assert {p.name: mode(p) for p in outbox.iterdir()} == {"site-d.crt": 0o644, "ca.crt": 0o644}


def test_cohort_certs_add_prints_one_line_for_a_shared_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cohort_cli.main import main

    ca.init_federation(tmp_path / "pki", sites=["site-a"], federation="test")
    shared = shared_dir(tmp_path / "shared", 0o777)
    rc = main(["certs", "add", "--ca", str(tmp_path / "pki" / "ca"), "--out", str(shared), "--name", "site-c"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "writable by group or others" in err[0]
