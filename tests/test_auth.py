"""Who may talk to the coordinator: mutual TLS, the allow-list, certificate roles, and the job's task identity."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from support import (
    SITES,
    UNLISTED,
    CoordinatorFactory,
    Pki,
    channel,
    coordinator_config,
    job_config,
    join_request,
    runner_of,
)

from common.certs import TlsFiles
from common.proto.cohort.v1 import cohort_pb2 as pb
from common.proto.cohort.v1 import cohort_pb2_grpc as pb_grpc
from coordinator.daemon import CoordinatorDaemon


async def join(address: str, files: TlsFiles | None, ca: Path, request: pb.JoinRequest) -> pb.JoinReply:
    async with channel(address, files, ca) as ch:
        reply: pb.JoinReply = await pb_grpc.FederationStub(ch).Join(request, timeout=10)
        return reply


@pytest.fixture
async def coordinator(pki: Pki, tmp_path: Path, coordinator_factory: CoordinatorFactory) -> CoordinatorDaemon:
    # A running job (that waits for sites) so joins are checked against its task.
    daemon: CoordinatorDaemon = await coordinator_factory(
        coordinator_config(pki, tmp_path / "state", job=job_config(min_sites=5))
    )
    return daemon


@pytest.mark.parametrize("who", ["none", "foreign", "expired"])
async def test_tls_handshake_refuses_bad_client_certificates(
    coordinator: CoordinatorDaemon, pki: Pki, who: str
) -> None:
    files = {"none": None, "foreign": pki.foreign, "expired": pki.expired}[who]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await join(coordinator.address, files, pki.coordinator.ca, join_request())
    # The TLS handshake fails before any RPC runs, so gRPC reports the channel as unavailable.
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert coordinator.coordinator.registry.sessions() == []


async def test_site_not_on_allow_list_is_refused(coordinator: CoordinatorDaemon, pki: Pki) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await join(coordinator.address, pki.site(UNLISTED), pki.coordinator.ca, join_request())
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "allow-list" in (info.value.details() or "")
    assert coordinator.coordinator.registry.sessions() == []
    refusals = coordinator.coordinator.store.audit_events("join_refused")
    assert [e["actor"] for e in refusals] == [UNLISTED]


async def test_valid_site_joins_with_identity_from_certificate(coordinator: CoordinatorDaemon, pki: Pki) -> None:
    reply = await join(coordinator.address, pki.site(SITES[1]), pki.coordinator.ca, join_request())
    assert reply.site_id == SITES[1]
    assert reply.job_id == runner_of(coordinator).job_id
    assert reply.heartbeat_interval_s > 0


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        ("task_digest", "sha256:" + "0" * 64, "task code digest"),
        ("schema_fingerprint", "sha256:" + "1" * 64, "data schema"),
        ("task_name", "digits", "task name"),
    ],
)
async def test_wrong_task_or_schema_is_failed_precondition(
    coordinator: CoordinatorDaemon, pki: Pki, field: str, value: str, named: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await join(coordinator.address, pki.site(SITES[0]), pki.coordinator.ca, join_request(**{field: value}))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert named in (info.value.details() or "")
    assert coordinator.coordinator.registry.sessions() == []


async def test_roles_are_enforced_both_ways(coordinator: CoordinatorDaemon, pki: Pki) -> None:
    # A participant certificate cannot use the admin API ...
    async with channel(coordinator.address, pki.site(SITES[0]), pki.coordinator.ca) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await pb_grpc.AdminStub(ch).GetStatus(pb.StatusRequest(), timeout=10)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # ... and an admin certificate cannot join as a site.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await join(coordinator.address, pki.admin, pki.coordinator.ca, join_request())
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    async with channel(coordinator.address, pki.admin, pki.coordinator.ca) as ch:
        status = await pb_grpc.AdminStub(ch).GetStatus(pb.StatusRequest(), timeout=10)
    assert [s.site_id for s in status.sites] == sorted(SITES)


async def test_health_service_reports_serving(coordinator: CoordinatorDaemon, pki: Pki) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with channel(coordinator.address, pki.admin, pki.coordinator.ca) as ch:
        reply = await health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="cohort.v1.Federation"), timeout=10
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
