"""The coordinator daemon: one lifecycle object around the gRPC server and the :class:`Federation` state."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import signal
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from common import files
from common.lifecycle import Lifecycle, Status, install_stop_handlers
from common.ops_http import OpsHttpServer
from common.tls import flow_control_options, keepalive_options, message_options, server_credentials
from coordinator.config import CoordinatorConfig
from coordinator.federation import Federation
from coordinator.observe.dashboard import add_routes
from coordinator.observe.watch import Observability
from coordinator.round.runner import ProgressHook
from coordinator.rpc.bulk import BulkServer
from coordinator.rpc.handshakes import HandshakeWatch, watch_handshakes
from coordinator.rpc.listen import NO_REUSEPORT, bind, bind_data, resolve
from coordinator.rpc.servicer import AdminServicer, FederationServicer
from coordinator.rpc.upload_guard import TransferGate
from coordinator.rpc.wire import add_service

log = logging.getLogger("cohort.coordinator")

SERVICES = ("cohort.v1.Federation", "cohort.v1.Admin")
M_ARENA_MAX = -8  # glibc mallopt parameter
MALLOC_ARENAS = 2


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas (as ``MALLOC_ARENA_MAX`` would), before the server starts its threads.

    glibc gives each thread that allocates concurrently an arena of its own (up to 8 per core), and memory freed in
    one is not reused by another: gRPC's poller and completion threads, the thread pool that writes spools and
    folds, and torch's threads each kept their high-water mark, which showed as coordinator RSS above the model's
    size (issue 15). False where this is not glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(M_ARENA_MAX, arenas))
    except (OSError, AttributeError):
        return False


class CoordinatorDaemon(Lifecycle):
    """``start()`` binds and returns the address; ``close(reason)`` drains and stops; usable as ``async with``."""

    def __init__(self, config: CoordinatorConfig, progress: ProgressHook | None = None) -> None:
        super().__init__()
        self.config = config
        self._coordinator: Federation | None = None
        self._progress = progress
        self._server: grpc.aio.Server | None = None
        self._health: health.aio.HealthServicer | None = None
        self._liveness: asyncio.Task[None] | None = None
        self._handshakes: HandshakeWatch | None = None
        self.ops_http: OpsHttpServer | None = None  # /healthz, /readyz when config.http.listen is set
        self.upload_gate: TransferGate | None = None
        self.download_gate: TransferGate | None = None
        self.bulk: BulkServer | None = None  # the data channel, when server.data_listen is set

    async def _start(self) -> str:
        cfg = self.config
        assert cfg.server.tls is not None  # checked when the config was loaded
        credentials = server_credentials(cfg.server.tls, federation=cfg.federation.name)
        host, _ = resolve(cfg.server.listen)  # a host that does not resolve: one line, before anything opens
        if cfg.http.enabled:  # after the certificate checks, before the store opens: /healthz during a long resume
            self.ops_http = OpsHttpServer(cfg.http.listen, self.readiness)
            self.ops_http.start()
        coordinator = Federation(cfg, progress=self._progress)
        coordinator.ops = Observability.attach(coordinator)
        if self.ops_http is not None:
            add_routes(self.ops_http, coordinator, cfg.http.dashboard)  # /metrics (+ /dashboard, /api/dashboard)
        server = grpc.aio.server(
            options=keepalive_options(cfg.server.heartbeat_interval_s / 2, cfg.server.keepalive_timeout)
            + message_options(cfg.server.max_chunk_bytes + (64 << 10))
            + flow_control_options(cfg.server.stream_window_bytes)
            + NO_REUSEPORT
        )
        federation = FederationServicer(coordinator)
        self.upload_gate = federation.upload_gate  # uploads being read and waiting (tests, diagnostics)
        self.download_gate = federation.download_gate
        add_service(server, "Federation", federation)
        add_service(server, "Admin", AdminServicer(coordinator))
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        try:
            port = bind(server, cfg.server.listen, credentials)
            data_address = cfg.server.data_address
            if data_address is not None:
                self.bulk = BulkServer(federation, cfg.server.tls, data_address)
                coordinator.data_port = bind_data(self.bulk, data_address)
        except BaseException:
            coordinator.close()  # the store and the state_dir lock: nothing was served
            if self.ops_http is not None:
                self.ops_http.close()
            raise
        self._handshakes = await watch_handshakes(coordinator.store.audit, port, coordinator.ops.handshake_refused)
        await server.start()
        for name in ("", *SERVICES):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._server, self._coordinator = server, coordinator
        self._liveness = asyncio.create_task(coordinator.watch_liveness(), name="coordinator-liveness")
        address = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
        self.address = address
        self.status = Status.RUNNING
        log.info("coordinator for federation %r listening on %s (mutual TLS)", cfg.federation.name, address)
        if self.bulk is not None:
            log.info("bulk data channel on port %d (mutual TLS)", coordinator.data_port)
        resumed = coordinator.jobs.resume()
        if resumed is not None:
            log.info("resuming job %s after a restart", resumed.job_id)
        elif cfg.job is not None:
            coordinator.jobs.start(cfg.job)
        return address

    async def _close(self, reason: str) -> None:
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if self._coordinator is not None:
            await self._coordinator.drain()
        if self._liveness is not None:
            self._liveness.cancel()
            await asyncio.gather(self._liveness, return_exceptions=True)
        if self._server is not None:
            await self._server.stop(self.config.server.shutdown_grace_s)
        if self.bulk is not None:
            await self.bulk.close()
        if self._handshakes is not None:
            await self._handshakes.close()
        if self._coordinator is not None:
            if self._coordinator.ops is not None:
                await self._coordinator.ops.close()  # run reports being written
            self._coordinator.close()
        if self.ops_http is not None:  # last: /readyz answers 503 for as long as the drain lasts
            await asyncio.to_thread(self.ops_http.close)

    def readiness(self) -> list[str]:
        """What keeps the coordinator from serving (empty: ready). Runs in the HTTP thread: flags only."""
        missing = []
        if self.status is not Status.RUNNING:
            missing.append("draining" if self.status in (Status.CLOSING, Status.CLOSED) else self.status.value)
        if self._server is None:
            missing.append("gRPC server not listening")
        if self._coordinator is None or not self._coordinator.store.is_open:
            missing.append("state store not open")
        return missing

    @property
    def coordinator(self) -> Federation:
        """The coordinator's state (sessions, jobs, store); available once started."""
        if self._coordinator is None:
            raise RuntimeError("the coordinator daemon has not been started")
        return self._coordinator


async def run(config: CoordinatorConfig, ready_file: Path | None = None, exit_when_done: bool = False) -> int:
    """Run until SIGTERM/SIGINT (or, with ``exit_when_done``, until the configured job ends)."""
    limit_malloc_arenas()
    stop = asyncio.Event()
    install_stop_handlers(stop)
    daemon = CoordinatorDaemon(config)
    address = await daemon.start()
    # SIGHUP: re-read the deny-list now (it is also polled every federation.deny_list_poll_s).
    with contextlib.suppress(NotImplementedError, RuntimeError):
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, daemon.coordinator.revocations.reload)
    if ready_file is not None:
        files.write_atomic(ready_file, (address + "\n").encode())
    waiters: list[asyncio.Future[Any]] = [asyncio.ensure_future(stop.wait())]
    if exit_when_done and daemon.coordinator.runner is not None:
        waiters.append(asyncio.ensure_future(daemon.coordinator.jobs.wait()))
    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    for w in waiters:
        w.cancel()
    await daemon.close("signal" if stop.is_set() else "job finished")
    if stop.is_set():
        return 0  # a requested stop is a success whatever the last job did (systemd must not mark the unit failed)
    runner = daemon.coordinator.runner
    return 0 if runner is None or runner.state in ("finished", "running", "stopped", "interrupted") else 1
