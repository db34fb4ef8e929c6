"""A site's secure-aggregation sessions: one per round attempt, driven by the coordinator's steps.

A train task that carries a ``secagg`` setup starts a session (the signed advertisement goes out at once, while
training runs); each step the coordinator routes is answered by :class:`participant.secagg_session.SecAggSession`
(the library's client state machine); the trainer asks for the masked update once the neighbours' shares arrived.
Tampering the library detects aborts the session: the site reveals nothing more and tells the coordinator why.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping

import grpc

from common import failpoints
from common.errors import CohortError
from common.proto.cohort.v1 import cohort_pb2 as pb
from common.secagg.errors import SecAggAborted
from common.serde import EncodedTensors
from participant.connection import Connection
from participant.secagg_session import SecAggSession, SiteKeys

log = logging.getLogger("cohort.participant")

RoundKey = tuple[str, int, int, str]  # job, round, attempt (instance), split ("": training)


class SecAggSessions:
    def __init__(self, connection: Connection, keys: SiteKeys, site_id: Callable[[], str]) -> None:
        self._conn = connection
        self._keys = keys
        self._site_id = site_id
        self._sessions: dict[RoundKey, SecAggSession] = {}
        self._declined: list[RoundKey] = []

    async def _send(self, session: SecAggSession, msg: pb.SecAggMessage) -> None:
        stub, timeout = self._conn.stub, self._conn.config.coordinator.rpc_timeout_s

        async def send() -> pb.Ack:
            ack: pb.Ack = await stub.SecAgg(msg, timeout=timeout)
            return ack

        await self._conn.retrying("secure-aggregation message", session.task.deadline_unix, send)

    async def _abort(self, session: SecAggSession, reason: str) -> None:
        session.aborted = reason
        session.shares_ready.set()  # wake the trainer: it will not upload
        log.error("secure aggregation of round %d aborted: %s", session.task.round, reason)
        with contextlib.suppress(grpc.aio.AioRpcError):
            await self._send(session, session.message(abort_reason=reason))

    async def start(self, task: pb.TrainTask | pb.EvaluateTask) -> None:
        """A task with a ``secagg`` setup: make this instance's keys and advertise them."""
        split = task.split if isinstance(task, pb.EvaluateTask) else ""
        key = (task.job_id, task.round, task.attempt, split)
        self.supersede(task.job_id, task.round, task.attempt, split)
        try:
            session = SecAggSession.start(task, self._site_id(), self._keys)
            self._sessions[key] = session
            while len(self._sessions) > 4:
                self._sessions.pop(next(iter(self._sessions)))
            msg = await asyncio.to_thread(session.advertise)
            await self._send(session, msg)
            failpoints.hit("participant.secagg_advertised", round=task.round)
        except (CohortError, grpc.aio.AioRpcError) as exc:
            log.error("round %d: cannot take part in secure aggregation: %s", task.round, exc)

    async def ready(self, task: pb.TrainTask) -> None:
        """A buffered task is trained and its update kept here: tell the coordinator, which queues it for a buffer."""
        msg = pb.SecAggMessage(job_id=task.job_id, round=task.round, attempt=task.attempt, ready=task.model_version)
        stub, timeout = self._conn.stub, self._conn.config.coordinator.rpc_timeout_s

        async def send() -> pb.Ack:
            ack: pb.Ack = await stub.SecAgg(msg, timeout=timeout)
            return ack

        await self._conn.retrying("ready for a buffer", task.deadline_unix, send)

    def supersede(self, job_id: str, number: int, attempt: int, split: str = "") -> None:
        """The coordinator moved on to (``number``, ``attempt``) (the round failed and is retried, or it restarted and
        hands out buffered tasks again): stop waiting for the shares of earlier instances."""
        for (job, rnd, att, kind), old in self._sessions.items():
            earlier = (rnd, att) < (number, attempt)
            if job == job_id and kind == split and earlier and not old.aborted:
                old.aborted = "superseded by a later round"
                old.shares_ready.set()

    async def on_step(self, step: pb.SecAggStep) -> None:
        """Answer one step the coordinator routed to this site."""
        key = (step.job_id, step.round, step.attempt, step.split)
        session = self._sessions.get(key)
        if session is None and key not in self._declined:
            # No keys for that round here (this daemon restarted since the round began, or never started its
            # session): say so, or the coordinator, seeing the site connected, waits for it until the stage times out.
            self._declined = [*self._declined[-15:], key]
            log.warning("round %d: no secure-aggregation keys for it (restarted?); declining", step.round)
            reason = "restarted: this site lost the round's secure-aggregation keys"
            await self._conn.decline(step.job_id, step.round, step.attempt, reason, step.split)
            return
        if session is None or session.aborted:
            return
        if step.WhichOneof("stage") == "signatures":
            failpoints.hit("participant.unmasking", round=step.round)
        try:
            reply = await asyncio.to_thread(session.on_step, step)
        except SecAggAborted as exc:
            await self._abort(session, str(exc))
            return
        except CohortError as exc:
            log.error("round %d: secure-aggregation step refused: %s", step.round, exc)
            return
        if reply is not None:
            try:
                await self._send(session, reply)
            except grpc.aio.AioRpcError as exc:
                log.warning("round %d: secure-aggregation message not delivered: %s", step.round, exc.details())

    async def _ready(self, task: pb.TrainTask | pb.EvaluateTask) -> SecAggSession | None:
        """This instance's session once the neighbours' shares are in; None when the site cannot take part."""
        split = task.split if isinstance(task, pb.EvaluateTask) else ""
        session = self._sessions.get((task.job_id, task.round, task.attempt, split))
        if session is None:
            log.error("round %d: no secure-aggregation session; not uploading", task.round)
            return None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(session.shares_ready.wait(), timeout=max(0.0, task.deadline_unix - time.time()))
        if session.aborted or not session.shares_ready.is_set():
            return None
        return session

    async def masked(
        self, task: pb.TrainTask, update: EncodedTensors, num_samples: int, lanes: Mapping[str, float]
    ) -> EncodedTensors | None:
        """The update and its metadata lanes, masked for this round once the neighbours' shares are in."""
        session = await self._ready(task)
        if session is None:
            return None
        try:
            return await asyncio.to_thread(session.masked_update, update, num_samples, lanes)
        except SecAggAborted as exc:
            await self._abort(session, str(exc))
            return None

    async def masked_lanes(self, task: pb.EvaluateTask, lanes: Mapping[str, float]) -> EncodedTensors | None:
        """A secure evaluation's input (its lanes), masked once the neighbours' shares are in."""
        session = await self._ready(task)
        if session is None:
            return None
        try:
            return await asyncio.to_thread(session.masked_lanes, lanes)
        except SecAggAborted as exc:
            await self._abort(session, str(exc))
            return None
