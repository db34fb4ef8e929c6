"""The coordinator daemon: one lifecycle object around the gRPC server and the :class:`Coordinator`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from common.lifecycle import Status, install_stop_handlers
from common.settings import parse_address
from common.tls import keepalive_options, message_options, server_credentials, tls_files
from coordinator.config import CoordinatorConfig
from coordinator.round.runner import ProgressHook
from coordinator.rpc.servicer import AdminServicer, FederationServicer
from coordinator.rpc.wire import add_service
from coordinator.service import Coordinator

log = logging.getLogger("cohort.coordinator")

SERVICES = ("cohort.v1.Federation", "cohort.v1.Admin")


class CoordinatorDaemon:
    """``start()`` binds and returns the address; ``close(reason)`` drains and stops; usable as ``async with``."""

    def __init__(self, config: CoordinatorConfig, progress: ProgressHook | None = None) -> None:
        self.config = config
        self.status = Status.INIT
        self._coordinator: Coordinator | None = None
        self.address = ""
        self._progress = progress
        self._server: grpc.aio.Server | None = None
        self._health: health.aio.HealthServicer | None = None
        self._closed = asyncio.Event()
        self._liveness: asyncio.Task[None] | None = None

    async def start(self) -> str:
        if self.status is not Status.INIT:
            return self.address
        self.status = Status.STARTING
        cfg = self.config
        assert cfg.server.tls is not None  # checked when the config was loaded
        credentials = server_credentials(tls_files(cfg.server.tls))
        coordinator = Coordinator(cfg, progress=self._progress)
        server = grpc.aio.server(
            options=keepalive_options(cfg.server.heartbeat_interval_s / 2, cfg.server.keepalive_timeout)
            + message_options(cfg.server.max_chunk_bytes + (64 << 10))
        )
        add_service(server, "Federation", FederationServicer(coordinator))
        add_service(server, "Admin", AdminServicer(coordinator))
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        host, _ = parse_address(cfg.server.listen, "server.listen")
        port = server.add_secure_port(cfg.server.listen, credentials)
        if port == 0:
            raise OSError(f"cannot listen on {cfg.server.listen}")
        await server.start()
        for name in ("", *SERVICES):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._server, self._coordinator = server, coordinator
        self._liveness = asyncio.create_task(coordinator.watch_liveness(), name="coordinator-liveness")
        self.address = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
        self.status = Status.RUNNING
        log.info("coordinator for federation %r listening on %s (mutual TLS)", cfg.federation.name, self.address)
        resumed = coordinator.resume_jobs()
        if resumed is not None:
            log.info("resuming job %s after a restart", resumed.job_id)
        elif cfg.job is not None:
            coordinator.start_job(cfg.job)
        return self.address

    async def close(self, reason: str = "shutdown") -> None:
        if self.status in (Status.CLOSING, Status.CLOSED):
            await self._closed.wait()
            return
        self.status = Status.CLOSING
        log.info("coordinator closing: %s", reason)
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if self._coordinator is not None:
            await self._coordinator.drain()
        if self._liveness is not None:
            self._liveness.cancel()
            await asyncio.gather(self._liveness, return_exceptions=True)
        if self._server is not None:
            await self._server.stop(self.config.server.shutdown_grace_s)
        if self._coordinator is not None:
            self._coordinator.close()
        self.status = Status.CLOSED
        self._closed.set()

    @property
    def coordinator(self) -> Coordinator:
        """The domain object (sessions, jobs, store); available once started."""
        if self._coordinator is None:
            raise RuntimeError("the coordinator daemon has not been started")
        return self._coordinator

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def __aenter__(self) -> CoordinatorDaemon:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close("context exit")


async def run(config: CoordinatorConfig, ready_file: Path | None = None, exit_when_done: bool = False) -> int:
    """Run until SIGTERM/SIGINT (or, with ``exit_when_done``, until the configured job ends)."""
    stop = asyncio.Event()
    install_stop_handlers(stop)
    daemon = CoordinatorDaemon(config)
    address = await daemon.start()
    # SIGHUP: re-read the deny-list now (it is also polled every federation.deny_list_poll_s).
    with contextlib.suppress(NotImplementedError, RuntimeError):
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, daemon.coordinator.revocations.reload)
    if ready_file is not None:
        tmp = ready_file.with_suffix(".tmp")
        tmp.write_text(address + "\n")
        tmp.replace(ready_file)
    waiters: list[asyncio.Future[Any]] = [asyncio.ensure_future(stop.wait())]
    if exit_when_done and daemon.coordinator.runner is not None:
        waiters.append(asyncio.ensure_future(daemon.coordinator.wait_job()))
    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    for w in waiters:
        w.cancel()
    await daemon.close("signal" if stop.is_set() else "job finished")
    runner = daemon.coordinator.runner
    return 0 if runner is None or runner.state in ("finished", "running", "stopped", "interrupted") else 1
