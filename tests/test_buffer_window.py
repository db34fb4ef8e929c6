"""Asynchronous rounds (FedBuff, updates in the clear): an update that arrives while a full buffer is being made into
the next model counts in the next buffer, one version staler; it is not refused and its site's training not lost.

Before, such an update was refused ("round 1 closed while this upload was in flight") and its site then sat idle until
its task grew ``max_staleness`` versions old: with four fast sites and a buffer of three, one of them did no useful
work most of the time. Sites are driven by hand over real mutual-TLS gRPC; the commit of round 1 is held open so the
uploads land in that window every time. A validation evaluation that follows the buffer ends the wait: the held upload
is refused, as the site must be free to evaluate.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import grpc
import pytest
import torch
from support import (
    SITES,
    CoordinatorFactory,
    Pki,
    coordinator_config,
    job_config,
    poll_until,
    runner_of,
    update_messages,
)
from test_hostile import HandSite, download, hand_site, sent

from common.proto.cohort.v1 import cohort_pb2 as pb
from coordinator.daemon import CoordinatorDaemon
from coordinator.round.events import Aggregate, Phase
from coordinator.round.records import RoundAttempt
from coordinator.round.runner import JobRunner
from coordinator.strategy.config import StrategyConfig

A, B, C, D = SITES[:4]


async def paused(msgs: Sequence[pb.UpdateChunk], after: int, resume: asyncio.Event) -> AsyncIterator[pb.UpdateChunk]:
    """Send the first ``after`` messages, wait for ``resume``, then send the rest."""
    for i, msg in enumerate(msgs):
        if i == after:
            await resume.wait()
        yield msg


async def held_coordinator(
    factory: CoordinatorFactory, pki: Pki, state: Path, available: int, evaluate_every: int
) -> tuple[CoordinatorDaemon, JobRunner, asyncio.Event]:
    """A coordinator running an asynchronous job (buffer of 2) whose aggregation step waits for the returned event:
    the window between buffers stays open until the test sets it."""
    strategy = StrategyConfig(mode="async", buffer_size=2, max_staleness=2)
    job = job_config(
        rounds=3, min_sites=2, min_available_sites=available, evaluate_every=evaluate_every, strategy=strategy
    )
    coord = await factory(coordinator_config(pki, state, job=job))
    runner, commit = runner_of(coord), asyncio.Event()
    aggregate = runner._aggregate

    async def held(action: Aggregate, rnd: RoundAttempt) -> None:
        await commit.wait()
        await aggregate(action, rnd)

    runner._aggregate = held  # type: ignore[method-assign]
    return coord, runner, commit


async def sites_on_round_1(
    stack: contextlib.AsyncExitStack, coord: CoordinatorDaemon, pki: Pki, names: Sequence[str]
) -> tuple[list[HandSite], list[pb.UpdateChunk]]:
    """Hand-driven sites that all hold round 1's task, and an update (zeros) for it."""
    sites = [await hand_site(stack, coord.address, pki, s) for s in names]
    task = await sites[0].next_train()
    for s in sites[1:]:
        assert await s.next_train() == task
    zeros = {k: torch.zeros_like(v) for k, v in (await download(sites[0], task)).items()}
    return sites, update_messages(task, zeros, chunk_bytes=512)


async def test_updates_arriving_while_a_buffer_is_committed_count_in_the_next_buffer(
    pki: Pki, tmp_path: Path, coordinator_factory: CoordinatorFactory
) -> None:
    coord, runner, commit = await held_coordinator(coordinator_factory, pki, tmp_path / "state", 4, evaluate_every=0)
    store = coord.coordinator.store
    release = asyncio.Event()
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(release.set)
        stack.callback(commit.set)
        (a, b, c, d), update = await sites_on_round_1(stack, coord, pki, (A, B, C, D))

        # c is half-way through its upload when a and b fill the buffer of round 1.
        c_upload = asyncio.ensure_future(c.stub.UploadUpdate(paused(update, 3, release), timeout=30))
        await poll_until(lambda: runner.machine.round is not None and C in runner.machine.round.in_flight, what="c")
        for s in (a, b):
            assert (await s.stub.UploadUpdate(sent(update, release=release), timeout=10)).accepted
        await poll_until(lambda: runner.machine.phase is Phase.AGGREGATING, what="round 1's buffer full")
        assert runner.machine.between_buffers()

        # d starts its upload while round 1 becomes the next model, and c sends the rest of its own.
        d_upload = asyncio.ensure_future(d.stub.UploadUpdate(sent(update, release=release), timeout=30))
        release.set()
        await asyncio.sleep(0.5)
        assert not c_upload.done()  # held for the next buffer, not refused
        assert not d_upload.done()
        assert runner.machine.phase is Phase.AGGREGATING

        commit.set()
        assert (await c_upload).accepted
        assert (await d_upload).accepted

        def rounds_done() -> list[int]:
            return [r.round for r in store.rounds(runner.job_id) if r.finished]

        await poll_until(lambda: rounds_done() == [1, 2], what="round 2 made from c's and d's updates")
        first = {u["site"]: u["metrics"]["staleness"] for u in store.uploads(runner.job_id, 1, 0)}
        second = {u["site"]: u["metrics"]["staleness"] for u in store.uploads(runner.job_id, 2, 0)}
        assert first == {A: 0.0, B: 0.0}
        assert second == {C: 1.0, D: 1.0}  # trained on round 1's model, counted in round 2's buffer
        assert [e for e in store.audit_events("rpc_refused") if e["detail"]["method"] == "UploadUpdate"] == []
        await runner.stop("test over")


async def test_an_update_held_between_buffers_is_refused_when_a_validation_evaluation_opens_instead(
    pki: Pki, tmp_path: Path, coordinator_factory: CoordinatorFactory
) -> None:
    """A federated evaluation needs the sites: an upload held through it would keep its site from evaluating, so once
    the committed buffer opens an evaluation the held upload is refused (the site trains again afterwards)."""
    coord, runner, commit = await held_coordinator(coordinator_factory, pki, tmp_path / "state", 3, evaluate_every=1)
    release = asyncio.Event()
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(release.set)
        stack.callback(commit.set)
        (a, b, c), update = await sites_on_round_1(stack, coord, pki, (A, B, C))
        for s in (a, b):
            assert (await s.stub.UploadUpdate(sent(update, release=release), timeout=10)).accepted
        await poll_until(lambda: runner.machine.phase is Phase.AGGREGATING, what="round 1's buffer full")

        c_upload = asyncio.ensure_future(c.stub.UploadUpdate(sent(update, release=release), timeout=30))
        await asyncio.sleep(0.3)
        assert not c_upload.done()  # held while the buffer becomes the next model
        commit.set()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await c_upload
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "no round is open" in (info.value.details() or "")
        assert runner.machine.phase is Phase.EVALUATING
        await runner.stop("test over")
