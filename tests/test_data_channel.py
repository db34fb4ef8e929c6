"""The bulk data channel (server.data_listen): models and updates over a second mutual-TLS port.

The same job gives the same model over the data channel as over gRPC; a hand-driven site's bad requests get the
status and message gRPC would give and change nothing, and the connection stays usable after a refusal; identity
comes from the certificate; a site that cannot reach the data port finishes the job over gRPC.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
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
    update_header,
)

from common import bulk_wire as wire
from common.certs import TlsFiles
from common.proto.cohort.v1 import cohort_pb2 as pb
from common.proto.cohort.v1 import cohort_pb2_grpc as pb_grpc
from common.serde import encode
from coordinator.config import CoordinatorConfig
from coordinator.daemon import CoordinatorDaemon
from participant.bulk import BulkClient, client_context
from participant.config import CoordinatorEndpoint
from participant.daemon import ParticipantDaemon


def _transfers(daemon: ParticipantDaemon) -> int:
    """Transfers the site made over the data channel."""
    assert daemon.connection is not None
    return daemon.connection.bulk.transfers


def _with_data_channel(config: CoordinatorConfig, on: bool = True) -> CoordinatorConfig:
    return replace(config, server=replace(config.server, data_listen="auto" if on else "off"))


async def _run_job(
    pki: Pki,
    site_data: dict[str, Path],
    state: Path,
    coordinator_factory: CoordinatorFactory,
    participant_factory: ParticipantFactory,
    *,
    data_channel: bool,
    secure: bool = False,
) -> tuple[dict[str, torch.Tensor], list[int], dict[tuple[str, str], float]]:
    job = job_config(rounds=2, min_sites=3, evaluate_every=0)
    if secure:
        job = replace(job, secure_aggregation=replace(job.secure_aggregation, enabled=True, clip=1.0))
    config = coordinator_config(pki, state, job=job)
    coord = await coordinator_factory(_with_data_channel(config, data_channel))
    assert (coord.coordinator.data_port != 0) is data_channel
    daemons = [
        await participant_factory(participant_config(pki.site(site), coord.address, site_data[site]))
        for site in SITES[:3]
    ]
    runner = runner_of(coord)
    await poll_until(lambda: runner.state != "running", timeout=120, what="the job to finish")
    assert runner.state == "finished", runner.detail
    transfers = [_transfers(d) for d in daemons]
    final = coord.coordinator.models.load(runner.global_model.version)
    assert coord.coordinator.ops is not None
    counter = coord.coordinator.ops.metrics.transfers
    metrics = {
        (channel, direction): counter.labels(channel, direction)._value.get()
        for channel in ("grpc", "data")
        for direction in ("download", "upload")
    }
    await coord.close("test done")
    return final, transfers, metrics


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "secure"])
async def test_the_data_channel_gives_the_same_model_as_grpc(
    secure: bool,
    pki: Pki,
    site_data: dict[str, Path],
    tmp_path: Path,
    coordinator_factory: CoordinatorFactory,
    participant_factory: ParticipantFactory,
) -> None:
    over_grpc, none, metrics = await _run_job(
        pki, site_data, tmp_path / "grpc", coordinator_factory, participant_factory, data_channel=False, secure=secure
    )
    assert none == [0, 0, 0]
    assert metrics[("grpc", "upload")] >= 6, metrics
    assert metrics[("data", "upload")] == 0, metrics
    over_data, transfers, metrics_data = await _run_job(
        pki, site_data, tmp_path / "data", coordinator_factory, participant_factory, data_channel=True, secure=secure
    )
    # Every site downloaded both models and uploaded both updates over the data channel ...
    assert all(n >= 4 for n in transfers), transfers
    # (the coordinator counts the same transfers, on the other channel: cohort_transfers_total)
    assert metrics_data[("data", "upload")] == metrics[("grpc", "upload")], (metrics, metrics_data)
    assert metrics_data[("data", "download")] >= 6, metrics_data
    assert metrics_data[("grpc", "download")] == metrics_data[("grpc", "upload")] == 0, metrics_data
    # ... and the result is the same model: bit for bit in plain rounds (aggregation does not depend on the path or
    # the arrival order); under secure aggregation up to the encoding's random rounding (2^-20 of the clip here).
    tolerance = 1e-5 if secure else 0.0
    for name, tensor in over_grpc.items():
        torch.testing.assert_close(over_data[name], tensor, rtol=0, atol=tolerance)


def _connect(port: int, files: TlsFiles, ca: Path) -> ssl.SSLSocket:
    ctx = client_context(replace(files, ca=ca))
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    return ctx.wrap_socket(raw, server_hostname="localhost")


def _request(sock: ssl.SSLSocket, op: int, body: bytes) -> tuple[grpc.StatusCode, bytes]:
    wire.send_request(sock, op, body)
    return wire.read_reply(sock)


async def test_refusals_on_the_data_channel_change_nothing(
    pki: Pki, tmp_path: Path, coordinator_factory: CoordinatorFactory
) -> None:
    job = job_config(rounds=1, min_sites=2, min_available_sites=2, evaluate_every=0, round_timeout_s=60)
    coord: CoordinatorDaemon = await coordinator_factory(
        _with_data_channel(coordinator_config(pki, tmp_path / "state", job=job))
    )
    runner = runner_of(coord)
    store = coord.coordinator.store
    port = coord.coordinator.data_port
    async with _hand_driven(coord, pki) as (stub_b, task, site, base):
        zeros = encode({k: torch.zeros_like(v) for k, v in base.items()})
        nan = encode({k: torch.full_like(v, float("nan")) for k, v in base.items()})
        ones = encode({k: torch.ones_like(v) for k, v in base.items()})

        cases: list[tuple[pb.UpdateHeader, bytes | bytearray, grpc.StatusCode, str]] = [
            (update_header(task, nan), nan.data, grpc.StatusCode.INVALID_ARGUMENT, "NaN or Inf"),
            (update_header(task, zeros), b"\x01" + zeros.data[1:], grpc.StatusCode.INVALID_ARGUMENT, "digest mismatch"),
            (update_header(task, zeros, num_samples=0), zeros.data, grpc.StatusCode.INVALID_ARGUMENT, "num_samples"),
            (update_header(task, zeros, round=2), zeros.data, grpc.StatusCode.FAILED_PRECONDITION, "round 2"),
            (
                update_header(task, zeros, job_id="other"),
                zeros.data,
                grpc.StatusCode.FAILED_PRECONDITION,
                "not running",
            ),
        ]
        for header, data, code, text in cases:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await site.upload(header, data, timeout=10)
            assert info.value.code() == code, (text, info.value.details())
            assert text in (info.value.details() or ""), (text, info.value.details())
            assert store.uploads(runner.job_id, 1, 0) == []  # nothing was accepted
            refusal = store.audit_events("rpc_refused")[-1]
            assert refusal["actor"] == SITES[0]  # from the certificate
            assert refusal["detail"] == {
                "method": "UploadUpdate",
                "code": code.name,
                "message": refusal["detail"]["message"],
            }
        # Refusals were answered in step: the site's one pooled connection carried all of them and goes on.
        assert len(site._idle) == 1
        reply = await site.upload(update_header(task, zeros), zeros.data, timeout=10)
        assert reply.accepted
        assert not reply.duplicate
        again = await site.upload(update_header(task, zeros), zeros.data, timeout=10)
        assert again.duplicate
        assert again.update_sha256 == reply.update_sha256
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await site.upload(update_header(task, ones), ones.data, timeout=10)
        assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
        [row] = store.uploads(runner.job_id, 1, 0)
        assert row["site"] == SITES[0]

        # Raw sockets block: they run in a thread, so the coordinator (on this event loop) can answer them.
        await asyncio.to_thread(_hostile_requests, port, pki, task)
        # The foreign certificate's refused handshake is audited as gRPC's are, marked as the data port's.
        await poll_until(
            lambda: any(e["detail"].get("port") == "data" for e in store.audit_events("tls_handshake_refused")),
            timeout=10,
            what="the refused handshake's audit event",
        )

        reply_b = await stub_b.UploadUpdate(_one(update_header(task, ones, num_samples=30), ones.data), timeout=10)
        assert reply_b.accepted
    await poll_until(lambda: runner.state != "running", timeout=60, what="the job to finish")
    final = coord.coordinator.models.load(runner.global_model.version)
    for k, v in base.items():  # zeros (weight 10) from the data channel, ones (weight 30) over gRPC
        torch.testing.assert_close(final[k], v + 0.75, rtol=0, atol=1e-6)


@contextlib.asynccontextmanager
async def _hand_driven(
    coord: CoordinatorDaemon, pki: Pki
) -> AsyncIterator[tuple[pb_grpc.FederationAsyncStub, pb.TrainTask, BulkClient, dict[str, torch.Tensor]]]:
    """Two hand-driven sites in round 1: the second site's gRPC stub, the first's train task, its data-channel client
    (the participant's own) and the model it downloaded over it."""
    ca = pki.coordinator.ca
    async with (
        channel(coord.address, pki.site(SITES[0]), ca) as ch,
        channel(coord.address, pki.site(SITES[1]), ca) as ch_b,
    ):
        stub, stub_b = pb_grpc.FederationStub(ch), pb_grpc.FederationStub(ch_b)
        joined_b = await stub_b.Join(join_request(), timeout=10)
        stream_b = stub_b.WaitForWork(pb.WaitRequest(session_id=joined_b.session_id))
        joined = await stub.Join(join_request(), timeout=10)
        assert joined.data_port == coord.coordinator.data_port != 0
        stream = stub.WaitForWork(pb.WaitRequest(session_id=joined.session_id))
        task = None
        async for item in stream:
            if item.WhichOneof("kind") == "train":
                task = item.train
                break
        assert task is not None
        site = BulkClient(CoordinatorEndpoint(address=coord.address, server_name="localhost"), pki.site(SITES[0]))
        site.offered(joined.data_port)
        try:
            base = (await site.download(task.job_id, task.model_version, timeout=10)).finish()
            yield stub_b, task, site, base
        finally:
            stream.cancel()
            stream_b.cancel()
            site.close()


def _hostile_requests(port: int, pki: Pki, task: pb.TrainTask) -> None:
    ca = pki.coordinator.ca
    # Framing that is not the protocol's: INVALID_ARGUMENT with a reason, then the connection closes.
    with _connect(port, pki.site(SITES[0]), ca) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\n\r\n")
        code, body = wire.read_reply(sock)
        assert code is grpc.StatusCode.INVALID_ARGUMENT
        assert b"wrong magic" in body
        assert sock.recv(1) == b""
    with _connect(port, pki.site(SITES[0]), ca) as sock:  # a body announced over the limit is never read
        sock.sendall(wire.MAGIC + bytes([wire.DOWNLOAD]) + (wire.MAX_BODY + 1).to_bytes(4, "big"))
        code, body = wire.read_reply(sock)
        assert code is grpc.StatusCode.INVALID_ARGUMENT
        assert b"over the limit" in body
        assert sock.recv(1) == b""
    with _connect(port, pki.site(SITES[0]), ca) as sock:
        code, body = _request(sock, wire.DOWNLOAD, b"\xff\xff\xff")
        assert code is grpc.StatusCode.INVALID_ARGUMENT
        assert b"not a valid cohort.v1.ModelRequest" in body
        code, body = _request(sock, wire.DOWNLOAD, pb.ModelRequest(job_id=task.job_id).SerializeToString())
        assert code is not grpc.StatusCode.OK  # no such model version; the connection still answers
    # Identity is the certificate's: an admin certificate may not download, a foreign CA cannot connect.
    request = pb.ModelRequest(job_id=task.job_id, model_version=task.model_version).SerializeToString()
    with _connect(port, pki.admin, ca) as sock:
        code, body = _request(sock, wire.DOWNLOAD, request)
        assert code is grpc.StatusCode.PERMISSION_DENIED
        assert b"participant certificate" in body
    with pytest.raises((ssl.SSLError, ConnectionError, wire.Closed)), _connect(port, pki.foreign, ca) as sock:
        _request(sock, wire.DOWNLOAD, request)


async def _one(header: pb.UpdateHeader, data: bytes | bytearray):  # type: ignore[no-untyped-def]
    yield pb.UpdateChunk(header=header)
    view = memoryview(data)
    for start in range(0, len(view), 1 << 20):
        yield pb.UpdateChunk(data=bytes(view[start : start + (1 << 20)]))


async def test_a_site_that_cannot_reach_the_data_port_uses_grpc(
    pki: Pki,
    site_data: dict[str, Path],
    tmp_path: Path,
    coordinator_factory: CoordinatorFactory,
    participant_factory: ParticipantFactory,
) -> None:
    job = job_config(rounds=1, min_sites=2, evaluate_every=0)
    coord = await coordinator_factory(_with_data_channel(coordinator_config(pki, tmp_path / "state", job=job)))
    with socket.socket() as closed:  # a port nothing listens on: bound, never listening
        closed.bind(("127.0.0.1", 0))
        blocked = f"127.0.0.1:{closed.getsockname()[1]}"
        daemons = []
        for site in SITES[:2]:
            config = participant_config(pki.site(site), coord.address, site_data[site])
            if site == SITES[0]:
                config = replace(config, coordinator=replace(config.coordinator, data_address=blocked))
            daemons.append(await participant_factory(config))
        runner = runner_of(coord)
        await poll_until(lambda: runner.state != "running", timeout=120, what="the job to finish")
    assert runner.state == "finished", runner.detail
    assert _transfers(daemons[0]) == 0  # everything went over gRPC
    assert _transfers(daemons[1]) >= 2


async def test_stalled_and_trickling_uploads_on_the_data_port_are_cut(
    pki: Pki, tmp_path: Path, coordinator_factory: CoordinatorFactory
) -> None:
    """Slow-loris over the data port: the same GuardedStream limits as gRPC cut it, nothing is kept, and the site's
    real upload goes through afterwards."""
    job = job_config(rounds=1, min_sites=2, min_available_sites=2, evaluate_every=0, round_timeout_s=60)
    config = coordinator_config(pki, tmp_path / "state", job=job)
    config = replace(config, server=replace(config.server, upload_idle_timeout_s=1.0, upload_deadline_s=2.0))
    coord = await coordinator_factory(config)
    runner, store = runner_of(coord), coord.coordinator.store
    port, ca = coord.coordinator.data_port, pki.coordinator.ca
    async with _hand_driven(coord, pki) as (_, task, site, base):
        zeros = encode({k: torch.zeros_like(v) for k, v in base.items()})
        header = update_header(task, zeros).SerializeToString()

        def slow_upload(pieces: int, gap_s: float) -> bytes:
            """Send the header, take the go-ahead, then ``pieces`` 64-byte pieces ``gap_s`` apart and wait."""
            with _connect(port, pki.site(SITES[0]), ca) as sock:
                code, body = _request(sock, wire.UPLOAD, header)
                assert code is grpc.StatusCode.OK
                assert body == b""
                try:
                    for i in range(pieces):
                        sock.sendall(zeros.data[i * 64 : (i + 1) * 64])
                        time.sleep(gap_s)
                    return sock.recv(1)  # the coordinator cuts the upload and closes the connection
                except (ConnectionError, ssl.SSLError):
                    return b""  # ... which a trickling sender may see while still sending

        for what, pieces, gap_s in (("stall mid-way", 3, 0.0), ("trickle", 60, 0.1)):
            before = len(store.audit_events("rpc_refused"))
            assert await asyncio.to_thread(slow_upload, pieces, gap_s) == b"", what
            await poll_until(_more_refusals(store, before), timeout=10, what=what)
            refusal = store.audit_events("rpc_refused")[-1]
            assert refusal["actor"] == SITES[0], what
            assert (refusal["detail"]["method"], refusal["detail"]["code"]) == ("UploadUpdate", "DEADLINE_EXCEEDED")
            assert "server.upload_" in refusal["detail"]["message"], what
            assert store.uploads(runner.job_id, 1, 0) == [], what
            assert not list((tmp_path / "state").rglob("*.part")), what
        reply = await site.upload(update_header(task, zeros), zeros.data, timeout=10)
        assert reply.accepted
        assert not reply.duplicate


def _more_refusals(store: Any, before: int) -> Callable[[], bool]:
    return lambda: len(store.audit_events("rpc_refused")) > before
