"""The participant's link to the coordinator: one mutual-TLS channel, Join, the work stream and heartbeats.

It never listens on a port. A session is Join -> WaitForWork (a server stream of work items and heartbeats). When
the stream ends or goes silent past the heartbeat window, it reconnects with exponential backoff and full jitter; a
silent stream is not given up while the site has a task in hand (``busy``): it may just have been too busy to read.
Permanent refusals (not on the allow-list, wrong task or schema, bad certificate) end it with the coordinator's
message instead of retrying forever. Calls that may be retried go through :meth:`Connection.retrying`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from common.errors import RETRY_AFTER_KEY, RETRYABLE_CODES
from common.proto.cohort.v1 import cohort_pb2 as pb
from common.proto.cohort.v1 import cohort_pb2_grpc as pb_grpc
from common.retry import Backoff
from common.tls import keepalive_options, message_options
from participant.bulk import BulkClient
from participant.config import ParticipantConfig
from participant.stats import SiteStats
from participant.tls_check import MAX_TLS_FAILURES, diagnose, tls_mismatch

log = logging.getLogger("cohort.participant")

# Refusals that retrying cannot fix: stop and tell the operator.
FATAL_CODES = frozenset(
    {
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.ALREADY_EXISTS,  # "duplicate session": another daemon with this site identity took over
    }
)

T = TypeVar("T")


class Connection:
    def __init__(
        self,
        config: ParticipantConfig,
        credentials: grpc.ChannelCredentials,
        join_request: Callable[[], pb.JoinRequest],
        on_item: Callable[[pb.WorkItem], None],
        stop: asyncio.Event,
        busy: Callable[[], bool] = lambda: False,
    ) -> None:
        self.config = config
        self._busy = busy
        self._credentials = credentials
        self._join_request = join_request
        self._on_item = on_item
        self._stop = stop
        self.joined = asyncio.Event()
        self.site_id = ""
        self.job_id = ""
        self.stats = SiteStats()  # this site's counters (participant/stats.py; /metrics on the ops port)
        self._stub: pb_grpc.FederationAsyncStub | None = None
        self._channel: grpc.aio.Channel | None = None
        self._backoff = Backoff(config.reconnect.initial_backoff_s, config.reconnect.max_backoff_s)
        self._tls_failures = 0  # consecutive attempts refused on the coordinator's certificate
        self._displaced: str | None = None  # the coordinator's word that another daemon replaced this one
        self.bulk = BulkClient(config.coordinator, config.tls)  # the data channel, when the coordinator offers one

    @property
    def stub(self) -> pb_grpc.FederationAsyncStub:
        if self._stub is None:
            self._stub = self._open_channel()
        return self._stub

    async def close(self) -> None:
        self.bulk.close()
        if self._channel is not None:
            await self._channel.close()

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds``, or less when the daemon stops."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)

    def _open_channel(self) -> pb_grpc.FederationAsyncStub:
        cfg = self.config.coordinator
        options = keepalive_options(5.0) + message_options(8 << 20)
        # gRPC's own reconnect backoff (1 s growing to 120 s by default) would keep a restarted coordinator waiting;
        # bound it by this daemon's reconnect settings.
        backoff = self.config.reconnect
        options += [
            ("grpc.initial_reconnect_backoff_ms", max(10, int(backoff.initial_backoff_s * 1000))),
            ("grpc.max_reconnect_backoff_ms", max(100, int(backoff.max_backoff_s * 1000))),
        ]
        if cfg.server_name:
            options.append(("grpc.ssl_target_name_override", cfg.server_name))
        self._channel = grpc.aio.secure_channel(cfg.address, self._credentials, options=options)
        return pb_grpc.FederationStub(self._channel)

    async def run(self) -> str | None:
        """Keep a session open until the daemon stops; the coordinator's message if it refused this site for good."""
        stub = self.stub
        while not self._stop.is_set():
            hint = 0.0
            try:
                await self._session(stub)
                if self._displaced is not None:
                    return self._displaced
            except grpc.aio.AioRpcError as exc:
                if exc.code() in FATAL_CODES:
                    return f"coordinator refused this site ({exc.code().name}): {exc.details()}"
                await self._count_tls_failure(exc)
                log.warning("connection to coordinator lost (%s: %s); reconnecting", exc.code().name, exc.details())
                hint = retry_after_s(exc)
            except TimeoutError:
                log.warning("no message from the coordinator within the heartbeat window; reconnecting")
            self.joined.clear()
            # A rate-limited Join says when to come back; never sooner than that, never sooner than the backoff.
            await self.sleep(max(self._backoff.next_delay(), hint))
        return None

    async def _session(self, stub: pb_grpc.FederationAsyncStub) -> None:
        reply: pb.JoinReply = await stub.Join(self._join_request(), timeout=self.config.coordinator.rpc_timeout_s)
        self.site_id, self.job_id = reply.site_id, reply.job_id
        self.bulk.offered(reply.data_port)
        self.stats.joins += 1
        log.info("joined federation %r as site %r", reply.federation, reply.site_id)
        stream = stub.WaitForWork(pb.WaitRequest(session_id=reply.session_id))
        window = 2 * reply.heartbeat_interval_s + 1.0
        beating = asyncio.create_task(self._heartbeats(stub, reply, stream), name="participant-heartbeat")
        read: asyncio.Future[Any] | None = None
        try:
            while not self._stop.is_set():
                read = read or asyncio.ensure_future(stream.read())
                try:
                    # Shielded: cancelling a read would cancel the stream. While this site has a task in hand, a
                    # silent stream is not given up (this site may just have been too busy to read it): the task's
                    # transfers and HTTP/2 keepalive notice a dead coordinator.
                    item = await asyncio.wait_for(asyncio.shield(read), timeout=window)
                except TimeoutError:
                    if self._busy():
                        continue
                    raise
                except asyncio.CancelledError:
                    if beating.done() and not self._stop.is_set():
                        return  # _heartbeats ended the stream: the coordinator dropped this session
                    raise
                read = None
                if item is grpc.aio.EOF:
                    log.info("coordinator ended the work stream")
                    return
                assert isinstance(item, pb.WorkItem)
                if not self.joined.is_set():
                    self.joined.set()
                    self._backoff.reset()
                    self._tls_failures = 0
                self._on_item(item)
        finally:
            beating.cancel()
            stream.cancel()
            if read is not None:
                read.cancel()

    async def _count_tls_failure(self, exc: grpc.aio.AioRpcError) -> None:
        """A refused coordinator certificate is retried :data:`MAX_TLS_FAILURES` times, then a ConfigError."""
        kind = tls_mismatch(exc.details() or "") if exc.code() == grpc.StatusCode.UNAVAILABLE else None
        if kind is None:
            self._tls_failures = 0
            return
        self._tls_failures += 1
        if self._tls_failures >= MAX_TLS_FAILURES:
            cfg = self.config.coordinator
            details = exc.details() or ""
            raise await asyncio.to_thread(diagnose, cfg.address, cfg.server_name, self.config.tls, kind, details)

    async def _heartbeats(self, stub: pb_grpc.FederationAsyncStub, reply: pb.JoinReply, stream: Any) -> None:
        """Tell the coordinator this site is alive, three times per heartbeat interval (it drops a site after one
        silent interval). A refused heartbeat means the session was replaced or dropped: end it and join again."""
        interval = max(0.05, reply.heartbeat_interval_s / 3)
        request = pb.HeartbeatRequest(session_id=reply.session_id)
        while True:
            try:
                await stub.Heartbeat(request, timeout=reply.heartbeat_interval_s)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    log.info("coordinator no longer knows this session (%s); joining again", exc.details())
                    stream.cancel()
                    return
                if exc.code() == grpc.StatusCode.ALREADY_EXISTS:  # a duplicate daemon won: stop, do not rejoin
                    self._displaced = f"coordinator refused this site ({exc.code().name}): {exc.details()}"
                    stream.cancel()
                    return
                log.debug("heartbeat not delivered: %s", exc.code().name)
            await asyncio.sleep(interval)

    async def retrying(self, what: str, deadline: float, call: Callable[[], Awaitable[T]]) -> T:
        """``call()``, retried with backoff on temporary errors until ``deadline`` (or the daemon stops)."""
        backoff = Backoff(self.config.reconnect.initial_backoff_s, self.config.reconnect.max_backoff_s)
        while True:
            try:
                return await call()
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in RETRYABLE_CODES or time.time() >= deadline or self._stop.is_set():
                    raise
                log.info("%s: %s, retrying", what, exc.code().name)
            await self.sleep(min(backoff.next_delay(), max(0.0, deadline - time.time())))

    async def decline(self, job_id: str, round_: int, attempt: int, reason: str, split: str = "") -> None:
        """Tell the coordinator this site will not take part in a round or secure evaluation (best effort)."""
        req = pb.DeclineRequest(job_id=job_id, round=round_, attempt=attempt, reason=reason, split=split)
        with contextlib.suppress(grpc.aio.AioRpcError):
            await self.stub.Decline(req, timeout=self.config.coordinator.rpc_timeout_s)


def retry_after_s(exc: grpc.aio.AioRpcError) -> float:
    """The coordinator's retry hint (trailing metadata of a RESOURCE_EXHAUSTED answer), in seconds; 0 if none."""
    if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return 0.0
    for key, value in exc.trailing_metadata() or ():
        if key == RETRY_AFTER_KEY:
            try:
                return min(300.0, max(0.0, float(value) / 1000))
            except (TypeError, ValueError):
                return 0.0
    return 0.0
