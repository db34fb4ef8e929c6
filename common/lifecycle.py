"""Daemon lifecycle: the status enum, the lifecycle both daemons share, and signal handling that only sets an event."""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import signal
from types import TracebackType
from typing import Self

log = logging.getLogger("cohort.lifecycle")


class Status(enum.Enum):
    INIT = "init"
    STARTING = "starting"
    RUNNING = "running"
    CLOSING = "closing"
    CLOSED = "closed"
    FAILED = "failed"


def cancel_requested() -> bool:
    """Whether the running task has been asked to stop (``Task.cancel``), even if the CancelledError never reached
    it: grpc.aio answers a call that fails as it is cancelled with the call's own error (an ``AioRpcError``) and the
    cancel is lost. A loop that handles errors and goes on must check this, or it outlives its daemon's close."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def install_stop_handlers(stop: asyncio.Event) -> None:
    """SIGTERM/SIGINT set ``stop``; a second signal exits at once (the operator insists)."""
    loop = asyncio.get_running_loop()

    def first(signum: int) -> None:
        log.info(
            "received %s; shutting down gracefully (send it again to exit at once)",
            signal.Signals(signum).name,
        )
        stop.set()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, second, sig)

    def second(signum: int) -> None:
        log.warning("received %s again; exiting now", signal.Signals(signum).name)
        os._exit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, first, sig)


class Lifecycle:
    """The lifecycle both daemons share: a :class:`Status`, an idempotent ``start()`` that returns the bound address
    (empty for a daemon that does not listen), ``close(reason)`` that runs once (later callers wait for it), and
    ``async with``. Subclasses implement :meth:`_start` and :meth:`_close`."""

    def __init__(self) -> None:
        self.status = Status.INIT
        self.address = ""
        self._closed = asyncio.Event()

    async def _start(self) -> str:
        raise NotImplementedError

    async def _close(self, reason: str) -> None:
        raise NotImplementedError

    async def start(self) -> str:
        if self.status is not Status.INIT:
            return self.address
        self.status = Status.STARTING
        self.address = await self._start()
        if self.status is Status.STARTING:
            self.status = Status.RUNNING
        return self.address

    async def close(self, reason: str = "shutdown") -> None:
        if self.status in (Status.CLOSING, Status.CLOSED):
            await self._closed.wait()
            return
        self.status = Status.CLOSING
        log.info("%s closing: %s", type(self).__name__, reason)
        try:
            await self._close(reason)
        finally:
            self.status = Status.CLOSED
            self._closed.set()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close("context exit")
