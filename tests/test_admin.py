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

from cohort_cli.admin_client import AdminEndpoint, cancel_job, get_status, start_job, stop_job
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
    # A second start while a job runs is accepted and queued behind it (docs/CONFIG.md "Jobs"); its spec is checked
    # now, so a bad second job is still refused, and nothing is recorded for it.
    queued = await start_job(ep, pb.JobSpec(task="breast_cancer", rounds=1))
    assert queued.state == "queued"
    assert queued.waiting == f"queued: position 1, starts after job {job.job_id}"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await start_job(ep, pb.JobSpec(task="no_such_task", rounds=1))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await start_job(ep, pb.JobSpec(task="breast_cancer", fraction=3.0))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [j.job_id for j in (await get_status(ep)).jobs] == [job.job_id, queued.job_id]
    # A queued job is cancelled, not stopped; a running one is stopped, not cancelled.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stop_job(ep, queued.job_id, "")
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"cohort job cancel {queued.job_id}" in (info.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await cancel_job(ep, job.job_id, "")
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"cohort job stop {job.job_id}" in (info.value.details() or "")
    cancelled = await cancel_job(ep, queued.job_id, "")
    assert cancelled.state == "cancelled"
    assert cancelled.detail == "cancelled by admin admin while queued"

    await participant_factory(participant_config(pki.site(SITES[0]), coord.address, site_data[SITES[0]]))
    await poll_until(lambda: coord.coordinator.registry.connected() != [], what="the site to connect")
    status = await get_status(ep)
    assert [s.site_id for s in status.sites if s.connected] == [SITES[0]]
    # The waiting job says what it waits for.
    [waiting] = [j for j in status.jobs if j.job_id == job.job_id]
    assert waiting.waiting.startswith("waiting for sites before round 1: 1 of 2 needed sites can run this job")
    assert f"{len(SITES) - 1} allow-listed sites not connected" in waiting.waiting

    # The stop answers with the state the job reached.
    stopped = await stop_job(ep, job.job_id, "operator test")
    assert stopped.job_id == job.job_id
    assert stopped.state == "stopped"
    final, gone = (await get_status(ep)).jobs
    assert (final.state, gone.state) == ("stopped", "cancelled")
    assert final.detail == "operator test"
    assert final.waiting == ""
    events = [e["kind"] for e in coord.coordinator.store.audit_events()]
    assert "job_submitted" in events
    assert "job_queued" in events
    assert "job_cancelled" in events
    assert "job_stop_requested" in events
    assert "job_stopped" in events
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stop_job(ep, job.job_id, "again")
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
