"""Daemon lifecycle helpers: status enum and signal handling that only sets an event."""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import signal

log = logging.getLogger("cohort.lifecycle")


class Status(enum.Enum):
    INIT = "init"
    STARTING = "starting"
    RUNNING = "running"
    CLOSING = "closing"
    CLOSED = "closed"
    FAILED = "failed"


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
