"""Thin gRPC servicers: check the caller's certificate role, call a domain method, convert the result.

Errors are translated once, in :func:`translated` / :func:`translated_stream`: a :class:`CohortError` becomes its
status code and message; anything else becomes INTERNAL with a generic message and a logged traceback.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from common import failpoints
from common.certs import Role
from common.errors import InvalidArgument, RpcError, status_for
from common.proto.cohort.v1 import cohort_pb2 as pb
from common.proto.cohort.v1 import cohort_pb2_grpc as pb_grpc
from common.tls import peer_identity, require_role
from coordinator.service import Coordinator

log = logging.getLogger("cohort.coordinator.rpc")

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Ctx = grpc.aio.ServicerContext[Any, Any]


async def _abort(servicer: Any, context: Ctx, method: str, exc: BaseException) -> None:
    code, message = status_for(exc)
    if isinstance(exc, RpcError):
        log.info("%s refused: %s: %s", method, code.name, message)
        _audit_refusal(servicer, context, method, code.name, message)
    else:
        log.error("%s failed with an unexpected error", method, exc_info=exc)
    await context.abort(code, message)


def _audit_refusal(servicer: Any, context: Ctx, method: str, code: str, message: str) -> None:
    """Every refused request is an audit event (who, which call, which status, why); never its payload."""
    coordinator = getattr(servicer, "c", None)
    if coordinator is None:
        return
    try:
        actor = peer_identity(context).name
    except RpcError:
        actor = "unauthenticated"
    try:
        coordinator.store.audit("rpc_refused", actor, method=method, code=code, message=message[:300])
    except Exception:  # the store may be closing during shutdown; the refusal itself still goes out
        log.debug("could not audit a refusal", exc_info=True)


def translated(
    fn: Callable[[Any, Req, Ctx], Awaitable[Resp]],
) -> Callable[[Any, Req, Ctx], Awaitable[Resp]]:
    @functools.wraps(fn)
    async def wrapper(self: Any, request: Req, context: Ctx) -> Resp:
        try:
            return await fn(self, request, context)
        except Exception as exc:
            if isinstance(exc, grpc.aio.AbortError):
                raise
            await _abort(self, context, fn.__name__, exc)
            raise AssertionError("unreachable: context.abort raises") from exc

    return wrapper


def translated_stream(
    fn: Callable[[Any, Req, Ctx], AsyncIterator[Resp]],
) -> Callable[[Any, Req, Ctx], AsyncIterator[Resp]]:
    @functools.wraps(fn)
    async def wrapper(self: Any, request: Req, context: Ctx) -> AsyncIterator[Resp]:
        try:
            async for item in fn(self, request, context):
                yield item
        except Exception as exc:
            if isinstance(exc, grpc.aio.AbortError):
                raise
            await _abort(self, context, fn.__name__, exc)

    return wrapper


class FederationServicer(pb_grpc.FederationServicer):
    def __init__(self, coordinator: Coordinator) -> None:
        self.c = coordinator

    @translated
    async def Join(self, request: pb.JoinRequest, context: Ctx) -> pb.JoinReply:
        site = require_role(context, Role.PARTICIPANT).name
        return self.c.join(site, request)

    @translated_stream
    async def WaitForWork(self, request: pb.WaitRequest, context: Ctx) -> AsyncIterator[pb.WorkItem]:
        site = require_role(context, Role.PARTICIPANT).name
        async for item in self.c.work_stream(site, request.session_id):
            yield item

    @translated_stream
    async def DownloadModel(self, request: pb.ModelRequest, context: Ctx) -> AsyncIterator[pb.ModelChunk]:
        site = require_role(context, Role.PARTICIPANT).name
        model = self.c.model_for(site, request)
        yield pb.ModelChunk(manifest=model.manifest())
        for i, chunk in enumerate(model.chunks()):
            yield pb.ModelChunk(data=bytes(chunk))
            if i == 0:
                failpoints.hit("coordinator.model_streaming", round=self.c.model_round())

    @translated
    async def UploadUpdate(self, request_iterator: AsyncIterator[pb.UpdateChunk], context: Ctx) -> pb.UploadReply:
        site = require_role(context, Role.PARTICIPANT).name
        iterator = aiter(request_iterator)
        try:
            first = await anext(iterator)
        except StopAsyncIteration:
            raise InvalidArgument("empty upload: the first message must be the update header") from None
        if first.WhichOneof("kind") != "header":
            raise InvalidArgument("the first message of an upload must be its header")
        return await self.c.receive_upload(site, first.header, iterator)

    @translated
    async def SecAgg(self, request: pb.SecAggMessage, context: Ctx) -> pb.Ack:
        site = require_role(context, Role.PARTICIPANT).name
        self.c.receive_secagg(site, request)
        return pb.Ack()

    @translated
    async def Decline(self, request: pb.DeclineRequest, context: Ctx) -> pb.Ack:
        site = require_role(context, Role.PARTICIPANT).name
        self.c.receive_decline(site, request)
        return pb.Ack()

    @translated
    async def ReportEvaluation(self, request: pb.EvaluationReport, context: Ctx) -> pb.Ack:
        site = require_role(context, Role.PARTICIPANT).name
        self.c.receive_evaluation(site, request)
        return pb.Ack()


class AdminServicer(pb_grpc.AdminServicer):
    def __init__(self, coordinator: Coordinator) -> None:
        self.c = coordinator

    @translated
    async def StartJob(self, request: pb.StartJobRequest, context: Ctx) -> pb.JobStatus:
        admin = require_role(context, Role.ADMIN).name
        return self.c.start_job_from_proto(request.spec, actor=admin)

    @translated
    async def StopJob(self, request: pb.StopJobRequest, context: Ctx) -> pb.JobStatus:
        admin = require_role(context, Role.ADMIN).name
        return self.c.stop_job(request.job_id, request.reason or f"stopped by admin {admin}", actor=admin)

    @translated
    async def GetStatus(self, request: pb.StatusRequest, context: Ctx) -> pb.StatusReply:
        require_role(context, Role.ADMIN)
        return self.c.status()
