"""TLS handshake refusals made visible: a WARNING line and an audit event per peer, throttled.

gRPC refuses a client without a certificate, with one from another CA, expired, not yet valid or not for client use
during the TLS handshake, before any call exists, and grpcio tells Python nothing about it. :mod:`common.handshake_log`
reads those refusals from gRPC core's own log in a filter process that this process's stderr goes through; here
:class:`HandshakeWatch` reads the refusals it finds and :class:`HandshakeRefusals` turns each one into

- one log line at WARNING: ``TLS handshake refused: peer=ipv4:10.0.0.7:51234 reason=expired detail='...'``
  (the reason class and the peer address are also ``extra`` fields for structured log handlers);
- an audit event ``tls_handshake_refused`` (actor ``unauthenticated``; peer, reason, detail), shown by
  ``cohort audit list``.

Both at most once per peer host, reason class and minute (the next one says how many were held back, like the
Join limiter's audit events), and at most :data:`OVERALL_PER_MIN` a minute from all peers together: handshakes come
from anyone on the network, unauthenticated, so neither the log nor the audit table may grow with a flood. A
connection closed before its handshake finished (a port scan, a load balancer's TCP probe) is logged at INFO and not
audited: it is not a refusal.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from typing import IO

from common.handshake_log import HandshakeFailure, running_filter
from coordinator.rpc.ratelimit import AUDIT_WINDOW_S, AuditThrottle, TokenBucket

log = logging.getLogger("cohort.coordinator.tls")

AUDIT_KIND = "tls_handshake_refused"
OVERALL_PER_MIN = 30  # log lines and audit events about refused handshakes, from all peers together

AuditFn = Callable[..., None]


def peer_host(peer: str) -> str:
    """``ipv4:10.0.0.7:51234`` -> ``10.0.0.7``; ``ipv6:[::1]:5555`` -> ``::1`` (the port changes per connection)."""
    address = peer.split(":", 1)[1] if peer.startswith(("ipv4:", "ipv6:")) else peer
    host = address.rsplit(":", 1)[0] if ":" in address else address
    return host.strip("[]")


def port_of(address: str) -> int | None:
    try:
        return int(address.rsplit(":", 1)[1])
    except (IndexError, ValueError):
        return None


class HandshakeRefusals:
    """Throttled log lines and audit events for refused handshakes on ``port`` (None: any port)."""

    def __init__(
        self,
        audit: AuditFn,
        port: int | None = None,
        window_s: float = AUDIT_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._audit = audit
        self.port = port
        self._per_peer = AuditThrottle(window_s, clock)
        self._overall = TokenBucket.full(OVERALL_PER_MIN / 60, OVERALL_PER_MIN, clock())
        self._clock = clock
        self._suppressed = 0  # admitted per peer, but over the overall cap

    def report(self, failure: HandshakeFailure) -> None:
        if self.port is not None and port_of(failure.local) not in (None, self.port):
            return  # another listener in this process, or this process acting as a client
        held = self._per_peer.admit((peer_host(failure.peer), failure.reason))
        if held is None:
            return
        self._overall.refill(self._clock())
        if self._overall.tokens < 1:
            self._suppressed += 1 + held
            return
        self._overall.tokens -= 1
        suppressed, self._suppressed = self._suppressed, 0
        notes = "".join(
            [
                f" (+{held} more from this host in the last minute)" if held else "",
                f" (+{suppressed} from other peers not shown: too many refusals)" if suppressed else "",
            ]
        )
        incomplete = failure.reason == "incomplete"
        log.log(
            logging.INFO if incomplete else logging.WARNING,
            "TLS handshake %s: peer=%s reason=%s detail=%r%s",
            "not completed" if incomplete else "refused",
            failure.peer,
            failure.reason,
            failure.detail,
            notes,
            extra={"peer": failure.peer, "reason": failure.reason},
        )
        if incomplete:
            return
        try:
            self._audit(
                AUDIT_KIND,
                "unauthenticated",
                peer=failure.peer,
                reason=failure.reason,
                detail=failure.detail,
                held_back=held,
                **({"others_held_back": suppressed} if suppressed else {}),
            )
        except Exception:  # the store may be closing; the log line above is already out
            log.debug("could not audit a refused handshake", exc_info=True)


class HandshakeWatch:
    """Reports the failures the filter process (:func:`common.handshake_log.start_filter`) writes, until closed."""

    def __init__(self, events: IO[bytes], report: Callable[[HandshakeFailure], None]) -> None:
        self._events = events
        self._report = report
        self._transport: asyncio.ReadTransport | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    async def start(self) -> None:
        reader = asyncio.StreamReader()
        loop = asyncio.get_running_loop()
        self._transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), self._events)
        self._task = asyncio.create_task(self._read(reader), name="handshake-log")

    async def _read(self, reader: asyncio.StreamReader) -> None:
        async for raw in reader:
            try:
                self._report(HandshakeFailure(**json.loads(raw)))
            except Exception:
                log.exception("could not report a refused TLS handshake")
        if not self._closing:
            running = running_filter()
            if running is not None:
                running.restore()  # its input would lead nowhere: give this process its stderr back
            log.warning("the gRPC log filter exited; TLS handshake refusals are no longer reported")

    async def close(self) -> None:
        """Stop reporting (the filter itself runs on until the process exits, passing its stderr through)."""
        self._closing = True
        if self._transport is not None:
            self._transport.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


async def watch_handshakes(
    audit: AuditFn, port: int, count: Callable[[str], None] | None = None
) -> HandshakeWatch | None:
    """Report refused handshakes on ``port`` if this process runs behind the gRPC log filter (`cohort coordinator`);
    ``count(reason)`` hears of every refusal, before the log and audit throttles (metrics)."""
    running = running_filter()
    if running is None:
        log.debug("TLS handshake refusals are not reported: start the coordinator with `cohort coordinator`")
        return None
    refusals = HandshakeRefusals(audit, port)

    def report(failure: HandshakeFailure) -> None:
        if count is not None and failure.reason != "incomplete" and port_of(failure.local) in (None, port):
            count(failure.reason)
        refusals.report(failure)

    watch = HandshakeWatch(running.events, report)
    await watch.start()
    return watch
