"""Limits on an incoming upload stream, applied before the domain sees a message.

:class:`GuardedStream` wraps a client stream's request iterator. It ends the call with

- DEADLINE_EXCEEDED when no message arrives for ``idle_timeout_s`` (a stalled or slow-loris sender) or the whole
  transfer is not complete within ``deadline_s`` (a trickle that stays just under the idle timeout);
- RESOURCE_EXHAUSTED when the stream carries more than ``max_chunks`` chunks (a flood of tiny chunks) or a chunk
  over ``max_chunk_bytes``;
- PERMISSION_DENIED when the caller's certificate is revoked while it is sending.

It raises inside the consumer's ``async for``, so the upload intake discards its spool and changes nothing, exactly as
for a stream that broke off.

Admission (:class:`TransferGate`): at most ``server.max_concurrent_uploads`` uploads are read at once. A stream past its
header waits for a slot *before* its first data chunk is read; while it waits nothing reads it, so HTTP/2 flow
control stops the sender once the stream's window (``server.stream_window_bytes``) is full, and the coordinator holds
at most that window per waiting upload instead of whatever the transport had buffered. The wait is not a stall: the
idle timeout does not run and the transfer deadline starts when the slot is granted. The site is not dropped while it
waits either (it has its train task in hand: liveness leaves it to HTTP/2 keepalive, and its connection is alive).

Downloads are admitted the same way (``server.max_concurrent_downloads``): a model stream sends its manifest, then
waits for a slot before its first data chunk. Every stream being written holds a few chunks queued in the transport,
so without a bound the coordinator's memory grew by about 1.7 MiB per site while a round's downloads ran. The
waiting site's call deadline (its ``transfer_timeout_s``) keeps running; the link's bandwidth is shared either way,
so the last download ends when it would have without the bound. A download that takes no chunk for
``server.upload_idle_timeout_s`` gives its slot back (:class:`Lease`) and goes on outside admission, so a member
site that asks for the model and stops reading cannot keep the others waiting.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from common.errors import DeadlineExceeded, ResourceExhausted
from common.proto.cohort.v1 import cohort_pb2 as pb
from coordinator.rpc.wire import refuse_undecodable


@dataclass(frozen=True)
class StreamLimits:
    idle_timeout_s: float
    deadline_s: float
    max_chunks: int  # data chunks after the header
    max_chunk_bytes: int


class TransferGate:
    """At most ``limit`` transfers at once, admitted in arrival order (0: no limit): uploads being read
    (``server.max_concurrent_uploads``) or model downloads being written (``server.max_concurrent_downloads``)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._slots = asyncio.Semaphore(limit) if limit > 0 else None
        self.active = 0  # uploads holding a slot
        self.waiting = 0  # uploads past their header, waiting for one
        self.peak_active = 0

    async def acquire(self) -> None:
        if self._slots is not None:
            self.waiting += 1
            try:
                await self._slots.acquire()
            finally:
                self.waiting -= 1
        self.active += 1
        self.peak_active = max(self.peak_active, self.active)

    def release(self) -> None:
        self.active -= 1
        if self._slots is not None:
            self._slots.release()

    async def lease(self, idle_s: float) -> Lease:
        """A slot that is given back after ``idle_s`` without :meth:`Lease.touch` (a download whose reader stopped
        reading: it goes on outside admission rather than keep the others waiting), or at :meth:`Lease.release`."""
        await self.acquire()
        return Lease(self, idle_s)


class Lease:
    """One admitted transfer's slot, held while it makes progress (see :meth:`TransferGate.lease`)."""

    def __init__(self, gate: TransferGate, idle_s: float) -> None:
        self._gate, self._idle_s = gate, idle_s
        self.held = True
        self._timer = asyncio.get_running_loop().call_later(idle_s, self.release)

    def touch(self) -> None:
        """Progress: the idle clock starts again."""
        if self.held:
            self._timer.cancel()
            self._timer = asyncio.get_running_loop().call_later(self._idle_s, self.release)

    def release(self) -> None:
        self._timer.cancel()
        if self.held:
            self.held = False
            self._gate.release()


def _consume(task: asyncio.Future[pb.UpdateChunk]) -> None:
    # A read cancelled after it already failed: its exception is of no interest any more.
    if not task.cancelled():
        task.exception()


class GuardedStream:
    """An ``AsyncIterator[pb.UpdateChunk]`` over ``source`` within ``limits``. Call :meth:`close` when done."""

    def __init__(
        self,
        source: AsyncIterator[pb.UpdateChunk],
        limits: StreamLimits,
        *,
        revoked: asyncio.Event | None = None,
        on_revoked: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
        gate: TransferGate | None = None,
    ) -> None:
        self._source = aiter(source)
        self.limits = limits
        self._revoked = revoked
        self._on_revoked = on_revoked
        self._clock = clock
        self._deadline = clock() + limits.deadline_s
        self._revoked_wait: asyncio.Future[Any] | None = None
        self._gate = gate
        self._admitted = False
        self.messages = 0

    def __aiter__(self) -> GuardedStream:
        return self

    async def _read(self) -> pb.UpdateChunk:
        return await anext(self._source)

    def _check_revoked(self) -> None:
        if self._revoked is not None and self._revoked.is_set():
            self._on_revoked()  # raises CertificateRevoked

    async def _admit(self) -> None:
        """Wait for an upload slot (the header has been read; no data chunk yet). A revocation ends the wait."""
        assert self._gate is not None
        slot = asyncio.ensure_future(self._gate.acquire())
        waiters: set[asyncio.Future[Any]] = {slot}
        if self._revoked is not None:
            if self._revoked_wait is None:
                self._revoked_wait = asyncio.ensure_future(self._revoked.wait())
            waiters.add(self._revoked_wait)
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not slot.done():
                slot.cancel()  # the semaphore hands a slot granted meanwhile on to the next upload
            elif not slot.cancelled() and slot.exception() is None:
                self._admitted = True  # close() gives it back, however this call ends
        self._check_revoked()  # the only other way out of the wait
        self._deadline = self._clock() + self.limits.deadline_s  # the transfer deadline runs from admission

    async def __anext__(self) -> pb.UpdateChunk:
        self._check_revoked()
        if self._gate is not None and not self._admitted and self.messages >= 1:
            await self._admit()
        remaining = self._deadline - self._clock()
        if remaining <= 0:
            raise self._too_slow()
        timeout = min(self.limits.idle_timeout_s, remaining)
        read = asyncio.ensure_future(self._read())
        waiters: set[asyncio.Future[Any]] = {read}
        if self._revoked is not None:
            if self._revoked_wait is None:
                self._revoked_wait = asyncio.ensure_future(self._revoked.wait())
            waiters.add(self._revoked_wait)
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not read.done():
                read.cancel()
                read.add_done_callback(_consume)
        if not read.done() or read.cancelled():
            self._check_revoked()
            if timeout < self.limits.idle_timeout_s:
                raise self._too_slow()
            raise DeadlineExceeded(
                f"upload stalled: no message for {self.limits.idle_timeout_s:g} s (server.upload_idle_timeout_s); "
                "the partial upload was discarded"
            )
        try:
            msg = read.result()  # the transport's error if the stream broke
        except StopAsyncIteration:
            self._check_revoked()  # the last look before the intake verifies and folds the upload
            raise
        self.messages += 1
        refuse_undecodable(msg)
        if self.messages > self.limits.max_chunks + 1:
            raise ResourceExhausted(
                f"upload has more than {self.limits.max_chunks} chunks (server.max_upload_chunks); send larger "
                "chunks; the partial upload was discarded"
            )
        if msg.WhichOneof("kind") == "data" and len(msg.data) > self.limits.max_chunk_bytes:
            raise ResourceExhausted(
                f"chunk of {len(msg.data)} bytes exceeds the limit of {self.limits.max_chunk_bytes} bytes "
                "(server.max_chunk_bytes); the partial upload was discarded"
            )
        self._check_revoked()
        return msg

    def _too_slow(self) -> DeadlineExceeded:
        return DeadlineExceeded(
            f"upload not complete within {self.limits.deadline_s:g} s (server.upload_deadline_s); "
            "the partial upload was discarded"
        )

    def close(self) -> None:
        if self._admitted:
            assert self._gate is not None
            self._gate.release()
            self._admitted = False
        if self._revoked_wait is not None and not self._revoked_wait.done():
            self._revoked_wait.cancel()
