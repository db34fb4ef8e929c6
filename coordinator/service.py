"""The coordinator's domain: federation membership, sessions, the running job and status. No gRPC server here."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import Any

from common import config as config_loader
from common.errors import ConfigError, FailedPrecondition, InvalidArgument, NotFound, PermissionDenied, TaskError
from common.proto.cohort.v1 import cohort_pb2 as pb
from common.serde import EncodedTensors, Limits
from common.tasks.base import Task, load_task
from common.tls import CertRef
from common.version import VERSION
from coordinator.config import CoordinatorConfig, JobConfig
from coordinator.job_proto import job_config_from_proto, job_status
from coordinator.round.job_state import JobIdentity
from coordinator.round.privacy import JobPrivacy
from coordinator.round.runner import JobRunner, ProgressHook
from coordinator.round.secagg import load_ca_certs
from coordinator.rpc.denylist import Revocations
from coordinator.rpc.ratelimit import AuditThrottle, JoinLimiter
from coordinator.state.model_store import ModelStore
from coordinator.state.registry import Declaration, Registry
from coordinator.state.resume import CannotResume, ResumePoint, plan_resume
from coordinator.state.store import Store

log = logging.getLogger("cohort.coordinator")


class Coordinator:
    def __init__(self, config: CoordinatorConfig, progress: ProgressHook | None = None) -> None:
        self.config = config
        self.allowed = frozenset(config.federation.sites)
        state = config.state_dir
        self.registry = Registry()
        fed, server = config.federation, config.server
        deny = Revocations.initial(fed.deny_list)  # before the store opens: a broken file stops the start-up
        self.store = Store(state / "coordinator.db")
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
        self.limits = Limits(
            max_chunk_bytes=config.server.max_chunk_bytes, max_total_bytes=config.server.max_update_bytes
        )
        self.progress = progress
        self.runner: JobRunner | None = None
        self._job_task: asyncio.Task[None] | None = None
        self.runners: dict[str, JobRunner] = {}
        assert config.server.tls is not None
        self.ca_certs = load_ca_certs(config.server.tls.ca)  # verifies sites' signed secure-aggregation keys

    # -- jobs ---------------------------------------------------------------------------------------------------
    def start_job(self, spec: JobConfig, actor: str = "coordinator") -> JobRunner:
        if self.runner is not None and self.runner.state == "running":
            raise FailedPrecondition(f"job {self.runner.job_id} is still running; stop it first")
        if max(spec.min_sites, spec.min_available_sites) > len(self.allowed):
            raise InvalidArgument(f"min_sites/min_available_sites exceed the {len(self.allowed)} allowed sites")
        expected_cohort = min(len(self.allowed), max(spec.min_sites, math.ceil(spec.fraction * len(self.allowed))))
        JobPrivacy(spec.privacy, len(self.allowed), spec.fraction).check_plan(spec.rounds, expected_cohort)
        if spec.privacy.adaptive_clipping and spec.secure_aggregation.enabled:
            raise FailedPrecondition(
                "adaptive clipping needs each site's clip bit; with secure aggregation that count lane is not wired "
                "yet: turn off privacy.adaptive_clipping or secure_aggregation"
            )
        if spec.privacy.unit == "site" and spec.secure_aggregation.enabled and spec.fraction < 1:
            raise FailedPrecondition(
                "site-level DP with secure aggregation (distributed Skellam noise) is accounted for full "
                "participation only; set fraction: 1.0"
            )
        try:
            task = load_task(spec.task)
        except (ValueError, TaskError) as exc:
            raise FailedPrecondition(f"task {spec.task!r} cannot be loaded on the coordinator: {exc}") from None
        job_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        runner = self._runner(job_id, spec, task)
        self.store.audit("job_submitted", actor, job_id=job_id, spec=asdict(spec))
        self.runner = runner
        self.runners[job_id] = runner
        self._job_task = asyncio.get_running_loop().create_task(runner.run(), name=f"job-{job_id}")
        return runner

    def resume_jobs(self) -> JobRunner | None:
        """At start-up: continue the job a crash or a shutdown interrupted, from its last verified checkpoint."""
        rows = [j for j in self.store.jobs() if j["state"] in ("running", "interrupted")]
        for stale in rows[:-1]:  # only one job runs at a time; an older unfinished one cannot be continued
            self.store.update_job(stale["job_id"], state="failed", detail="superseded by a later job")
        if not rows:
            return None
        row = rows[-1]
        job_id = row["job_id"]
        try:
            runner = self._resumed_runner(row)
        except (CannotResume, ConfigError, TaskError, ValueError) as exc:
            detail = f"cannot resume after a restart: {exc}"
            self.store.update_job(job_id, state="failed", detail=detail)
            self.store.audit("job_failed", "coordinator", job_id=job_id, detail=detail)
            log.error("job %s %s", job_id, detail)
            return None
        self.runner = runner
        self.runners[job_id] = runner
        self._job_task = asyncio.get_running_loop().create_task(runner.run(), name=f"job-{job_id}")
        return runner

    def _resumed_runner(self, row: dict[str, Any]) -> JobRunner:
        job_id = row["job_id"]
        stored = dict(row["spec"])
        identity = stored.pop("identity", {})
        spec = config_loader.build(JobConfig, stored, "job")
        task = load_task(spec.task)
        if asdict(JobIdentity.of(task)) != identity:
            raise CannotResume(
                f"the installed task {spec.task!r} is not the one the job started with (code or schema changed)"
            )
        rounds = self.store.rounds(job_id)
        first = [r.base_version for r in rounds if r.round == 1]
        initial = first[0] if first else row["model_version"]
        point = plan_resume(
            job_id,
            spec,
            task,
            store=self.store,
            models=self.models,
            spool_root=self.spool_root,
            initial_version=initial,
        )
        return self._runner(job_id, spec, task, resume=point, privacy_state=row["privacy_state"])

    def _runner(
        self,
        job_id: str,
        spec: JobConfig,
        task: Task,
        resume: ResumePoint | None = None,
        privacy_state: dict[str, object] | None = None,
    ) -> JobRunner:
        return JobRunner(
            job_id,
            spec,
            task,
            store=self.store,
            models=self.models,
            registry=self.registry,
            spool_root=self.spool_root,
            limits=self.limits,
            progress=self.progress,
            ca_certs=self.ca_certs,
            population=len(self.allowed),
            resume=resume,
            privacy_state=privacy_state,
        )

    def start_job_from_proto(self, spec: pb.JobSpec, actor: str) -> pb.JobStatus:
        runner = self.start_job(job_config_from_proto(spec), actor)
        return self.job_status(runner.job_id)

    def stop_job(self, job_id: str, reason: str, actor: str) -> pb.JobStatus:
        runner = self.runners.get(job_id)
        if runner is None:
            raise NotFound(f"unknown job {job_id!r}; `cohort status` lists the jobs")
        if runner.state != "running":
            raise FailedPrecondition(f"job {job_id} is already {runner.state}")
        self.store.audit("job_stop_requested", actor, job_id=job_id, reason=reason)
        runner.stop(reason)
        return self.job_status(job_id)

    async def wait_job(self) -> None:
        if self._job_task is not None:
            await asyncio.shield(self._job_task)

    async def drain(self) -> None:
        """First half of shutdown: interrupt the running job, resumable at the next start, and end every stream.

        The job is not stopped: its open round and accepted uploads stay on disk and the next start continues it
        (`cohort job stop` is how an operator ends a job)."""
        runner = self.runner
        if runner is not None and runner.state == "running":
            number = runner.current_round.number if runner.current_round is not None else 0
            runner.suspend(f"coordinator shut down during round {number}; it resumes when the coordinator restarts")
        if self._job_task is not None and not self._job_task.done():
            self._job_task.cancel()
            await asyncio.gather(self._job_task, return_exceptions=True)
        self.registry.close_all()

    def close(self) -> None:
        """Second half, after the server stopped: nothing can reach the store any more."""
        self.store.close()

    # -- participants -------------------------------------------------------------------------------------------
    def join(self, site: str, req: pb.JoinRequest, cert: CertRef | None = None) -> pb.JoinReply:
        # Rate first: every refusal below is audited, so a flood must be cut before it can write to the log.
        self.join_limiter.take(site)
        if site not in self.allowed:
            self.store.audit("join_refused", site, reason="not on the allow-list")
            raise PermissionDenied(
                f"site {site!r} is not on the allow-list of federation "
                f"{self.config.federation.name!r}; ask the operator to add it"
            )
        decl = Declaration(
            req.task_name,
            req.task_digest,
            req.schema_fingerprint,
            req.software_version,
            req.num_train_samples,
        )
        runner = self.runner if self.runner is not None and self.runner.state == "running" else None
        if runner is not None:
            mismatch = runner.identity.mismatch(decl)
            if mismatch is not None:
                self.store.audit("join_refused", site, reason=mismatch)
                raise FailedPrecondition(f"site {site!r} does not fit job {runner.job_id}: {mismatch}")
        session = self.registry.join(site, decl, cert)
        self.store.audit("join", site, task=req.task_name, version=req.software_version)
        return pb.JoinReply(
            session_id=session.session_id,
            heartbeat_interval_s=self.config.server.heartbeat_interval_s,
            job_id=runner.job_id if runner else "",
            federation=self.config.federation.name,
            site_id=site,
        )

    async def work_stream(self, site: str, session_id: str) -> AsyncIterator[pb.WorkItem]:
        session = self.registry.attach(site, session_id)
        if session is None:
            raise FailedPrecondition("unknown or replaced session; call Join again")
        interval = self.config.server.heartbeat_interval_s
        try:
            yield pb.WorkItem(heartbeat=pb.Heartbeat(server_time=time.time()))
            while True:
                try:
                    item = await asyncio.wait_for(session.queue.get(), timeout=interval)
                except TimeoutError:
                    item = pb.WorkItem(heartbeat=pb.Heartbeat(server_time=time.time()))
                if item is None:
                    return
                self.registry.touch(site)
                yield item
        finally:
            self.registry.detach(session)

    def heartbeat(self, site: str, session_id: str) -> None:
        if not self.registry.heartbeat(site, session_id):
            raise FailedPrecondition("unknown or replaced session; call Join again")

    async def watch_liveness(self) -> None:
        """Drop sessions whose site stopped heartbeating: within one heartbeat interval, checked four times per
        interval. The job runner hears of it at once (a dropout), and the site joins again when it is back.

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

    def _active(self, job_id: str) -> JobRunner:
        runner = self.runners.get(job_id)
        if runner is None or runner.state != "running":
            raise FailedPrecondition(f"job {job_id!r} is not running")
        return runner

    def model_round(self) -> int | None:
        """The round the running job's current global model is the base of (for failpoints and logs)."""
        return self.runner.completed_rounds + 1 if self.runner is not None else None

    def model_for(self, site: str, req: pb.ModelRequest) -> EncodedTensors:
        self._require_member(site)
        return self._active(req.job_id).model_for(req.job_id, req.model_version)

    async def receive_upload(
        self, site: str, header: pb.UpdateHeader, chunks: AsyncIterator[pb.UpdateChunk]
    ) -> pb.UploadReply:
        self._require_member(site)
        return await self._active(header.job_id).receive_upload(site, header, chunks)

    def receive_decline(self, site: str, req: pb.DeclineRequest) -> None:
        self._require_member(site)
        self._active(req.job_id).receive_decline(site, req)

    def receive_secagg(self, site: str, msg: pb.SecAggMessage) -> None:
        self._require_member(site)
        self._active(msg.job_id).receive_secagg(site, msg)

    def receive_evaluation(self, site: str, report: pb.EvaluationReport) -> None:
        self._require_member(site)
        self._active(report.job_id).receive_evaluation(site, report)

    def _require_member(self, site: str) -> None:
        if site not in self.allowed:
            raise PermissionDenied(f"site {site!r} is not on the allow-list")

    # -- status -------------------------------------------------------------------------------------------------
    def job_status(self, job_id: str) -> pb.JobStatus:
        row = self.store.job(job_id)
        if row is None:
            raise NotFound(f"unknown job {job_id!r}")
        return job_status(row, self.store)

    def status(self) -> pb.StatusReply:
        sites = []
        sessions = {s.site: s for s in self.registry.sessions()}
        for site in sorted(self.allowed):
            s = sessions.get(site)
            sites.append(
                pb.SiteStatus(
                    site_id=site,
                    connected=bool(s and s.connected),
                    task_name=s.declaration.task_name if s else "",
                    software_version=s.declaration.software_version if s else "",
                    last_seen_unix=s.last_seen if s else 0.0,
                )
            )
        jobs = [job_status(row, self.store) for row in self.store.jobs()]
        return pb.StatusReply(federation=self.config.federation.name, sites=sites, jobs=jobs, software_version=VERSION)
