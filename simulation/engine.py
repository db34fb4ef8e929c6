"""A job over N virtual sites on Ray: the coordinator's own job runner, with the network replaced.

The coordinator side is the production code: :class:`coordinator.jobs.Jobs` checks and builds the job,
:class:`coordinator.round.machine.JobMachine` decides every round, :class:`coordinator.round.runner.JobRunner` spools
and checks each upload (:meth:`~coordinator.round.runner.JobRunner.receive_upload`), folds the round in site order,
applies the strategy and server optimizer, saves the models and writes the round records to a real SQLite store.
What is replaced is the transport: each virtual site has a session in a real :class:`~coordinator.state.registry.
Registry`, and its work items are carried out here instead of being streamed to a daemon:

- training and evaluation run as Ray tasks (:mod:`simulation.remote`) with the participant's own ``Site``, on the
  site's data loaded once into Ray's object store and the global model put there once per version;
- the site's part that is not training runs here with the participant's own code: record-level DP budgets
  (:class:`participant.record_dp.SiteBudget`), clipping to the job's bound, and under secure aggregation the whole
  SecAgg+ protocol through :class:`participant.secagg_session.SecAggSession` (keys from a throwaway simulation CA).

Time is virtual: every event carries the simulation's clock, which moves by the sites' own compute time (as if each
site had its own machine) and jumps to the machine's next deadline when nothing else can happen. So deadlines never
cut a round short because the simulation host is slower than the federation would be.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import CohortError
from common.metrics import score_lane_values
from common.proto.cohort.v1 import cohort_pb2 as pb
from common.secagg import protocol as sa
from common.secagg.errors import SecAggAborted
from common.secagg.lanes import eval_lane_values, train_lane_values
from common.secagg_wire import STATS_SPLIT, setup_from_proto
from common.serde import CHUNK_BYTES, EncodedTensors, Limits, specs_from_manifest
from common.tasks.base import RecordDP
from common.tasks.setup import TaskSetup
from common.version import VERSION
from coordinator.config import JobConfig
from coordinator.jobs import Jobs
from coordinator.round.events import Declined, EvaluationReceived, SecAggReceived, SiteConnected, Start, Tick
from coordinator.round.identity import JobIdentity
from coordinator.round.runner import JobRunner
from coordinator.state.model_store import ModelStore
from coordinator.state.registry import Declaration, Registry
from coordinator.state.store import SqliteStore
from participant import site_rules
from participant.config import RecordPrivacyConfig
from participant.record_dp import SiteBudget
from participant.secagg_session import SecAggSession, SiteKeys
from participant.site import LocalUpdate
from simulation import remote
from simulation.keys import simulation_keys

log = logging.getLogger("cohort.simulation")

RoundKey = tuple[str, int, int, str]


class VirtualClock:
    """Seconds since the epoch, moved only by the simulation."""

    def __init__(self, start: float) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance_to(self, t: float) -> None:
        self.now = max(self.now, t)


@dataclass(frozen=True)
class Resources:
    """What one virtual site's Ray task asks for, and how many tasks may be in flight at once."""

    cpus_per_site: float = 1.0
    gpus_per_site: float = 0.0
    max_in_flight: int = 0  # 0: twice the CPUs Ray sees divided by cpus_per_site

    def threads(self) -> int:
        return max(1, math.floor(self.cpus_per_site))


@dataclass
class VirtualSite:
    name: str
    folder: Path
    data: Any = None  # the ObjectRef of its loaded SiteData
    budget: SiteBudget | None = None
    keys: SiteKeys | None = None
    sessions: dict[RoundKey, SecAggSession] = field(default_factory=dict)
    nodes: set[str] = field(default_factory=set)
    train_records: int = 0
    held: tuple[pb.TrainTask, LocalUpdate] | None = None  # FedBuff + SecAgg: the update kept for a buffer


@dataclass
class Outcome:
    runner: JobRunner
    store: SqliteStore
    sites: list[str]
    nodes: dict[str, int]  # Ray node id -> tasks it ran
    virtual_seconds: float


class Simulation:
    def __init__(
        self,
        spec: JobConfig,
        folders: dict[str, Path],
        state_dir: Path,
        *,
        site_privacy: RecordPrivacyConfig | None = None,
        resources: Resources | None = None,
        progress: Callable[[str], None] | None = None,
        start_time: float | None = None,
    ) -> None:
        self.spec = spec
        self.names = sorted(folders)
        self.sites = {name: VirtualSite(name, folders[name]) for name in self.names}
        self.state_dir = state_dir
        self.site_privacy = site_privacy
        self.resources = resources or Resources()
        self.progress = progress
        self.clock = VirtualClock(time.time() if start_time is None else start_time)
        self.registry = Registry(clock=self.clock)
        self.limits = Limits()
        self.nodes: dict[str, int] = {}
        self._active: set[asyncio.Task[None]] = set()
        self._waiting = 0  # handlers waiting for secure-aggregation shares (they need the machine, not the loop)
        self._changed = asyncio.Event()
        self._error: BaseException | None = None
        self._models: dict[str, Any] = {}
        self._slots: asyncio.Semaphore | None = None
        self._setups: dict[bytes, Any] = {}  # one instance's parsed SecAgg setup, shared by its virtual sites

    # -- set-up -------------------------------------------------------------------------------------------------
    def _build(self) -> tuple[JobRunner, SqliteStore]:
        ray = remote.ray_or_error()
        store = SqliteStore(self.state_dir / "coordinator.db")
        models = ModelStore(self.state_dir / "models")
        ca_certs = []
        if self.spec.secure_aggregation.enabled:
            ca_cert, keys = simulation_keys(self.names)
            ca_certs = [ca_cert]
            for name in self.names:
                self.sites[name].keys = keys[name]
        jobs = Jobs(
            allowed=frozenset(self.names),
            store=store,
            models=models,
            registry=self.registry,
            spool_root=self.state_dir / "spool",
            limits=self.limits,
            ca_certs=ca_certs,
            progress=self.progress,
            clock=self.clock,
        )
        runner = jobs.build(self.spec, actor="simulation")
        if self.site_privacy is not None and self.site_privacy.enabled:
            for site in self.sites.values():
                site.budget = SiteBudget(self.site_privacy.target_epsilon, self.site_privacy.delta)
                site.train_records = train_records(site.folder)
        res = self.resources
        self._fns = remote.remote_functions(res.cpus_per_site, res.gpus_per_site)
        cpus = float(ray.available_resources().get("CPU", 1.0))
        in_flight = res.max_in_flight or max(1, int(2 * cpus / max(res.cpus_per_site, 1e-3)))
        self._slots = asyncio.Semaphore(in_flight)
        for site in self.sites.values():  # each site's data: read once, kept in the object store
            site.data = self._fns.load.remote(self.spec.task, str(site.folder), res.threads())
        return runner, store

    def _model_ref(self, runner: JobRunner, version: str) -> Any:
        """The global model in Ray's object store, put there once per version."""
        ref = self._models.get(version)
        if ref is None:
            tensors = runner.global_tensors
            if runner.global_model.version != version:
                raise CohortError(f"model {version[:19]} is not the current global model")
            ref = remote.ray_or_error().put({k: v.numpy() for k, v in tensors.items()})
            self._models = {version: ref}  # the previous version is released
        return ref

    # -- the loop -----------------------------------------------------------------------------------------------
    async def run(self) -> Outcome:
        runner, store = self._build()
        identity = JobIdentity.of(_task_of(self.spec.task))
        declaration = Declaration(identity.task_name, identity.task_digest, identity.schema_fingerprint, VERSION)
        consumers = []
        for name in self.names:
            session = self.registry.join(name, declaration)
            self.registry.attach(name, session.session_id)
            consumers.append(asyncio.create_task(self._consume(runner, name, session.queue)))
        started = self.clock()
        try:
            for name in self.names:
                await runner.feed(SiteConnected(name, declaration, self.clock()))
            await runner.feed(Start(self.clock()))
            while runner.machine.running:
                await asyncio.sleep(0)
                if self._error is not None:
                    raise self._error
                busy = len(self._active) > self._waiting or any(not s.queue.empty() for s in self.registry.connected())
                internal = set(runner._tasks)  # the runner's aggregation
                if busy or internal:
                    self._changed.clear()
                    changed = asyncio.create_task(self._changed.wait())
                    await asyncio.wait({changed, *internal}, return_when=asyncio.FIRST_COMPLETED)
                    changed.cancel()
                    continue
                wake = runner.machine.wake_at()
                if wake is None:
                    raise CohortError(f"the simulation stalled in phase {runner.machine.phase}")
                self.clock.advance_to(wake)
                await runner.feed(Tick(self.clock()))
        finally:
            for task in [*consumers, *self._active]:
                task.cancel()
            await asyncio.gather(*consumers, *self._active, return_exceptions=True)
        return Outcome(runner, store, self.names, dict(self.nodes), self.clock() - started)

    async def _consume(self, runner: JobRunner, site: str, queue: asyncio.Queue[pb.WorkItem | None]) -> None:
        """The site's work stream: every item is handled in its own task (as the daemon's stream dispatches them)."""
        while (item := await queue.get()) is not None:
            task = asyncio.create_task(self._handle(runner, site, item))
            self._active.add(task)
            task.add_done_callback(self._done)
            self._changed.set()

    def _done(self, task: asyncio.Task[None]) -> None:
        self._active.discard(task)
        if not task.cancelled() and task.exception() is not None and self._error is None:
            self._error = task.exception()
        self._changed.set()

    async def _handle(self, runner: JobRunner, site: str, item: pb.WorkItem) -> None:
        kind = item.WhichOneof("kind")
        if kind == "train":
            await self._train(runner, self.sites[site], item.train)
        elif kind == "evaluate":
            await self._evaluate(runner, self.sites[site], item.evaluate)
        elif kind == "secagg":
            await self._secagg_step(runner, self.sites[site], item.secagg)

    async def _feed(self, runner: JobRunner, event: Any) -> None:
        try:
            await runner.feed(event)
        except CohortError as exc:  # the coordinator refused it (a round moved on): what a daemon would log
            log.debug("%s refused: %s", type(event).__name__, exc)

    async def _remote(self, fn: Any, *args: Any) -> Any:
        assert self._slots is not None
        async with self._slots:
            return await fn.remote(*args)

    def _count_node(self, site: VirtualSite, node: str) -> None:
        site.nodes.add(node)
        self.nodes[node] = self.nodes.get(node, 0) + 1

    # -- a site's work ------------------------------------------------------------------------------------------
    def _record_dp(self, site: VirtualSite, task: pb.TrainTask, num_samples: int) -> RecordDP | bool | None:
        """participant.site_rules.record_dp_for with the site's budget kept here: False when it must decline."""
        decided = site_rules.record_dp_for(self.site_privacy, site.budget, task, num_samples)
        return False if isinstance(decided, str) else decided

    def _session(self, site: VirtualSite, task: pb.TrainTask | pb.EvaluateTask) -> SecAggSession:
        """SecAggSession.start, with the instance's parsed setup shared: its RoundParams hold the whole neighbour
        graph (n sets of k names), which 1,000 virtual sites each parsing their own copy would hold a thousand
        times (gigabytes). Sites are given the same setup message for one instance; the cache is keyed by its bytes."""
        assert site.keys is not None
        split = task.split if isinstance(task, pb.EvaluateTask) else ""
        key = repr((task.job_id, task.round, task.attempt, split)).encode() + task.secagg.SerializeToString()
        setup = self._setups.get(key)
        if setup is None:
            setup = setup_from_proto(task.job_id, task.round, task.attempt, task.secagg, split)
            self._setups[key] = setup
            while len(self._setups) > 4:
                self._setups.pop(next(iter(self._setups)))
        params, enc, lanes = setup
        client = sa.SecAggClient(params, site.name, site.keys.key, site.keys.cert_pem, site.keys.ca_certs)
        session = SecAggSession(task, params, enc, lanes, int(task.secagg.weight_cap), client)
        site.sessions[(task.job_id, task.round, task.attempt, split)] = session
        while len(site.sessions) > 4:
            site.sessions.pop(next(iter(site.sessions)))
        return session

    async def _train(self, runner: JobRunner, site: VirtualSite, task: pb.TrainTask) -> None:
        if task.buffered and task.HasField("secagg"):
            await self._sum_held(runner, site, task)
            return
        session = None
        if task.HasField("secagg"):
            session = self._session(site, task)
            await self._feed(runner, SecAggReceived(site.name, session.advertise(), self.clock()))
        dispatched = self.clock()
        model = self._model_ref(runner, task.model_version)
        clip = site_rules.clip_of(task)
        record_dp = self._record_dp(site, task, site.train_records)
        if record_dp is False:
            reason = "this site's record-level privacy settings or budget"
            request = pb.DeclineRequest(job_id=task.job_id, round=task.round, attempt=task.attempt, reason=reason)
            await self._feed(runner, Declined(site.name, request, self.clock()))
            return
        dp = record_dp if isinstance(record_dp, RecordDP) else None
        setup = TaskSetup.of(task)  # the job's task parameters and feature scaling, as a daemon reads them
        out = await self._remote(self._fns.train, self.spec.task, site.data, model, task.params, clip, dp, setup, 1)
        self._count_node(site, out.node)
        self.clock.advance_to(dispatched + out.seconds)
        local = out.update
        if dp is not None:
            assert site.budget is not None
            local, _ = site_rules.spend(local, site.budget)
        if task.buffered:  # kept for a buffer's secure instance, as participant/work.py does
            site.held = (task, local)
            ready = pb.SecAggMessage(
                job_id=task.job_id, round=task.round, attempt=task.attempt, ready=task.model_version
            )
            await self._feed(runner, SecAggReceived(site.name, ready, self.clock()))
            return
        if session is not None:
            masked = await self._masked(runner, site, session, local)
            if masked is None:
                return
            tensors = masked
        else:
            tensors = local.update
        header = site_rules.update_header(task, local, tensors, secure=session is not None)
        await self._upload(runner, site.name, header, tensors)

    async def _sum_held(self, runner: JobRunner, site: VirtualSite, task: pb.TrainTask) -> None:
        """A buffer's secure instance: mask the kept update at its staleness weight and upload it."""
        held = site.held
        reason = "no kept update for that model version"
        if held is not None and held[0].model_version == task.model_version:
            reason = site_rules.staleness_refusal(held[0], task) or ""
        if held is None or reason:
            request = pb.DeclineRequest(job_id=task.job_id, round=task.round, attempt=task.attempt, reason=reason)
            await self._feed(runner, Declined(site.name, request, self.clock()))
            return
        session = self._session(site, task)
        await self._feed(runner, SecAggReceived(site.name, session.advertise(), self.clock()))
        local = held[1]
        tensors = await self._masked(runner, site, session, local)
        if tensors is None:
            return
        site.held = None
        await self._upload(runner, site.name, site_rules.update_header(task, local, tensors, secure=True), tensors)

    async def _masked(
        self, runner: JobRunner, site: VirtualSite, session: SecAggSession, local: LocalUpdate
    ) -> EncodedTensors | None:
        """The site's masked input, once its neighbours' shares are in; None when the instance ended without them or
        masking aborted it (the abort is reported)."""
        result = local.result
        lanes = train_lane_values(result.num_samples, result.loss, result.accuracy, result.extra.get("steps", 0.0))
        if not await self._shares(session):
            return None
        try:
            return session.masked_update(local.update, result.num_samples, lanes)
        except SecAggAborted as exc:
            await self._abort(runner, site, session, str(exc))
            return None

    async def _upload(self, runner: JobRunner, site: str, header: pb.UpdateHeader, tensors: EncodedTensors) -> None:
        """What UploadUpdate does with a stream, without the network: decode the manifest, then the runner's walk."""
        header.manifest.CopyFrom(tensors.manifest())
        try:
            specs = specs_from_manifest(header.manifest, self.limits)
            await runner.receive_upload(site, header, specs, _chunks(tensors))
        except CohortError as exc:
            log.debug("upload from %s refused: %s", site, exc)

    async def _shares(self, session: SecAggSession) -> bool:
        """Wait for the neighbours' shares (the machine routes them); False when the instance ended without."""
        self._waiting += 1
        self._changed.set()
        try:
            await session.shares_ready.wait()
        finally:
            self._waiting -= 1
        return session.aborted is None

    async def _abort(self, runner: JobRunner, site: VirtualSite, session: SecAggSession, reason: str) -> None:
        session.aborted = reason
        session.shares_ready.set()
        await self._feed(runner, SecAggReceived(site.name, session.message(abort_reason=reason), self.clock()))

    async def _secagg_step(self, runner: JobRunner, site: VirtualSite, step: pb.SecAggStep) -> None:
        key = (step.job_id, step.round, step.attempt, step.split)
        session = site.sessions.get(key)
        if session is None or session.aborted:
            return
        if step.WhichOneof("stage") == "signatures":
            # The unmask reply is the site's last part in the instance: its session (the neighbours' keys and
            # shares) is dropped now rather than kept as a daemon keeps its last few, which at 1,000 virtual sites
            # would hold gigabytes.
            site.sessions.pop(key, None)
        try:
            reply = session.on_step(step)
        except SecAggAborted as exc:
            site.sessions.pop(key, None)
            await self._abort(runner, site, session, str(exc))
            return
        if reply is not None:
            await self._feed(runner, SecAggReceived(site.name, reply, self.clock()))

    async def _evaluate(self, runner: JobRunner, site: VirtualSite, task: pb.EvaluateTask) -> None:
        if task.split == STATS_SPLIT:
            await self._statistics(runner, site, task)
            return
        session = None
        if task.HasField("secagg"):
            session = self._session(site, task)
            await self._feed(runner, SecAggReceived(site.name, session.advertise(), self.clock()))
        dispatched = self.clock()
        model = self._model_ref(runner, task.model_version)
        out = await self._remote(
            self._fns.evaluate, self.spec.task, site.data, model, task.split, TaskSetup.of(task), 1
        )
        self._count_node(site, out.node)
        self.clock.advance_to(dispatched + out.seconds)
        r = out.result
        if session is not None:
            lanes = eval_lane_values(r.num_samples, r.loss, r.accuracy) | score_lane_values(r.scores)
            await self._upload_lanes(runner, site, session, task, lanes)
            return
        report = pb.EvaluationReport(
            job_id=task.job_id,
            round=task.round,
            model_version=task.model_version,
            split=task.split,
            num_samples=r.num_samples,
            loss=r.loss,
            accuracy=r.accuracy,
            eval_seconds=out.seconds,
            score_histogram=r.scores.flat() if r.scores is not None else [],
        )
        await self._feed(runner, EvaluationReceived(site.name, report, self.clock()))

    async def _statistics(self, runner: JobRunner, site: VirtualSite, task: pb.EvaluateTask) -> None:
        """The statistics phase (participant.work.Work._statistics): the site's feature statistics, masked, into the
        secure sum; a site whose task cannot take part declines, as a daemon does."""
        session = self._session(site, task)
        await self._feed(runner, SecAggReceived(site.name, session.advertise(), self.clock()))
        dispatched = self.clock()
        try:
            out = await self._remote(self._fns.statistics, self.spec.task, site.data, TaskSetup.of(task), session.lanes)
        except CohortError as exc:
            reason = f"feature statistics: {exc}"
            request = pb.DeclineRequest(
                job_id=task.job_id, round=task.round, attempt=task.attempt, reason=reason, split=task.split
            )
            await self._feed(runner, Declined(site.name, request, self.clock()))
            return
        self._count_node(site, out.node)
        self.clock.advance_to(dispatched + out.seconds)
        await self._upload_lanes(runner, site, session, task, out.lanes)

    async def _upload_lanes(
        self,
        runner: JobRunner,
        site: VirtualSite,
        session: SecAggSession,
        task: pb.EvaluateTask,
        lanes: dict[str, float],
    ) -> None:
        """A lanes-only secure instance's input, masked once the neighbours' shares are in, uploaded."""
        if not await self._shares(session):
            return
        try:
            masked = session.masked_lanes(lanes)
        except SecAggAborted as exc:
            await self._abort(runner, site, session, str(exc))
            return
        header = pb.UpdateHeader(
            job_id=task.job_id,
            round=task.round,
            attempt=task.attempt,
            split=task.split,
            base_model_version=task.model_version,
        )
        await self._upload(runner, site.name, header, masked)


async def _chunks(tensors: EncodedTensors) -> AsyncIterator[pb.UpdateChunk]:
    for part in tensors.chunks(CHUNK_BYTES):
        yield pb.UpdateChunk(data=bytes(part))


def _task_of(ref: str) -> Any:
    from common.tasks.base import load_task

    return load_task(ref)


def train_records(folder: Path) -> int:
    """The number of records in a site folder's train.csv (its header line aside)."""
    with (folder / "train.csv").open("rb") as f:
        return max(0, sum(1 for _ in f) - 1)
