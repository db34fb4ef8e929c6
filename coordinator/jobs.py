"""Starting, queueing, resuming and stopping jobs: builds each job's state machine and runner.

One job runs at a time. A job started while another runs (or while others wait) is queued: checked as at a start,
recorded with state ``queued`` (so a restart keeps the queue), and started in submission order when the running job
ends. ``cancel`` takes a queued job out of the queue; ``stop`` ends a running one."""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from cryptography import x509

from common import config as config_loader
from common.errors import CohortError, ConfigError, FailedPrecondition, InvalidArgument, NotFound, TaskError
from common.serde import Limits, state_dict_float32
from common.tasks.base import Task, configure, load_task
from common.tasks.standardize import FeatureScaling, StatisticsSpec
from coordinator.config import JobConfig
from coordinator.round.events import JobState
from coordinator.round.identity import JobIdentity
from coordinator.round.machine import JobMachine, JobSetup
from coordinator.round.model_meta import job_metadata
from coordinator.round.privacy import JobPrivacy
from coordinator.round.runner import JobRunner, Observer, ProgressHook
from coordinator.state import retention
from coordinator.state.model_store import ModelStore
from coordinator.state.registry import Registry
from coordinator.state.resume import CannotResume, ResumePoint, plan_resume
from coordinator.state.store import Store
from coordinator.strategy.server_opt import OptimizerState

log = logging.getLogger("cohort.coordinator.jobs")

QUEUED, CANCELLED = "queued", "cancelled"  # a job record's states before it runs (the machine's are JobState)
STOP_SETTLE_S = 5.0  # how long a stop request waits for the job to reach its final state before it answers


@dataclass(frozen=True)
class Checked:
    """A job spec that passed every check a start makes: its task, loaded and configured, and its identity."""

    task_name: str
    configured: Task
    identity: JobIdentity


class Jobs:
    def __init__(
        self,
        *,
        allowed: frozenset[str],
        store: Store,
        models: ModelStore,
        registry: Registry,
        spool_root: Any,
        limits: Limits,
        ca_certs: list[x509.Certificate],
        progress: ProgressHook | None = None,
        clock: Callable[[], float] = time.time,
        keep_models: int = 0,
    ) -> None:
        self.allowed = allowed
        self.clock = clock  # what every event's time comes from: the wall clock, or a simulation's (simulation/)
        self.store, self.models, self.registry = store, models, registry
        self.spool_root, self.limits, self.ca_certs = spool_root, limits, ca_certs
        self.progress = progress
        self.keep_models = keep_models  # state.keep_models (coordinator/state/retention.py)
        # Server optimizer moments, content-addressed like the models and named by the round that committed them.
        self.strategy_files = ModelStore(models.root.parent / "strategy", "state_dir/strategy")
        self.current: JobRunner | None = None
        self.observer: Observer | None = None  # metrics and log lines (coordinator/observe/watch.py)
        self.runners: dict[str, JobRunner] = {}
        self._task: asyncio.Task[None] | None = None

    def running(self) -> JobRunner | None:
        runner = self.current
        return runner if runner is not None and runner.state is JobState.RUNNING else None

    def active(self, job_id: str) -> JobRunner:
        """The running job ``job_id`` (what sites' calls address)."""
        runner = self.runners.get(job_id)
        if runner is None or runner.state is not JobState.RUNNING:
            raise FailedPrecondition(f"job {job_id!r} is not running")
        return runner

    # -- start and queue ------------------------------------------------------------------------------------------
    def start(self, spec: JobConfig, actor: str = "coordinator") -> str:
        """Check the job and start it, or queue it behind the running job (and the queued ones); its id. A spec that
        fails a check is refused either way, and nothing is recorded."""
        checked = self._check(spec)
        job_id = _new_job_id()
        ahead = self.queued()
        running = self.running()
        if running is None and not ahead:
            self._launch(self._assemble(job_id, spec, checked, actor))
            return job_id
        self.store.create_job(job_id, spec.name, self._recorded_spec(spec, checked), "", state=QUEUED)
        self.store.audit("job_queued", actor, job_id=job_id, spec=asdict(spec))
        behind = ahead[-1]["job_id"] if ahead else running.job_id if running is not None else ""
        log.info("job %s queued behind job %s (%d queued)", job_id, behind or "-", len(ahead) + 1)
        if running is None:
            self.start_next()  # a queue left without a running job (it cannot normally happen): move it on
        return job_id

    def build(self, spec: JobConfig, actor: str = "coordinator") -> JobRunner:
        """Check the job, record it, and build its machine and runner (not started: :meth:`start` runs it; a simulation
        drives it itself)."""
        return self._assemble(_new_job_id(), spec, self._check(spec), actor)

    def queued(self) -> list[dict[str, Any]]:
        """The queued job records, oldest first (the order they start in)."""
        return [row for row in self.store.jobs() if row["state"] == QUEUED]

    def cancel(self, job_id: str, reason: str, actor: str) -> None:
        """Take a queued job out of the queue (it never runs)."""
        row = self.store.job(job_id)
        if row is None:
            raise NotFound(f"unknown job {job_id!r}; `cohort job list` lists the jobs")
        if row["state"] != QUEUED:
            hint = f"; `cohort job stop {job_id}` stops a running job" if row["state"] == JobState.RUNNING else ""
            raise FailedPrecondition(f"job {job_id} is {row['state']}: only a queued job can be cancelled{hint}")
        detail = reason or f"cancelled by admin {actor} while queued"
        self.store.update_job(job_id, state=CANCELLED, detail=detail)
        self.store.audit("job_cancelled", actor, job_id=job_id, reason=detail)
        log.info("job %s cancelled: %s", job_id, detail)

    def _check(self, spec: JobConfig) -> Checked:
        """Every check a start makes before anything is recorded (a refusal changes nothing)."""
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
        try:
            configured = configure(task, spec.task_params, "job.task_params")
        except ConfigError as exc:
            raise InvalidArgument(f"job spec: {exc}") from None
        if spec.standardize.enabled and _statistics_spec(configured) is None:
            raise FailedPrecondition(
                f"job.standardize: task {spec.task!r} declares no feature_ranges, so it has no statistics phase; "
                "turn standardize off (the task then uses its own scaling)"
            )
        # The installed task's code, and the job's parameters
        return Checked(task.name, configured, JobIdentity.of(task, spec.task_params))

    @staticmethod
    def _recorded_spec(spec: JobConfig, checked: Checked) -> dict[str, Any]:
        return asdict(spec) | {"identity": asdict(checked.identity)}

    def _assemble(
        self, job_id: str, spec: JobConfig, checked: Checked, actor: str, *, queued: bool = False
    ) -> JobRunner:
        """The job's initial model saved, its record created (or a queued record turned running), machine and runner."""
        tensors = state_dict_float32(checked.configured.build_model(seed=spec.params.seed))
        model = self.models.save(tensors, job_metadata(job_id, spec, checked.identity, checked.task_name))
        del tensors  # the runner holds the model once, as its encoding
        if queued:
            self.store.update_job(job_id, state=JobState.RUNNING.value, model_version=model.version, detail="")
            self.store.audit("job_dequeued", actor, job_id=job_id)
        else:
            self.store.create_job(job_id, spec.name, self._recorded_spec(spec, checked), model.version)
            self.store.audit("job_submitted", actor, job_id=job_id, spec=asdict(spec))
        setup = self._setup(job_id, spec, checked.configured, checked.identity, model.specs)
        machine = JobMachine(setup, model.version, self._privacy(spec))
        runner = JobRunner(machine, model=model, **self._io())
        runner.machine.privacy.model_numel = sum(s.numel for s in runner.global_specs)
        return runner

    def start_next(self) -> JobRunner | None:
        """Start the oldest queued job that still passes its checks; a queued job that no longer does (its task was
        removed or changed while it waited) fails with the reason, and the next one is tried."""
        if self.running() is not None:
            return None
        for row in self.queued():
            job_id = row["job_id"]
            try:
                stored = dict(row["spec"])
                recorded_identity = stored.pop("identity", {})
                spec = config_loader.build(JobConfig, stored, "job")
                checked = self._check(spec)
                if asdict(checked.identity) != recorded_identity:
                    raise FailedPrecondition(
                        f"the installed task {spec.task!r} changed (code or schema) while the job was queued; "
                        "start the job again"
                    )
            except CohortError as exc:
                detail = f"could not start from the queue: {exc}"
                self.store.update_job(job_id, state=JobState.FAILED.value, detail=detail)
                self.store.audit("job_failed", "coordinator", job_id=job_id, detail=detail)
                log.error("job %s %s", job_id, detail)
                continue
            log.info("starting queued job %s", job_id)
            return self._launch(self._assemble(job_id, spec, checked, "queue", queued=True))
        return None

    def resume(self) -> JobRunner | None:
        """At start-up: continue the job a crash or a shutdown interrupted, from its last verified checkpoint; with
        none to continue, start the first queued job."""
        rows = [j for j in self.store.jobs() if j["state"] in ("running", "interrupted")]
        for stale in rows[:-1]:  # only one job runs at a time; an older unfinished one cannot be continued
            self.store.update_job(stale["job_id"], state="failed", detail="superseded by a later job")
        if not rows:
            return self.start_next()  # the queue survives a restart
        row = rows[-1]
        job_id = row["job_id"]
        try:
            runner = self._resumed(row)
        except (CannotResume, ConfigError, TaskError, ValueError) as exc:
            detail = f"cannot resume after a restart: {exc}"
            self.store.update_job(job_id, state="failed", detail=detail)
            self.store.audit("job_failed", "coordinator", job_id=job_id, detail=detail)
            log.error("job %s %s", job_id, detail)
            return self.start_next()
        return self._launch(runner)

    def _resumed(self, row: dict[str, Any]) -> JobRunner:
        job_id = row["job_id"]
        stored = dict(row["spec"])
        recorded_identity = stored.pop("identity", {})
        spec = config_loader.build(JobConfig, stored, "job")
        installed = load_task(spec.task)
        identity = JobIdentity.of(installed, spec.task_params)
        if asdict(identity) != recorded_identity:
            raise CannotResume(
                f"the installed task {spec.task!r} is not the one the job started with (code or schema changed)"
            )
        task = configure(installed, spec.task_params, "job.task_params")
        rounds = self.store.rounds(job_id)
        first = [r.base_version for r in rounds if r.round == 1]
        initial = first[0] if first else row["model_version"]
        point: ResumePoint = plan_resume(
            job_id,
            spec,
            task,
            store=self.store,
            models=self.models,
            spool_root=self.spool_root,
            initial_version=initial,
            strategy_files=self.strategy_files,
        )
        privacy = self._privacy(spec)
        privacy.restore(row["privacy_state"] or {})
        scaling = FeatureScaling.from_dict(row.get("feature_scaling") or {})  # the statistics phase already ran
        setup = self._setup(job_id, spec, task, identity, point.model.specs, scaling)
        machine = JobMachine(setup, point.model.version, privacy, resume=point.plan)
        optimizer = OptimizerState(int(dict(point.plan.strategy.get("optimizer", {})).get("step", 0)), point.moments)
        return JobRunner(machine, model=point.model, optimizer=optimizer, **self._io())

    def _setup(
        self,
        job_id: str,
        spec: JobConfig,
        task: Task,
        identity: JobIdentity,
        specs: Any,
        scaling: FeatureScaling | None = None,
    ) -> JobSetup:
        report_scores = bool(getattr(task, "report_scores", False)) and task.schema.num_classes == 2
        statistics = _statistics_spec(task) if spec.standardize.enabled else None
        return JobSetup(
            job_id,
            spec,
            identity,
            tuple(specs),
            len(self.allowed),
            tuple(self.ca_certs),
            task.name,
            report_scores,
            statistics,
            scaling,
        )

    def _privacy(self, spec: JobConfig) -> JobPrivacy:
        return JobPrivacy(
            spec.privacy,
            max(1, len(self.allowed)),
            spec.fraction,
            secure_aggregation=spec.secure_aggregation,
            min_survivors=spec.min_sites,
        )

    def _io(self) -> dict[str, Any]:
        return {
            "store": self.store,
            "models": self.models,
            "registry": self.registry,
            "spool_root": self.spool_root,
            "limits": self.limits,
            "progress": self.progress,
            "observer": self.observer,
            "strategy_files": self.strategy_files,
            "clock": self.clock,
        }

    def _launch(self, runner: JobRunner) -> JobRunner:
        runner.machine.privacy.model_numel = sum(s.numel for s in runner.global_specs)
        self.current = runner
        self.runners[runner.job_id] = runner
        if self.keep_models > 0:
            strategy = runner.spec.strategy
            keep = max(self.keep_models, strategy.max_staleness + 1 if strategy.mode == "async" else 0)
            job_id = runner.job_id
            runner.after_commit = lambda: retention.prune(self.store, self.models, self.strategy_files, job_id, keep)
        self._task = asyncio.get_running_loop().create_task(self._run(runner), name=f"job-{runner.job_id}")
        return runner

    async def _run(self, runner: JobRunner) -> None:
        """Run the job; when it ends (not when the coordinator shuts down), the next queued job starts."""
        await runner.run()
        if runner.state is not JobState.INTERRUPTED and not runner.machine.running:
            self.start_next()

    # -- stop, wait, drain ----------------------------------------------------------------------------------------
    async def stop(self, job_id: str, reason: str, actor: str) -> JobRunner:
        """Stop a running job; returns once it reached its final state, or after :data:`STOP_SETTLE_S` (a round being
        aggregated commits first, then the job stops)."""
        runner = self.runners.get(job_id)
        if runner is None:
            row = self.store.job(job_id)
            if row is not None and row["state"] == QUEUED:
                raise FailedPrecondition(f"job {job_id} is queued; `cohort job cancel {job_id}` takes it off the queue")
            if row is not None:
                raise FailedPrecondition(f"job {job_id} is already {row['state']}")
            raise NotFound(f"unknown job {job_id!r}; `cohort job list` lists the jobs")
        if runner.state is not JobState.RUNNING:
            raise FailedPrecondition(f"job {job_id} is already {runner.state.value}")
        self.store.audit("job_stop_requested", actor, job_id=job_id, reason=reason)
        task = self._task
        await runner.stop(reason)
        if runner.state is JobState.RUNNING and task is not None and runner is self.current:
            await asyncio.wait({task}, timeout=STOP_SETTLE_S)
        return runner

    async def wait(self) -> None:
        """Until no job runs: the running one and each queued job started after it."""
        while self._task is not None:
            task = self._task
            await asyncio.shield(task)
            if self._task is task:
                return

    async def drain(self) -> None:
        """Interrupt the running job, resumable at the next start (its open round and spool stay on disk)."""
        runner = self.running()
        if runner is not None:
            rnd = runner.current_round
            number = rnd.number if rnd is not None else 0
            await runner.suspend(
                f"coordinator shut down during round {number}; it resumes when the coordinator restarts"
            )
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


def _new_job_id() -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def _statistics_spec(task: Task) -> StatisticsSpec | None:
    """The lanes of the task's feature statistics (None: it declares no feature ranges)."""
    spec_of = getattr(task, "statistics_spec", None)
    spec = spec_of() if callable(spec_of) else None
    return spec if isinstance(spec, StatisticsSpec) else None
