"""The timeout model: liveness from heartbeats, rounds bounded by their deadline, over-selection.

A site that stops answering is dropped within one heartbeat interval; a round never waits past round_timeout_s (its
secure-aggregation stages included); with over-selection a round closes as soon as the sites it needs reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
import yaml
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
)

from common.config import build
from common.errors import ConfigError
from common.proto.cohort.v1 import cohort_pb2 as pb
from common.proto.cohort.v1 import cohort_pb2_grpc as pb_grpc
from coordinator.config import JobConfig, SecureAggregationConfig
from coordinator.round.rules import DeadlinePassed, RoundState, UploadAccepted

REPO = Path(__file__).resolve().parent.parent


@contextlib.asynccontextmanager
async def silent_site(address: str, pki: Pki, site: str) -> AsyncIterator[None]:
    """A site that joins, heartbeats and holds its work stream open, but never does the work it is given."""
    ch = channel(address, pki.site(site), pki.coordinator.ca)
    stub = pb_grpc.FederationStub(ch)
    reply = await stub.Join(join_request())
    stream = stub.WaitForWork(pb.WaitRequest(session_id=reply.session_id))

    async def drain() -> None:
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
            async for _ in stream:
                pass

    async def alive() -> None:
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
            while True:
                await asyncio.sleep(reply.heartbeat_interval_s / 3)
                await stub.Heartbeat(pb.HeartbeatRequest(session_id=reply.session_id))

    tasks = [asyncio.create_task(drain()), asyncio.create_task(alive())]
    try:
        yield
    finally:
        stream.cancel()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await ch.close()


# -- the round state machine ---------------------------------------------------------------------------------------


def test_over_selected_round_closes_at_its_target() -> None:
    state = RoundState(frozenset("abcde"), min_sites=2, target=3)
    assert state.handle(UploadAccepted("a")) == []
    assert state.handle(UploadAccepted("b")) == []
    (action,) = state.handle(UploadAccepted("c"))
    assert action.succeeded
    assert "target 3" in action.reason
    assert state.refusal("d") is not None  # a straggler's upload is refused once the round closed


def test_target_must_lie_between_min_sites_and_the_cohort() -> None:
    with pytest.raises(ValueError, match="target"):
        RoundState(frozenset("abc"), min_sites=2, target=1)
    with pytest.raises(ValueError, match="target"):
        RoundState(frozenset("abc"), min_sites=2, target=4)


def test_deadline_closes_with_what_arrived() -> None:
    state = RoundState(frozenset("abcd"), min_sites=2, target=3)
    state.handle(UploadAccepted("a"))
    state.handle(UploadAccepted("b"))
    (action,) = state.handle(DeadlinePassed())
    assert action.succeeded


def test_over_selection_is_validated() -> None:
    with pytest.raises(ConfigError, match="over_selection"):
        build(JobConfig, {"task": "breast_cancer", "over_selection": 1.5}, "job")
    with pytest.raises(ConfigError, match="over_selection"):
        build(JobConfig, {"task": "breast_cancer", "over_selection": -0.1}, "job")


def test_unmasking_reserve_is_part_of_the_round() -> None:
    secure = SecureAggregationConfig(enabled=True, stage_timeout_s=30)
    assert job_config(round_timeout_s=300, secure_aggregation=secure).unmask_reserve_s == 60
    assert job_config(round_timeout_s=40, secure_aggregation=secure).unmask_reserve_s == 10  # at most a quarter
    assert job_config(round_timeout_s=40).unmask_reserve_s == 0


# -- end to end over mutual TLS ------------------------------------------------------------------------------------


async def test_over_selected_round_does_not_wait_for_a_straggler(
    pki: Pki,
    site_data: dict[str, Path],
    tmp_path: Path,
    coordinator_factory: CoordinatorFactory,
    participant_factory: ParticipantFactory,
) -> None:
    # k = 2 sites per round (fraction 0.5 of 4), over-selected to 4: one of them never answers.
    job = job_config(
        rounds=2,
        min_sites=2,
        min_available_sites=4,
        fraction=0.5,
        over_selection=1.0,
        round_timeout_s=10,
        evaluate_every=0,
    )
    coord = await coordinator_factory(coordinator_config(pki, tmp_path / "state", sites=SITES[:4], job=job))
    async with silent_site(coord.address, pki, SITES[3]):
        for site in SITES[:3]:
            await participant_factory(participant_config(pki.site(site), coord.address, site_data[site]))
        runner = runner_of(coord)
        await poll_until(lambda: runner.state != "running", timeout=90, what="the job to finish")
    assert runner.state == "finished", runner.detail
    rounds = coord.coordinator.store.rounds(runner.job_id)
    assert [(r.round, r.state) for r in rounds] == [(1, "completed"), (2, "completed")]
    for r in rounds:
        assert len(r.cohort) == 4
        assert len(r.reported) == 2
        assert SITES[3] not in r.reported
        assert "target 2" in r.detail  # closed by its target, not by the deadline
        assert r.finished is not None
        assert r.finished - r.started < 10


async def test_round_never_waits_past_its_deadline(
    pki: Pki,
    site_data: dict[str, Path],
    tmp_path: Path,
    coordinator_factory: CoordinatorFactory,
    participant_factory: ParticipantFactory,
) -> None:
    """Secure aggregation with a stage timeout far longer than the round: every stage is cut at the round's end."""
    secure = SecureAggregationConfig(enabled=True, clip=1.0, weight_cap=1000, stage_timeout_s=600)
    timeout = 8.0
    job = job_config(rounds=1, min_sites=2, round_timeout_s=timeout, evaluate_every=0, secure_aggregation=secure)
    job = replace(job, max_round_retries=0)
    coord = await coordinator_factory(coordinator_config(pki, tmp_path / "state", sites=SITES[:4], job=job))
    async with silent_site(coord.address, pki, SITES[3]):
        for site in SITES[:3]:
            await participant_factory(participant_config(pki.site(site), coord.address, site_data[site]))
        runner = runner_of(coord)
        await poll_until(lambda: runner.state != "running", timeout=60, what="the job to end")
    (row,) = coord.coordinator.store.rounds(runner.job_id)
    assert row.finished is not None
    # The silent site never advertised keys; without the round deadline the first stage alone would wait 600 s.
    assert row.finished - row.started <= timeout + 2.0, row.detail
    assert SITES[3] not in row.reported


async def test_frozen_site_is_dropped_within_one_heartbeat_interval(
    pki: Pki,
    site_data: dict[str, Path],
    tmp_path: Path,
    coordinator_factory: CoordinatorFactory,
) -> None:
    """SIGSTOP a participant process: its TCP connection stays up (the kernel still answers), but it no longer
    answers HTTP/2 pings; the coordinator drops the site within one heartbeat interval (plus scheduling slack)."""
    heartbeat = 2.0
    coord = await coordinator_factory(coordinator_config(pki, tmp_path / "state", heartbeat_s=heartbeat))
    site = SITES[0]
    files = pki.site(site)
    config = {
        "coordinator": {"address": coord.address},
        "tls": {"ca": str(files.ca), "cert": str(files.cert), "key": str(files.key)},
        "data_dir": str(site_data[site]),
        "task": "breast_cancer",
        "reconnect": {"initial_backoff_s": 0.1, "max_backoff_s": 1.0},
    }
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cohort_cli",
        "participant",
        "--config",
        str(path),
        cwd=REPO,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    registry = coord.coordinator.registry
    try:
        await poll_until(
            lambda: any(s.site == site and s.beats for s in registry.connected()), timeout=60, what="a heartbeat"
        )
        os.kill(proc.pid, signal.SIGSTOP)
        stopped = time.monotonic()
        await poll_until(
            lambda: site not in {s.site for s in registry.connected()}, timeout=30, what="the site to be dropped"
        )
        dropped_after = time.monotonic() - stopped
        assert dropped_after <= heartbeat + 1.0, f"dropped after {dropped_after:.2f}s"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
        await proc.wait()
