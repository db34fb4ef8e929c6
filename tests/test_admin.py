"""The admin surface: start, stop and inspect jobs with an admin certificate."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from support import (
    SITES,
    CoordinatorFactory,
    ParticipantFactory,
    Pki,
    coordinator_config,
    participant_config,
    poll_until,
)

from cohort_cli.admin_client import AdminEndpoint, get_status, start_job, stop_job
from common.proto.cohort.v1 import cohort_pb2 as pb


def endpoint(pki: Pki, address: str) -> AdminEndpoint:
    return AdminEndpoint(address=address, tls=pki.admin)


async def test_start_status_stop(
    pki: Pki,
    site_data: dict[str, Path],
    tmp_path: Path,
    coordinator_factory: CoordinatorFactory,
    participant_factory: ParticipantFactory,
) -> None:
    coord = await coordinator_factory(coordinator_config(pki, tmp_path / "state"))
    ep = endpoint(pki, coord.address)
    status = await get_status(ep)
    assert status.jobs == []
    assert [s.connected for s in status.sites] == [False] * len(SITES)

    # A bad spec is refused with a message naming the key; nothing is created.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await start_job(ep, pb.JobSpec(task="breast_cancer", fraction=3.0))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "job.fraction" in (info.value.details() or "")
    # An explicit zero is a value, not "unset" (every JobSpec scalar has presence): rounds=0 is refused by name.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await start_job(ep, pb.JobSpec(task="breast_cancer", rounds=0))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "job.rounds" in (info.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await start_job(ep, pb.JobSpec(task="no_such_task", rounds=1))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert (await get_status(ep)).jobs == []

    # A long job that needs more sites than are connected: it waits, and can be stopped.
    job = await start_job(ep, pb.JobSpec(task="breast_cancer", name="long", rounds=50, min_sites=2))
    assert job.state == "running"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await start_job(ep, pb.JobSpec(task="breast_cancer", rounds=1))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "still running" in (info.value.details() or "")

    await participant_factory(participant_config(pki.site(SITES[0]), coord.address, site_data[SITES[0]]))
    await poll_until(lambda: coord.coordinator.registry.connected() != [], what="the site to connect")
    status = await get_status(ep)
    assert [s.site_id for s in status.sites if s.connected] == [SITES[0]]

    stopped = await stop_job(ep, job.job_id, "operator test")
    assert stopped.job_id == job.job_id
    await poll_until(lambda: coord.coordinator.runner is not None and coord.coordinator.runner.state != "running")
    [final] = (await get_status(ep)).jobs
    assert final.state == "stopped"
    assert final.detail == "operator test"
    events = [e["kind"] for e in coord.coordinator.store.audit_events()]
    assert "job_submitted" in events
    assert "job_stop_requested" in events
    assert "job_stopped" in events
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stop_job(ep, job.job_id, "again")
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
