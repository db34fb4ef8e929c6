"""The coordinator's state, as the handlers see it: the federation's allow-list and sessions, the store, the model
files, revocations, rate limits and the jobs. No gRPC here (coordinator/rpc/), no rules of a round (coordinator/round/).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING

from common import files
from common.errors import PermissionDenied
from common.serde import Limits
from coordinator.config import CoordinatorConfig
from coordinator.jobs import Jobs
from coordinator.round.runner import JobRunner, ProgressHook
from coordinator.round.secagg import load_ca_certs
from coordinator.rpc.denylist import Revocations
from coordinator.rpc.ratelimit import AuditThrottle, JoinLimiter
from coordinator.state.lock import StateLock
from coordinator.state.model_store import ModelStore
from coordinator.state.registry import Registry
from coordinator.state.store import SqliteStore

if TYPE_CHECKING:
    from coordinator.observe.watch import Observability

log = logging.getLogger("cohort.coordinator")


class Federation:
    def __init__(self, config: CoordinatorConfig, progress: ProgressHook | None = None) -> None:
        self.config = config
        self.allowed = frozenset(config.federation.sites)
        state = files.private_tree(config.state_dir, "state_dir")  # owner-only; refused if others may write it
        self.lock = StateLock(state).acquire()  # one coordinator per state_dir, before anything there is opened
        self.registry = Registry()
        fed, server = config.federation, config.server
        try:
            deny = Revocations.initial(fed.deny_list)  # before the store opens: a broken file stops the start-up
        except BaseException:
            self.lock.release()
            raise
        self.store = SqliteStore(state / "coordinator.db")
        self.models = ModelStore(state / "models")
        self.spool_root = state / "spool"
        self.revocations = Revocations(fed.deny_list, fed.deny_list_poll_s, self.registry, self.store, deny)
        self.revocations.start()
        self.join_limiter = JoinLimiter(
            server.join_rate_per_min,
            server.join_burst,
            server.join_global_rate_per_min,
            server.join_global_burst or max(100, 2 * len(self.allowed)),
        )
        self.audit_throttle = AuditThrottle()
        self.ops: Observability | None = None  # metrics, operator log lines, run reports (coordinator/observe/)
        self.data_port = 0  # the bulk data channel's bound port (server.data_listen), told to sites at Join; 0: none
        self.limits = Limits(max_chunk_bytes=server.max_chunk_bytes, max_total_bytes=server.max_update_bytes)
        assert server.tls is not None
        self.jobs = Jobs(
            allowed=self.allowed,
            store=self.store,
            models=self.models,
            registry=self.registry,
            spool_root=self.spool_root,
            limits=self.limits,
            ca_certs=load_ca_certs(server.tls.ca),  # verifies sites' signed secure-aggregation keys
            progress=progress,
            keep_models=config.state.keep_models,
        )

    @property
    def runner(self) -> JobRunner | None:
        """The newest job's runner (running or not)."""
        return self.jobs.current

    @property
    def runners(self) -> dict[str, JobRunner]:
        return self.jobs.runners

    def require_member(self, site: str) -> None:
        if site not in self.allowed:
            raise PermissionDenied(f"site {site!r} is not on the allow-list")

    def model_round(self) -> int | None:
        """The round the running job's current global model is the base of (for failpoints and logs)."""
        runner = self.jobs.current
        return runner.completed_rounds + 1 if runner is not None else None

    async def watch_liveness(self) -> None:
        """Drop sessions whose site stopped heartbeating: within one heartbeat interval, checked four times per
        interval. The job hears of it at once (a dropout), and the site joins again when it is back.

        Only idle sites are dropped this way: a site with a train or evaluate task in hand may be too busy to
        heartbeat on time (Registry.silent); a dead connection ends its stream through HTTP/2 keepalive instead. A
        check that itself ran late (this event loop was held up) drops nobody: the heartbeats that arrived meanwhile
        may not have been processed yet."""
        interval = self.config.server.heartbeat_interval_s
        while not self.registry.closed.is_set():
            before = time.monotonic()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.registry.closed.wait(), timeout=interval / 4)
            if time.monotonic() - before > interval / 2:
                continue
            for session in self.registry.silent(interval):
                if self.registry.drop(session.site) is not None:
                    silent_s = time.time() - session.heard
                    self.store.audit("site_timed_out", session.site, silent_s=round(silent_s, 3))
                    log.warning("site %s sent no heartbeat for %.1fs; dropped", session.site, silent_s)

    async def drain(self) -> None:
        """First half of shutdown: interrupt the running job, resumable at the next start, and end every stream.

        The job is not stopped: its open round and accepted uploads stay on disk and the next start continues it
        (`cohort job stop` is how an operator ends a job)."""
        await self.jobs.drain()
        self.registry.close_all()

    def close(self) -> None:
        """Second half, after the server stopped: nothing can reach the store any more."""
        self.store.close()
        self.lock.release()
