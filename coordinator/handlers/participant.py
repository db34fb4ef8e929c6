"""What sites call, as plain functions ``(caller, request, state) -> reply``.

The servicer (coordinator/rpc/servicer.py) has already checked the caller's certificate (role, revocation) and turned
undecodable bytes into INVALID_ARGUMENT; these functions check membership once, decode what is left, and hand the
job's events to its runner. Every rule about rounds is in :mod:`coordinator.round.machine`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from common.errors import AlreadyExists, CohortError, FailedPrecondition, PermissionDenied
from common.proto.cohort.v1 import cohort_pb2 as pb
from common.serde import EncodedTensors, specs_from_manifest
from common.tls import CertRef
from coordinator.federation import Federation
from coordinator.handlers.final_model import final_model
from coordinator.round.events import Declined, EvaluationReceived, JobState, SecAggReceived
from coordinator.state.registry import Declaration

log = logging.getLogger("cohort.coordinator")


def join(caller: CertRef, req: pb.JoinRequest, state: Federation) -> pb.JoinReply:
    site = caller.name
    # Rate first: every refusal below is audited, so a flood must be cut before it can write to the log.
    state.join_limiter.take(site)
    if site not in state.allowed:
        state.store.audit("join_refused", site, reason="not on the allow-list")
        raise PermissionDenied(
            f"site {site!r} is not on the allow-list of federation "
            f"{state.config.federation.name!r}; ask the operator to add it"
        )
    decl = Declaration(
        req.task_name,
        req.task_digest,
        req.schema_fingerprint,
        req.software_version,
        req.task_version,
        req.task_code_digest,
        req.training_code_digest,
    )
    runner = state.jobs.running()
    if runner is not None:
        mismatch = runner.machine.setup.identity.mismatch(decl)
        if mismatch is not None:
            state.store.audit("join_refused", site, reason=mismatch)
            raise FailedPrecondition(f"site {site!r} does not fit job {runner.job_id}: {mismatch}")
    session = state.registry.join(site, decl, caller, req.instance)
    state.store.audit("join", site, task=req.task_name, version=req.software_version)
    if session.displaced:
        duplicate_session(site, session.displaced, req.instance, state)
    return pb.JoinReply(
        session_id=session.session_id,
        heartbeat_interval_s=state.config.server.heartbeat_interval_s,
        job_id=runner.job_id if runner else "",
        federation=state.config.federation.name,
        site_id=site,
        data_port=state.data_port,
    )


async def work_stream(caller: CertRef, req: pb.WaitRequest, state: Federation) -> AsyncIterator[pb.WorkItem]:
    site = caller.name
    session = state.registry.attach(site, req.session_id)
    if session is None:
        raise FailedPrecondition("unknown or replaced session; call Join again")
    interval = state.config.server.heartbeat_interval_s
    try:
        yield pb.WorkItem(heartbeat=pb.Heartbeat(server_time=time.time()))
        while True:
            try:
                item = await asyncio.wait_for(session.queue.get(), timeout=interval)
            except TimeoutError:
                item = pb.WorkItem(heartbeat=pb.Heartbeat(server_time=time.time()))
            if item is None:
                refuse_if_displaced(site, session.session_id, state)
                return
            state.registry.touch(site)
            yield item
    finally:
        state.registry.detach(session)


def duplicate_session(site: str, loser: str, winner: str, state: Federation) -> None:
    """A second daemon joined with the identity of a connected site: the newer session won; say so once."""
    state.store.audit("duplicate_session", site, winner=winner, replaced=loser)
    log.warning(
        "duplicate session for site %s: daemon %s joined while %s was connected; the newer one (%s) won and the "
        "other is told to stop",
        site,
        winner,
        loser,
        winner,
    )


def refuse_if_displaced(site: str, session_id: str, state: Federation) -> None:
    winner = state.registry.displaced_by(site, session_id)
    if winner is not None:
        raise AlreadyExists(
            f"duplicate session: another daemon with site identity {site!r} ({winner}) joined and replaced this "
            "one; run one participant daemon per site"
        )


def heartbeat(caller: CertRef, req: pb.HeartbeatRequest, state: Federation) -> pb.Ack:
    if not state.registry.heartbeat(caller.name, req.session_id):
        refuse_if_displaced(caller.name, req.session_id, state)
        raise FailedPrecondition("unknown or replaced session; call Join again")
    return pb.Ack()


def download_model(caller: CertRef, req: pb.ModelRequest, state: Federation) -> EncodedTensors:
    state.require_member(caller.name)
    runner = state.jobs.runners.get(req.job_id)
    if runner is None or runner.state is not JobState.RUNNING:  # an ended job: its final model only (keep_final_model)
        return final_model(req.job_id, req.model_version, state.store, state.models)
    return runner.model_for(req.model_version)


async def upload(
    caller: CertRef, header: pb.UpdateHeader, chunks: AsyncIterator[pb.UpdateChunk], state: Federation
) -> pb.UploadReply:
    state.require_member(caller.name)
    runner = state.jobs.active(header.job_id)
    specs = specs_from_manifest(header.manifest, state.limits)
    return await runner.receive_upload(caller.name, header, specs, chunks)


async def secagg(caller: CertRef, msg: pb.SecAggMessage, state: Federation) -> pb.Ack:
    site = caller.name
    state.require_member(site)
    runner = state.jobs.active(msg.job_id)
    try:
        await runner.feed(SecAggReceived(site, msg, time.time()))
    except CohortError as exc:
        rnd = runner.current_round
        state.store.audit(
            "secagg_refused", site, job_id=msg.job_id, round=rnd.number if rnd else msg.round, reason=str(exc)[:500]
        )
        raise
    return pb.Ack()


async def decline(caller: CertRef, req: pb.DeclineRequest, state: Federation) -> pb.Ack:
    state.require_member(caller.name)
    await state.jobs.active(req.job_id).feed(Declined(caller.name, req, time.time()))
    return pb.Ack()


async def report_evaluation(caller: CertRef, report: pb.EvaluationReport, state: Federation) -> pb.Ack:
    state.require_member(caller.name)
    await state.jobs.active(report.job_id).feed(EvaluationReceived(caller.name, report, time.time()))
    return pb.Ack()
