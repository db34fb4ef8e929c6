"""Upload admission (server.max_concurrent_uploads): uploads beyond the limit wait for a slot before their first
chunk is read, and every one of them lands; a waiting site is neither timed out as idle nor dropped for silence.
Download admission (server.max_concurrent_downloads) the same way, after the manifest.

Through real gRPC and mutual TLS with hand-driven sites (raw stubs), plus the gate's edge cases on a stream of
its own (revocation and cancellation while waiting give the slot back).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from support import (
    SITES,
    CoordinatorFactory,
    Pki,
    channel,
    coordinator_config,
    download_model,
    job_config,
    join_request,
    poll_until,
    runner_of,
    update_messages,
)

from common.errors import CertificateRevoked
from common.proto.cohort.v1 import cohort_pb2 as pb
from common.proto.cohort.v1 import cohort_pb2_grpc as pb_grpc
from common.tasks.base import load_task, task_digest
from coordinator.rpc.upload_guard import GuardedStream, StreamLimits, TransferGate

LIMIT = 2
IDLE_S = 1.0  # upload_idle_timeout_s: every waiting upload waits longer than this
PAUSE_S = 0.6  # between a holder's chunks: under the idle timeout
PAUSES = 5  # a holder keeps its slot ~3 s: 6 heartbeat intervals, 3 idle timeouts


async def _sent(msgs: Sequence[pb.UpdateChunk], pause_s: float = 0.0, pauses: int = 0) -> AsyncIterator[pb.UpdateChunk]:
    for i, msg in enumerate(msgs):
        if 1 < i <= pauses + 1:
            await asyncio.sleep(pause_s)
        yield msg


async def test_uploads_over_the_limit_wait_and_all_land(
    pki: Pki, tmp_path: Path, coordinator_factory: CoordinatorFactory
) -> None:
    job = job_config(rounds=1, min_sites=len(SITES), min_available_sites=len(SITES), evaluate_every=0)
    cfg = coordinator_config(pki, tmp_path / "state", job=job, heartbeat_s=0.5)
    cfg = replace(cfg, server=replace(cfg.server, max_concurrent_uploads=LIMIT, upload_idle_timeout_s=IDLE_S))
    coord = await coordinator_factory(cfg)
    gate = coord.upload_gate
    assert gate is not None
    runner = runner_of(coord)
    store = coord.coordinator.store
    chans = [channel(coord.address, pki.site(site), pki.coordinator.ca) for site in SITES]
    try:
        stubs = [pb_grpc.FederationStub(ch) for ch in chans]
        streams = []
        for stub in stubs:
            joined = await stub.Join(join_request(), timeout=10)
            streams.append(stub.WaitForWork(pb.WaitRequest(session_id=joined.session_id)))
        tasks: list[pb.TrainTask] = []
        for stream in streams:
            async for item in stream:
                if item.WhichOneof("kind") == "train":
                    tasks.append(item.train)
                    break
        base = await download_model(stubs[0], tasks[0].job_id, tasks[0].model_version)
        # Site i sends an update of all (i + 1) with weight 10: the new model is base + mean(1..5) = base + 3.
        uploads = [
            update_messages(task, {k: torch.full_like(v, i + 1.0) for k, v in base.items()}, chunk_bytes=64)
            for i, task in enumerate(tasks)
        ]
        assert all(len(u) > PAUSES + 2 for u in uploads)
        # The first LIMIT sites take the slots and keep them for PAUSES pauses; the others queue behind them.
        holders = [
            asyncio.ensure_future(stubs[i].UploadUpdate(_sent(uploads[i], PAUSE_S, PAUSES), timeout=60))
            for i in range(LIMIT)
        ]
        await poll_until(lambda: gate.active == LIMIT, timeout=10, what="the holders admitted")
        waiting = [
            asyncio.ensure_future(stubs[i].UploadUpdate(_sent(uploads[i]), timeout=60))
            for i in range(LIMIT, len(SITES))
        ]
        await poll_until(lambda: gate.waiting == len(SITES) - LIMIT, timeout=10, what="the others waiting")
        await asyncio.sleep(IDLE_S * 1.5)  # longer than the idle timeout, several heartbeat intervals
        assert gate.active == LIMIT
        assert gate.waiting == len(SITES) - LIMIT
        assert store.uploads(runner.job_id, 1, 0) == []  # nothing past a header read from the waiting ones
        assert not any(w.done() for w in waiting)
        replies = await asyncio.gather(*holders, *waiting)
        assert all(r.accepted and not r.duplicate for r in replies)
        assert gate.peak_active == LIMIT
        assert (gate.active, gate.waiting) == (0, 0)
        assert store.audit_events("site_timed_out") == []  # no waiting site was dropped
        assert store.audit_events("upload_cancelled") == []
        for stream in streams:
            stream.cancel()
    finally:
        for ch in chans:
            await ch.close()
    await poll_until(lambda: runner.state != "running", timeout=60, what="job end")
    assert runner.state == "finished", runner.detail
    assert sorted(row["site"] for row in store.uploads(runner.job_id, 1, 0)) == sorted(SITES)
    final = coord.coordinator.models.load(runner.global_model.version)
    for k, v in base.items():
        torch.testing.assert_close(final[k], v + 3.0, rtol=0, atol=1e-5)


# -- the gate on its own ---------------------------------------------------------------------------------------
LIMITS = StreamLimits(idle_timeout_s=0.2, deadline_s=5.0, max_chunks=100, max_chunk_bytes=1 << 20)


async def _chunks(n: int) -> AsyncIterator[pb.UpdateChunk]:
    yield pb.UpdateChunk(header=pb.UpdateHeader(job_id="j"))
    for _ in range(n):
        yield pb.UpdateChunk(data=b"x" * 8)


async def _drain(stream: GuardedStream) -> int:
    n = 0
    try:
        async for _ in stream:
            n += 1
    finally:
        stream.close()
    return n


async def test_a_waiting_upload_is_not_idle_and_its_deadline_starts_at_admission() -> None:
    gate = TransferGate(1)
    first = GuardedStream(_chunks(3), LIMITS, gate=gate)
    assert (await anext(first)).WhichOneof("kind") == "header"
    await anext(first)  # holds the slot
    second = GuardedStream(_chunks(3), LIMITS, gate=gate)
    waiter = asyncio.ensure_future(_drain(second))
    await asyncio.sleep(LIMITS.idle_timeout_s * 3)  # three idle timeouts in the queue: not a stall
    assert not waiter.done()
    assert gate.waiting == 1
    assert await _drain(first) == 2
    assert await waiter == 4
    assert (gate.active, gate.peak_active) == (0, 1)


async def test_revocation_or_cancellation_while_waiting_gives_nothing_away() -> None:
    gate = TransferGate(1)
    holder = GuardedStream(_chunks(2), LIMITS, gate=gate)
    await anext(holder)
    await anext(holder)
    revoked = asyncio.Event()

    def refuse() -> None:
        raise CertificateRevoked("revoked")

    revoked_stream = GuardedStream(_chunks(2), LIMITS, gate=gate, revoked=revoked, on_revoked=refuse)
    await anext(revoked_stream)
    cancelled_stream = GuardedStream(_chunks(2), LIMITS, gate=gate)
    await anext(cancelled_stream)
    revoked_wait = asyncio.ensure_future(anext(revoked_stream))
    cancelled_wait = asyncio.ensure_future(anext(cancelled_stream))
    await poll_until(lambda: gate.waiting == 2, timeout=5, what="two waiting")
    revoked.set()
    with pytest.raises(CertificateRevoked):
        await revoked_wait
    revoked_stream.close()
    cancelled_wait.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled_wait
    cancelled_stream.close()
    assert (gate.waiting, gate.active) == (0, 1)
    holder.close()
    assert gate.active == 0
    late = GuardedStream(_chunks(1), LIMITS, gate=gate)  # the slot is free again
    assert await asyncio.wait_for(_drain(late), timeout=2) == 2


async def test_downloads_over_the_limit_wait_after_their_manifest_and_all_arrive(
    pki: Pki, tmp_path: Path, coordinator_factory: CoordinatorFactory
) -> None:
    """server.max_concurrent_downloads: 1. Three sites ask for a 32 MiB model and read only the manifest: one stream
    is written (until flow control stops it), the others wait for its slot; then all three arrive intact."""
    async with _big_model_downloads(pki, tmp_path, coordinator_factory, idle_s=30.0) as (coord, calls):
        gate = coord.download_gate
        assert gate is not None
        await poll_until(
            lambda: (gate.active, gate.waiting) == (1, len(SITES) - 1), what="one download written, the others waiting"
        )
        received = await asyncio.gather(*(_rest(call) for call in calls))
        assert all(data == runner_of(coord).global_model.data for data in received)
        assert (gate.active, gate.waiting, gate.peak_active) == (0, 0, 1)


async def test_a_download_whose_reader_stops_gives_its_slot_back(
    pki: Pki, tmp_path: Path, coordinator_factory: CoordinatorFactory
) -> None:
    """A member site that asks for the model and stops reading keeps nobody waiting longer than the idle timeout."""
    async with _big_model_downloads(pki, tmp_path, coordinator_factory, idle_s=0.5) as (coord, calls):
        stalled, *others = calls
        model = runner_of(coord).global_model.data
        for call in others:  # served one after another, each once the one before it was idle for 0.5 s or done
            assert await asyncio.wait_for(_rest(call), timeout=20) == model
        assert await _rest(stalled) == model  # and the stalled one is still served in full


@contextlib.asynccontextmanager
async def _big_model_downloads(
    pki: Pki, tmp_path: Path, coordinator_factory: CoordinatorFactory, idle_s: float
) -> AsyncIterator[tuple[Any, list[Any]]]:
    """A coordinator with server.max_concurrent_downloads 1 and a 32 MiB model; each site asked for it and read the
    manifest only, in site order (so the first holds the slot)."""
    job = job_config(task="big_task:TASK", rounds=1, min_sites=len(SITES), evaluate_every=0)
    cfg = coordinator_config(pki, tmp_path / "state", job=job)
    cfg = replace(cfg, server=replace(cfg.server, max_concurrent_downloads=1, upload_idle_timeout_s=idle_s))
    coord = await coordinator_factory(cfg)
    model = runner_of(coord).global_model
    big = load_task("big_task:TASK")
    identity = {"task_name": big.name, "task_digest": task_digest(big)}
    chans = [channel(coord.address, pki.site(site), pki.coordinator.ca) for site in SITES]
    try:
        stubs = [pb_grpc.FederationStub(ch) for ch in chans]
        for stub in stubs:
            await stub.Join(join_request(**identity), timeout=10)
        request = pb.ModelRequest(job_id=runner_of(coord).job_id, model_version=model.version)
        calls = [stub.DownloadModel(request, timeout=60) for stub in stubs]
        for call in calls:
            first = await call.read()
            assert isinstance(first, pb.ModelChunk)
            assert first.WhichOneof("kind") == "manifest"
            assert first.manifest.sha256 == model.sha256
        yield coord, calls
    finally:
        for ch in chans:
            await ch.close()


async def _rest(call: Any) -> bytes:
    data = bytearray()
    while (msg := await call.read()) is not grpc.aio.EOF:
        data += msg.data
    return bytes(data)
