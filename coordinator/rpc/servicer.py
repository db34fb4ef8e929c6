"""Thin gRPC servicers: read the caller's certificate once (role, revocation), call a handler, convert the result.

Errors are translated once, in :func:`translated` / :func:`translated_stream`: a :class:`CohortError` becomes its
status code and message; anything else becomes INTERNAL with a generic message and a logged traceback. Every refusal
is audited; refusals a caller can repeat at will (rate limits, a revoked certificate) at most once per window, with a
count, so a flood cannot fill the audit log.

Hostile input is cut here, before the domain: uploads go through :class:`GuardedStream` (idle timeout, transfer
deadline, chunk count and size, revocation while sending).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from common import failpoints
from common.certs import Role
from common.errors import (
    RETRY_AFTER_KEY,
    CertificateRevoked,
    ForeignFederation,
    InvalidArgument,
    PermissionDenied,
    RateLimited,
    RpcError,
    status_for,
)
from common.proto.cohort.v1 import cohort_pb2 as pb
from common.proto.cohort.v1 import cohort_pb2_grpc as pb_grpc
from common.raw_chunks import data_message
from common.tls import CertRef, cert_ref
from coordinator.federation import Federation
from coordinator.handlers import admin as admin_handlers
from coordinator.handlers import models as model_handlers
from coordinator.handlers import participant as handlers
from coordinator.rpc.upload_guard import GuardedStream, StreamLimits, TransferGate
from coordinator.rpc.wire import refuse_undecodable

log = logging.getLogger("cohort.coordinator.rpc")

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Ctx = grpc.aio.ServicerContext[Any, Any]


async def _abort(servicer: Any, context: Ctx, method: str, exc: BaseException) -> None:
    code, message, trailing = refusal(servicer, _actor(context), method, exc)
    await context.abort(code, message, trailing)


def _actor(context: Ctx) -> str:
    try:
        return cert_ref(context).name
    except RpcError:
        return "unauthenticated"


def refusal(
    servicer: Any, actor: str, method: str, exc: BaseException
) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    """Count, log and audit a refused call; its status, public message and trailing metadata (gRPC or the bulk data
    channel, coordinator/rpc/bulk.py)."""
    code, message = status_for(exc)
    ops = getattr(getattr(servicer, "c", None), "ops", None)
    if ops is not None:
        ops.refused(method, code.name)
    trailing: tuple[tuple[str, str], ...] = ()
    if isinstance(exc, RpcError):
        log.info("%s refused: %s: %s", method, code.name, message)
        _audit_refusal(servicer, actor, method, exc, code.name, message)
        if isinstance(exc, RateLimited):
            trailing = ((RETRY_AFTER_KEY, str(max(1, round(exc.retry_after_s * 1000)))),)
    else:
        log.error("%s failed with an unexpected error", method, exc_info=exc)
    return code, message, trailing


def _audit_refusal(servicer: Any, actor: str, method: str, exc: RpcError, code: str, message: str) -> None:
    """Every refused request is an audit event (who, which call, which status, why); never its payload."""
    kind = exc.audit_kind if isinstance(exc, RateLimited) else "rpc_refused"
    throttled = isinstance(exc, RateLimited | CertificateRevoked | ForeignFederation)  # repeatable at will: counted
    audit_as(servicer, actor, kind, throttled, method=method, code=code, message=message[:300])


def _audit(servicer: Any, context: Ctx, kind: str, throttled: bool, **detail: Any) -> None:
    audit_as(servicer, _actor(context), kind, throttled, **detail)


def audit_as(servicer: Any, actor: str, kind: str, throttled: bool, **detail: Any) -> None:
    coordinator = getattr(servicer, "c", None)
    if coordinator is None:
        return
    if throttled:
        held = coordinator.audit_throttle.admit((kind, actor, detail.get("method")))
        if held is None:
            return  # counted; the next event of this kind from this caller says how many were held back
        detail["held_back"] = held
    try:
        coordinator.store.audit(kind, actor, **detail)
    except Exception:  # the store may be closing during shutdown; the refusal itself still goes out
        log.debug("could not audit a refusal", exc_info=True)


def translated(
    fn: Callable[[Any, Req, Ctx], Awaitable[Resp]],
) -> Callable[[Any, Req, Ctx], Awaitable[Resp]]:
    @functools.wraps(fn)
    async def wrapper(self: Any, request: Req, context: Ctx) -> Resp:
        try:
            refuse_undecodable(request)
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
            refuse_undecodable(request)
            async for item in fn(self, request, context):
                yield item
        except Exception as exc:
            if isinstance(exc, grpc.aio.AbortError):
                raise
            await _abort(self, context, fn.__name__, exc)

    return wrapper


def caller(context: Ctx, role: Role, state: Federation) -> CertRef:
    """The caller's certificate, read once per call: issued for this federation, with ``role``, not revoked."""
    return check_caller(cert_ref(context), role, state)


def check_caller(ref: CertRef, role: Role, state: Federation) -> CertRef:
    """``ref`` if it was issued for this federation, with ``role``, and is not revoked."""
    ref.require_federation(state.config.federation.name)
    if ref.role is not role:
        raise PermissionDenied(
            f"this call needs {role.with_article()} certificate; the caller presented "
            f"{ref.role.with_article()} certificate for {ref.name!r}"
        )
    state.revocations.check(ref)
    return ref


class FederationServicer(pb_grpc.FederationServicer):
    def __init__(self, state: Federation) -> None:
        self.c = state
        server = state.config.server
        self.upload_limits = StreamLimits(
            idle_timeout_s=server.upload_idle_timeout_s,
            deadline_s=server.upload_deadline_s,
            max_chunks=server.max_upload_chunks,
            max_chunk_bytes=server.max_chunk_bytes,
        )
        self.upload_gate = TransferGate(server.max_concurrent_uploads)
        self.download_gate = TransferGate(server.max_concurrent_downloads)

    def _site(self, context: Ctx) -> CertRef:
        """The calling site's certificate: a participant certificate that is not revoked."""
        return caller(context, Role.PARTICIPANT, self.c)

    @translated
    async def Join(self, request: pb.JoinRequest, context: Ctx) -> pb.JoinReply:
        return handlers.join(self._site(context), request, self.c)

    @translated_stream
    async def WaitForWork(self, request: pb.WaitRequest, context: Ctx) -> AsyncIterator[pb.WorkItem]:
        ref = self._site(context)
        async for item in handlers.work_stream(ref, request, self.c):
            yield item
        self.c.revocations.check(ref)  # a revoked site's stream ends with PERMISSION_DENIED, not a clean end

    @translated
    async def Heartbeat(self, request: pb.HeartbeatRequest, context: Ctx) -> pb.Ack:
        return handlers.heartbeat(self._site(context), request, self.c)

    @translated_stream
    async def DownloadModel(  # type: ignore[override]  # data chunks go out pre-serialized (wire._encode)
        self, request: pb.ModelRequest, context: Ctx
    ) -> AsyncIterator[pb.ModelChunk | bytes]:
        ref = self._site(context)
        with self.c.revocations.watch(ref) as revoked:
            model = handlers.download_model(ref, request, self.c)
            yield pb.ModelChunk(manifest=model.manifest())
            # server.max_concurrent_downloads; a reader that stops reading gives its slot back (upload_guard.py)
            slot = await self.download_gate.lease(self.upload_limits.idle_timeout_s)
            try:
                for i, chunk in enumerate(model.chunks()):
                    if revoked.is_set():
                        self.c.revocations.check(ref)
                    yield data_message(chunk)  # a serialized ModelChunk{data}: one copy of the shared model buffer
                    slot.touch()
                    if i == 0:
                        failpoints.hit("coordinator.model_streaming", round=self.c.model_round())
            finally:
                slot.release()
            if self.c.ops is not None:
                self.c.ops.model_sent(len(model.data))

    @translated
    async def UploadUpdate(self, request_iterator: AsyncIterator[pb.UpdateChunk], context: Ctx) -> pb.UploadReply:
        ref = self._site(context)
        with self.c.revocations.watch(ref) as revoked:
            stream = GuardedStream(
                request_iterator,
                self.upload_limits,
                revoked=revoked,
                on_revoked=lambda: self.c.revocations.check(ref),
                gate=self.upload_gate,
            )
            try:
                try:
                    first = await anext(stream)
                except StopAsyncIteration:
                    raise InvalidArgument("empty upload: the first message must be the update header") from None
                if first.WhichOneof("kind") != "header":
                    raise InvalidArgument("the first message of an upload must be its header")
                reply = await handlers.upload(ref, first.header, stream, self.c)
                if self.c.ops is not None:
                    self.c.ops.update_received("grpc")
                return reply
            except asyncio.CancelledError:
                # gRPC cancels the handler when the client goes away or the transport refuses a message (one over
                # the size limit): the runner has discarded the spool; record that a transfer broke off.
                _audit(self, context, "upload_cancelled", True, method="UploadUpdate", messages=stream.messages)
                raise
            finally:
                stream.close()

    @translated
    async def SecAgg(self, request: pb.SecAggMessage, context: Ctx) -> pb.Ack:
        return await handlers.secagg(self._site(context), request, self.c)

    @translated
    async def Decline(self, request: pb.DeclineRequest, context: Ctx) -> pb.Ack:
        return await handlers.decline(self._site(context), request, self.c)

    @translated
    async def ReportEvaluation(self, request: pb.EvaluationReport, context: Ctx) -> pb.Ack:
        return await handlers.report_evaluation(self._site(context), request, self.c)


class AdminServicer(pb_grpc.AdminServicer):
    def __init__(self, state: Federation) -> None:
        self.c = state

    def _admin(self, context: Ctx) -> str:
        """The calling admin's name: an admin certificate that is not revoked (by serial or fingerprint)."""
        return caller(context, Role.ADMIN, self.c).name

    @translated
    async def StartJob(self, request: pb.StartJobRequest, context: Ctx) -> pb.JobStatus:
        return await admin_handlers.start_job(self._admin(context), request, self.c)

    @translated
    async def StopJob(self, request: pb.StopJobRequest, context: Ctx) -> pb.JobStatus:
        return await admin_handlers.stop_job(self._admin(context), request, self.c)

    @translated
    async def GetStatus(self, request: pb.StatusRequest, context: Ctx) -> pb.StatusReply:
        return admin_handlers.status(self._admin(context), request, self.c)

    @translated
    async def ClearSuspension(self, request: pb.ClearSuspensionRequest, context: Ctx) -> pb.JobStatus:
        return await admin_handlers.clear_suspension(self._admin(context), request, self.c)

    @translated_stream
    async def DownloadModelFile(self, request: pb.ModelFileRequest, context: Ctx) -> AsyncIterator[pb.ModelFileChunk]:
        async for chunk in model_handlers.model_file(self._admin(context), request, self.c):
            yield chunk

    @translated
    async def CancelJob(self, request: pb.CancelJobRequest, context: Ctx) -> pb.JobStatus:
        return await admin_handlers.cancel_job(self._admin(context), request, self.c)
