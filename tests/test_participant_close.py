"""A participant daemon's close ends its worker even when gRPC turned the cancel into the call's own error.

A regression test: grpc.aio answers a call that fails just as it is cancelled (the coordinator refusing an upload
while the daemon closes) with that failure, an ``AioRpcError``, and the task's CancelledError is lost. The worker
logged it as a failed task and waited for the next one, so ``close()`` waited forever (the FedBuff crash test hung
about one run in ten under load).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from support import Pki, participant_config, poll_until

from common.proto.cohort.v1 import cohort_pb2 as pb
from participant.daemon import ParticipantDaemon

REFUSED = "round 1 closed while this upload was in flight"


@pytest.mark.parametrize("swallowed", [True, False], ids=["cancel-turned-into-rpc-error", "plain-cancel"])
async def test_close_ends_a_worker_whose_call_swallowed_the_cancel(
    pki: Pki, site_data: dict[str, Path], swallowed: bool
) -> None:
    # No coordinator listens there: the connection keeps retrying, which is all this test needs of it.
    daemon = ParticipantDaemon(participant_config(pki.site("site-a"), "127.0.0.1:1", site_data["site-a"]))
    await daemon.start()
    work = daemon.work
    assert work is not None
    started = asyncio.Event()

    async def train(task: pb.TrainTask) -> None:
        started.set()
        try:
            await asyncio.Event().wait()  # an upload in flight
        except asyncio.CancelledError:
            if not swallowed:
                raise
        # What grpc.aio's call does when its RPC failed as the cancel arrived: the RPC's status, not the cancel.
        raise grpc.aio.AioRpcError(
            grpc.StatusCode.FAILED_PRECONDITION, grpc.aio.Metadata(), grpc.aio.Metadata(), REFUSED
        )

    work._train = train  # type: ignore[method-assign]
    work.dispatch(pb.WorkItem(train=pb.TrainTask(job_id="job", round=1, attempt=0, model_version="sha256:" + "0" * 64)))
    await poll_until(started.is_set, timeout=10, what="the train task started")
    await asyncio.wait_for(daemon.close("test done"), timeout=15)
    assert not work.busy
