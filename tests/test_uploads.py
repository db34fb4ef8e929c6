"""Bad uploads get the right status code and change nothing; good ones are idempotent per (job, round, site).

A hand-driven participant (raw gRPC stub over mutual TLS) joins, takes its train task and sends crafted uploads.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from pathlib import Path

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
    runner_of,
    update_messages,
)

from common.proto.cohort.v1 import cohort_pb2 as pb
from common.proto.cohort.v1 import cohort_pb2_grpc as pb_grpc
from coordinator.daemon import CoordinatorDaemon


async def _messages(items: Sequence[pb.UpdateChunk]) -> AsyncIterator[pb.UpdateChunk]:
    for item in items:
        yield item


async def test_upload_validation_and_idempotence(
    pki: Pki, tmp_path: Path, coordinator_factory: CoordinatorFactory
) -> None:
    job = job_config(rounds=1, min_sites=2, min_available_sites=2, evaluate_every=0, round_timeout_s=60)
    coord: CoordinatorDaemon = await coordinator_factory(coordinator_config(pki, tmp_path / "state", job=job))
    runner = runner_of(coord)
    store = coord.coordinator.store
    async with (
        channel(coord.address, pki.site(SITES[0]), pki.coordinator.ca) as ch,
        channel(coord.address, pki.site(SITES[1]), pki.coordinator.ca) as ch_b,
    ):
        stub, stub_b = pb_grpc.FederationStub(ch), pb_grpc.FederationStub(ch_b)
        joined_b = await stub_b.Join(join_request(), timeout=10)
        stream_b = stub_b.WaitForWork(pb.WaitRequest(session_id=joined_b.session_id))
        joined = await stub.Join(join_request(), timeout=10)
        stream = stub.WaitForWork(pb.WaitRequest(session_id=joined.session_id))
        task = None
        async for item in stream:
            if item.WhichOneof("kind") == "train":
                task = item.train
                break
        assert task is not None
        base = await download_model(stub, task.job_id, task.model_version)
        zeros = {k: torch.zeros_like(v) for k, v in base.items()}
        first = next(iter(base))

        async def send(msgs: list[pb.UpdateChunk]) -> pb.UploadReply:
            reply: pb.UploadReply = await stub.UploadUpdate(_messages(msgs), timeout=10)
            return reply

        bad_shape = dict(zeros)
        bad_shape[first] = torch.zeros(3, 3)
        renamed = {("x" + k): v for k, v in zeros.items()}
        nan = {k: torch.full_like(v, float("nan")) for k, v in zeros.items()}
        good = update_messages(task, zeros)
        tampered = list(good)
        tampered[1] = pb.UpdateChunk(data=b"\x01" + tampered[1].data[1:])
        cases: list[tuple[list[pb.UpdateChunk], grpc.StatusCode, str]] = [
            ([], grpc.StatusCode.INVALID_ARGUMENT, "empty upload"),
            (good[1:], grpc.StatusCode.INVALID_ARGUMENT, "first message"),
            (update_messages(task, bad_shape), grpc.StatusCode.INVALID_ARGUMENT, "dtype/shape"),
            (update_messages(task, renamed), grpc.StatusCode.INVALID_ARGUMENT, "which the model does not have"),
            (update_messages(task, nan), grpc.StatusCode.INVALID_ARGUMENT, "NaN or Inf"),
            (tampered, grpc.StatusCode.INVALID_ARGUMENT, "digest mismatch"),
            (good[:-1], grpc.StatusCode.INVALID_ARGUMENT, "ended after"),
            ([*good, good[1]], grpc.StatusCode.INVALID_ARGUMENT, "more than"),
            (good[:1] + good[:1], grpc.StatusCode.INVALID_ARGUMENT, "only data chunks"),
            (update_messages(task, zeros, num_samples=0), grpc.StatusCode.INVALID_ARGUMENT, "num_samples"),
            (update_messages(task, zeros, round=task.round + 1), grpc.StatusCode.FAILED_PRECONDITION, "round 2"),
            (update_messages(task, zeros, job_id="other-job"), grpc.StatusCode.FAILED_PRECONDITION, "not running"),
            (
                update_messages(task, zeros, base_model_version="sha256:" + "0" * 64),
                grpc.StatusCode.FAILED_PRECONDITION,
                "another model version",
            ),
        ]
        for msgs, code, text in cases:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await send(msgs)
            assert info.value.code() == code, (text, info.value.details())
            assert text in (info.value.details() or ""), (text, info.value.details())
            assert store.uploads(runner.job_id, 1, 0) == []  # nothing was accepted
            assert runner.state == "running"
            refusal = store.audit_events("rpc_refused")[-1]
            assert refusal["actor"] == SITES[0]
            assert refusal["detail"]["code"] == code.name

        # A site that was not connected when the cohort was drawn is not in it.
        async with channel(coord.address, pki.site(SITES[2]), pki.coordinator.ca) as ch_c:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await pb_grpc.FederationStub(ch_c).UploadUpdate(_messages(good), timeout=10)
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "not in the cohort" in (info.value.details() or "")

        reply = await send(good)
        assert reply.accepted
        assert not reply.duplicate
        # The same upload again (a retry after a lost reply) is acknowledged, not counted twice ...
        again = await send(good)
        assert again.duplicate
        assert again.update_sha256 == reply.update_sha256
        # ... but a different update for the same (job, round, site) is refused.
        ones = {k: torch.ones_like(v) for k, v in base.items()}
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await send(update_messages(task, ones))
        assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
        [row] = store.uploads(runner.job_id, 1, 0)
        assert row["site"] == SITES[0]

        # Site b uploads "ones" with weight 30: the new model is base + 30 / (10 + 30) * 1.
        reply_b = await stub_b.UploadUpdate(_messages(update_messages(task, ones, num_samples=30)), timeout=10)
        assert reply_b.accepted
        stream.cancel()
        stream_b.cancel()
    await _wait_finished(coord)
    final = coord.coordinator.models.load(runner.global_model.version)
    for k, v in base.items():
        torch.testing.assert_close(final[k], v + 0.75, rtol=0, atol=1e-6)


async def _wait_finished(coord: CoordinatorDaemon) -> None:
    from support import poll_until

    runner = runner_of(coord)
    await poll_until(lambda: runner.state != "running", timeout=60, what="job end")
    assert runner.state == "finished", runner.detail
