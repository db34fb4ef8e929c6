"""The participant daemon: dials out to the coordinator, waits for work, trains locally, streams updates back.

It composes three parts: :class:`participant.connection.Connection` (the channel, Join, the work stream, heartbeats,
reconnects), :class:`participant.work.Work` (train and evaluate tasks, the model cache, uploads, record-level DP) and
:class:`participant.secagg_client.SecAggSessions` (secure aggregation). The lifecycle is the one both daemons share
(:class:`common.lifecycle.Lifecycle`). It never listens on a port.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import secrets
import socket

import torch
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from common.certs import Role
from common.errors import ConfigError
from common.lifecycle import Lifecycle, Status
from common.logs import quiet_accountant
from common.ops_http import OpsHttpServer, Response
from common.proto.cohort.v1 import cohort_pb2 as pb
from common.tasks import digest as task_code
from common.tasks.base import Task, load_task
from common.tls import channel_credentials
from common.version import VERSION
from participant.config import ParticipantConfig
from participant.connection import Connection
from participant.record_dp import SiteBudget
from participant.secagg_client import SecAggSessions
from participant.secagg_session import SiteKeys
from participant.site import Site
from participant.stats import registry_for
from participant.work import Work, WorkKey

log = logging.getLogger("cohort.participant")

# This process, as the coordinator's duplicate-session message names it to operators (not an identity).
INSTANCE = f"{socket.gethostname()} pid {os.getpid()} {secrets.token_hex(2)}"


class ParticipantDaemon(Lifecycle):
    def __init__(self, config: ParticipantConfig, task: Task | None = None) -> None:
        super().__init__()
        self.config = config
        self.task = task
        self.site: Site | None = None
        self.error: str | None = None
        self.config_error: ConfigError | None = None  # a setting that cannot work (the coordinator's certificate)
        self.connection: Connection | None = None
        self.work: Work | None = None
        self.secagg: SecAggSessions | None = None
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.ops_http: OpsHttpServer | None = None  # /healthz, /readyz when config.http.listen is set

    # -- views ----------------------------------------------------------------------------------------------------
    @property
    def site_id(self) -> str:
        return self.connection.site_id if self.connection is not None else ""

    @property
    def job_id(self) -> str:
        return self.connection.job_id if self.connection is not None else ""

    @property
    def joined(self) -> asyncio.Event:
        assert self.connection is not None, "start() the daemon first"
        return self.connection.joined

    @property
    def completed(self) -> collections.deque[WorkKey]:
        assert self.work is not None, "start() the daemon first"
        return self.work.completed

    # -- lifecycle ------------------------------------------------------------------------------------------------
    async def _start(self) -> str:
        cfg = self.config
        quiet_accountant()
        credentials = channel_credentials(cfg.tls, Role.PARTICIPANT)
        keys = SiteKeys.load(cfg.tls)
        if cfg.http.enabled:  # after the certificate checks, before the data loads: /healthz while it does
            self.ops_http = OpsHttpServer(cfg.http.listen, self.readiness)
            self.ops_http.start()
        budget = (
            SiteBudget(cfg.privacy.target_epsilon, cfg.privacy.delta, cfg.privacy.state_file)
            if cfg.privacy.enabled
            else None
        )
        try:
            task = self.task or load_task(cfg.task)
        except ValueError as exc:  # an unknown name or a malformed dotted path: a config mistake, one line
            raise ConfigError(f"task: {exc}") from None
        data = await asyncio.to_thread(task.load_data, cfg.data_dir)
        self.task, self.site = task, Site(task, data)
        code = task_code.compute(task)
        torch.set_num_threads(cfg.training.torch_threads)

        def join_request() -> pb.JoinRequest:
            return pb.JoinRequest(
                task_name=task.name,
                task_digest=code.combined,
                schema_fingerprint=task.schema.fingerprint(),
                software_version=VERSION,
                task_version=code.version,
                task_code_digest=code.task_code,
                training_code_digest=code.training_code,
                instance=INSTANCE,
            )

        busy = lambda: self.work is not None and self.work.busy  # noqa: E731
        self.connection = Connection(cfg, credentials, join_request, self._on_item, self._stop, busy=busy)
        if cfg.privacy.enabled:
            self.connection.stats.epsilon_budget = cfg.privacy.target_epsilon
        if self.ops_http is not None:
            metrics = registry_for(self.connection.stats)
            self.ops_http.add_route("/metrics", lambda: Response(200, generate_latest(metrics), CONTENT_TYPE_LATEST))
        self.secagg = SecAggSessions(self.connection, keys, lambda: self.site_id)
        self.work = Work(cfg, self.site, self.connection, self.secagg, budget)
        self._tasks = [
            asyncio.create_task(self._connect(), name="participant-connect"),
            asyncio.create_task(self.work.run(), name="participant-worker"),
        ]
        return ""

    def _on_item(self, item: pb.WorkItem) -> None:
        assert self.work is not None
        self.work.dispatch(item)
        if item.WhichOneof("kind") == "job_finished" and self.config.exit_after_job:
            # run() then closes the daemon gracefully (exit code 0), once the final model is kept (keep_final_model)
            self.work.when_kept(self._stop.set)

    async def _connect(self) -> None:
        assert self.connection is not None
        try:
            error = await self.connection.run()
        except ConfigError as exc:
            self.config_error, error = exc, str(exc)
        if error is not None:
            self.error = error
            self.status = Status.FAILED
            log.error("%s", error)
            self._stop.set()

    async def _close(self, reason: str) -> None:
        self._stop.set()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.work is not None:
            await self.work.cancel_side_tasks()
        if self.connection is not None:
            await self.connection.close()
        if self.ops_http is not None:
            await asyncio.to_thread(self.ops_http.close)

    def readiness(self) -> list[str]:
        """What keeps this site from taking work (empty: ready). Runs in the HTTP thread: flags only."""
        if self.status is not Status.RUNNING:
            return [f"participant {self.status.value}" + (f": {self.error}" if self.error else "")]
        connection = self.connection
        return [] if connection is not None and connection.joined.is_set() else ["not joined to the coordinator"]

    async def wait_stopped(self) -> None:
        """Until the daemon stops on its own (the coordinator refused this site for good)."""
        await self._stop.wait()


async def run(config: ParticipantConfig) -> int:
    """Run until SIGTERM/SIGINT, or until the coordinator refuses this site for good (exit code 1)."""
    from common.lifecycle import install_stop_handlers

    stop = asyncio.Event()
    install_stop_handlers(stop)
    daemon = ParticipantDaemon(config)
    await daemon.start()
    waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(daemon.wait_stopped())]
    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    for w in waiters:
        w.cancel()
    error = daemon.error
    await daemon.close("signal" if stop.is_set() else "stopped")
    if daemon.config_error is not None:
        raise daemon.config_error  # one line, exit 2: `cohort participant: error: ...`
    return 1 if error else 0
