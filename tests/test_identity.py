"""Identity fields beyond the chain (issue 9, item 5): the federation in a certificate's O, the wording of role
refusals, and who may download the current global model. Real certificates, real mutual-TLS gRPC."""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from support import (
    SITES,
    UNLISTED,
    CoordinatorFactory,
    Pki,
    cert_pem,
    channel,
    coordinator_config,
    download_model,
    job_config,
    join_request,
    key_pem,
    runner_of,
    tls,
    write_identity,
)

from common.ca import create_ca, issue_certificate, load_ca, new_private_key
from common.certs import Role, TlsFiles
from common.errors import CertificateError
from common.proto.cohort.v1 import cohort_pb2 as pb
from common.proto.cohort.v1 import cohort_pb2_grpc as pb_grpc
from coordinator.daemon import CoordinatorDaemon


def issued_by(ca_dir: Path, directory: Path, name: str, role: Role, federation: str, ca_pem: bytes) -> TlsFiles:
    """A certificate for ``name`` in ``role`` from the CA in ``ca_dir``, stamped with ``federation`` as its O."""
    ca_cert, ca_key = load_ca(ca_dir)
    key = new_private_key()
    now = dt.datetime.now(dt.UTC)
    cert = issue_certificate(
        ca_cert,
        ca_key,
        name=name,
        role=role,
        public_key=key.public_key(),
        not_before=now - dt.timedelta(minutes=5),
        not_after=now + dt.timedelta(days=1),
        federation=federation,
    )
    return write_identity(directory, ca_pem, cert_pem(cert), key_pem(key))


@pytest.fixture
async def coordinator(pki: Pki, tmp_path: Path, coordinator_factory: CoordinatorFactory) -> CoordinatorDaemon:
    daemon: CoordinatorDaemon = await coordinator_factory(
        coordinator_config(pki, tmp_path / "state", job=job_config(min_sites=5, min_available_sites=5))
    )
    return daemon


async def refusal(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


# --- the federation (O) ------------------------------------------------------------------------------------------


async def test_certificates_of_another_federation_from_a_trusted_ca_are_refused(
    coordinator: CoordinatorDaemon, pki: Pki, tmp_path: Path
) -> None:
    """The federation's own CA, but O names "other": the handshake succeeds, every call is UNAUTHENTICATED."""
    ca_dir, ca_pem = pki.root / "certs" / "ca", pki.coordinator.ca.read_bytes()
    site = issued_by(ca_dir, tmp_path / "site", SITES[0], Role.PARTICIPANT, "other", ca_pem)
    admin = issued_by(ca_dir, tmp_path / "admin", "admin", Role.ADMIN, "other", ca_pem)
    address, ca = coordinator.address, pki.coordinator.ca
    async with channel(address, site, ca) as ch:
        err = await refusal(pb_grpc.FederationStub(ch).Join(join_request(), timeout=10))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "issued for federation 'other' (its O)" in (err.details() or "")
    assert "this coordinator serves federation 'test'" in (err.details() or "")
    async with channel(address, admin, ca) as ch:
        err = await refusal(pb_grpc.AdminStub(ch).GetStatus(pb.StatusRequest(), timeout=10))
        again = await refusal(pb_grpc.AdminStub(ch).GetStatus(pb.StatusRequest(), timeout=10))
    assert err.code() == again.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "federation 'other'" in (err.details() or "")
    assert coordinator.coordinator.registry.sessions() == []
    refusals = [e for e in coordinator.coordinator.store.audit_events("rpc_refused") if "federation" in str(e)]
    # One event per caller and call: the second GetStatus is counted into the next window's event, not written.
    assert [(e["actor"], e["detail"]["method"], e["detail"]["code"]) for e in refusals] == [
        (SITES[0], "Join", "UNAUTHENTICATED"),
        ("admin", "GetStatus", "UNAUTHENTICATED"),
    ]


async def test_certificates_of_another_federations_ca_in_the_bundle_are_refused(
    pki: Pki, tmp_path: Path, coordinator_factory: CoordinatorFactory
) -> None:
    """ca.crt trusts two federations' CAs (say, during a merger): a site of the other one is still refused."""
    other_cert, other_key = create_ca("other", 30)
    bundle = tmp_path / "bundle.crt"
    bundle.write_bytes(pki.coordinator.ca.read_bytes() + cert_pem(other_cert))
    key = new_private_key()
    now = dt.datetime.now(dt.UTC)
    cert = issue_certificate(
        other_cert,
        other_key,
        name=SITES[1],
        role=Role.PARTICIPANT,
        public_key=key.public_key(),
        not_before=now - dt.timedelta(minutes=5),
        not_after=now + dt.timedelta(days=1),
        federation="other",
    )
    stranger = write_identity(tmp_path / "stranger", bundle.read_bytes(), cert_pem(cert), key_pem(key))
    config = coordinator_config(pki, tmp_path / "state")
    config = replace(config, server=replace(config.server, tls=replace(tls(pki.coordinator), ca=bundle)))
    coord = await coordinator_factory(config)
    async with channel(coord.address, stranger, bundle) as ch:
        err = await refusal(pb_grpc.FederationStub(ch).Join(join_request(), timeout=10))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "federation 'other'" in (err.details() or "")
    async with channel(coord.address, pki.site(SITES[1]), pki.coordinator.ca) as ch:
        reply = await pb_grpc.FederationStub(ch).Join(join_request(), timeout=10)
    assert reply.site_id == SITES[1]  # this federation's own site still joins


async def test_coordinator_refuses_to_start_with_a_certificate_of_another_federation(pki: Pki, tmp_path: Path) -> None:
    config = coordinator_config(pki, tmp_path / "state")
    config = replace(config, federation=replace(config.federation, name="elsewhere"))
    with pytest.raises(CertificateError, match=r"federation 'test' \(its O\), but federation.name is 'elsewhere'"):
        await CoordinatorDaemon(config).start()


# --- roles ------------------------------------------------------------------------------------------------------


async def test_role_refusals_read_an_admin_and_a_participant(coordinator: CoordinatorDaemon, pki: Pki) -> None:
    async with channel(coordinator.address, pki.site(SITES[0]), pki.coordinator.ca) as ch:
        err = await refusal(pb_grpc.AdminStub(ch).GetStatus(pb.StatusRequest(), timeout=10))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert (err.details() or "").startswith(
        "this call needs an admin certificate; the caller presented a participant certificate for 'site-a'"
    )
    async with channel(coordinator.address, pki.admin, pki.coordinator.ca) as ch:
        err = await refusal(pb_grpc.FederationStub(ch).Join(join_request(), timeout=10))
    assert "needs a participant certificate; the caller presented an admin certificate" in (err.details() or "")


# --- who may download the global model -----------------------------------------------------------------------------


async def download(address: str, files: TlsFiles, ca: Path, job_id: str, version: str) -> dict[str, torch.Tensor]:
    async with channel(address, files, ca) as ch:
        return await download_model(pb_grpc.FederationStub(ch), job_id, version)


async def test_any_allow_listed_site_may_download_the_current_global_model(
    coordinator: CoordinatorDaemon, pki: Pki
) -> None:
    """Documented in SECURITY.md: not only the round's cohort. Not unlisted sites, not admins, not old versions."""
    runner = runner_of(coordinator)
    row = coordinator.coordinator.store.job(runner.job_id)
    assert row is not None
    version, address, ca = row["model_version"], coordinator.address, pki.coordinator.ca
    # SITES[2] never joined, so it is in no cohort: it still gets the model, and it hashes to the version asked for.
    tensors = await download(address, pki.site(SITES[2]), ca, runner.job_id, version)
    assert tensors
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await download(address, pki.site(UNLISTED), ca, runner.job_id, version)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await download(address, pki.admin, ca, runner.job_id, version)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await download(address, pki.site(SITES[2]), ca, runner.job_id, "sha256:" + "0" * 64)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
