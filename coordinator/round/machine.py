"""The job's rules as one state machine: events in, actions out. No I/O, no clock, no asyncio.

:class:`JobMachine` decides everything about a job's rounds: when a round starts (enough eligible sites, or the wait
ran out), which sites train (selection, over-selection), what each is told, when the round closes (everyone
reported, the over-selection target, dropouts, the deadline), retries of a failed attempt, the privacy budget stop,
evaluations, who is suspended for aborting secure rounds, resuming after a restart, and the end of the job. The stages
of one secure-aggregation instance (a secure round or a secure evaluation) are in
:mod:`coordinator.round.secure_sum`; the close rule of uploads in :mod:`coordinator.round.rules`.
:mod:`coordinator.round.events` names the events and actions; :class:`coordinator.round.runner.JobRunner` feeds
events and carries out actions. Tests drive the machine event by event (tests/test_machine.py).

A refused event raises a :class:`~common.errors.CohortError` before it changes anything. The table of states, events
and actions is in docs/ARCHITECTURE.md ("The job's state machine").
"""

from __future__ import annotations

import collections
import json
import math

from common.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from common.metrics import RECALL_KEY, SCORE_LANES, ScoreHistogram, scores_of_lanes
from common.proto.cohort.v1 import cohort_pb2 as pb
from common.secagg.errors import SecAggAborted
from common.secagg.lanes import EVAL_LANES
from common.secagg_wire import MAX_EVAL_INSTANCES, STATS_SPLIT
from common.serde import Spec
from common.tasks.base import round_seed
from common.tasks.standardize import FeatureScaling
from coordinator.round.buffered import Buffer, Held, instance_task, staleness_of
from coordinator.round.events import (
    AckDuplicate,
    Action,
    Aggregate,
    Aggregated,
    AggregationFailed,
    Audit,
    Broadcast,
    ClearSuspension,
    CommitRound,
    Crashed,
    Declined,
    EvaluationReceived,
    Event,
    Failpoint,
    FailRound,
    FinishJob,
    JobState,
    Phase,
    Progress,
    RecordEvaluation,
    RecordRoundStart,
    RecordUpload,
    SecAggReceived,
    Send,
    SetRoundEvaluation,
    SiteConnected,
    SiteDisconnected,
    Start,
    StopRequested,
    Suspend,
    Tick,
    UpdateJob,
    UploadAbandoned,
    UploadStarted,
    UploadVerified,
)
from coordinator.round.privacy import JobPrivacy
from coordinator.round.records import Evaluation, JobSetup, Report, RoundAttempt
from coordinator.round.rules import DeadlinePassed, RoundEvent, RoundState, SiteBack, SiteLost, Stop, UploadAccepted
from coordinator.round.secagg import SecAggRound
from coordinator.round.secure_sum import Done, SecureSum
from coordinator.round.standardize import Standardization, records_of, scaling_json, stamp
from coordinator.round.waiting import shortfall
from coordinator.state.registry import Declaration
from coordinator.state.resume import ResumePlan
from coordinator.strategy import selection

MAX_SAMPLES = 1_000_000_000
MAX_METRICS = 32
# What an upload header may carry under secure aggregation: a site's own record-level privacy guarantee (it publishes
# it; docs/SECURITY.md). Counts, losses, accuracies and timings travel masked, as lanes.
SECURE_HEADER_METRICS = frozenset({"dp_epsilon", "dp_delta"})

__all__ = ["JobMachine", "JobSetup"]


class JobMachine:
    def __init__(
        self,
        setup: JobSetup,
        model_version: str,
        privacy: JobPrivacy,
        resume: ResumePlan | None = None,
    ) -> None:
        self.setup = setup
        self.spec = setup.spec
        self.job_id = setup.job_id
        self.privacy = privacy
        self.model_version = model_version
        self.state = JobState.RUNNING
        self.phase = Phase.STARTING
        self.detail = ""
        self.number, self.attempt = (1, 0) if resume is None else (resume.number, resume.attempt)
        self.completed = 0 if resume is None else resume.completed
        self.connected: dict[str, Declaration] = {}
        self.round: RoundAttempt | None = None
        self.evaluation: Evaluation | None = None
        self.wait_deadline: float | None = None
        # Secure-aggregation aborts per site in this job; a site at max_site_aborts is suspended from its cohorts.
        self.aborts: collections.Counter[str] = collections.Counter(resume.aborts if resume is not None else {})
        self.suspended: dict[str, str] = dict(resume.suspended) if resume is not None else {}
        # What the selection policy remembers of each site (coordinator/strategy/selection.py), as of the last commit.
        self.participation = selection.Participation.from_json(
            dict(resume.strategy.get("participation", {})) if resume is not None else {}
        )
        self._resume = resume
        self._generation = resume.generation if resume is not None else 0  # coordinator lives of this job
        self._reassembling = resume is not None  # after a restart, wait for the federation before going on
        self._restarted = resume is not None  # until the first round or evaluation after a restart has its sites
        self._pending_eval = resume.evaluate if resume is not None else None
        self._stored_evals = dict(resume.stored_evaluations) if resume is not None else {}
        self._eval_instances: collections.Counter[tuple[int, str]] = collections.Counter()
        self._stop_reason: str | None = None
        self._waiting_eval: tuple[int, int, str] | None = None  # an evaluation waiting for the federation
        self._round_line: tuple[int, int, int, float | None, float] | None = None
        # Asynchronous rounds (strategy.mode: async): the task each site holds, and the model version of each recent
        # round (an update is computed on the version of the round its task named).
        self._outstanding: dict[str, tuple[int, int]] = {}
        self._versions: dict[int, str] = {}
        # With secure aggregation: the sites that hold a trained update for a buffer (coordinator/round/buffered.py).
        self.buffer = Buffer(self._buffer_size(), self.spec.strategy.max_staleness) if self.buffered else None
        # job.standardize: the feature-statistics phase before round 1 (coordinator/round/standardize.py).
        self.standardization = (
            Standardization(setup.statistics, self.spec.standardize, setup.scaling)
            if setup.statistics is not None
            else None
        )
        self._out: list[Action] = []

    # -- queries ------------------------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.state is JobState.RUNNING

    @property
    def asynchronous(self) -> bool:
        return self.spec.strategy.mode == "async"

    @property
    def buffered(self) -> bool:
        """Asynchronous rounds with secure aggregation: each buffer is one secure instance (round/buffered.py)."""
        return self.asynchronous and self.spec.secure_aggregation.enabled

    @property
    def _async_plain(self) -> bool:
        """Asynchronous rounds whose updates arrive in the clear, each counted into the open buffer."""
        return self.asynchronous and not self.buffered

    def _buffer_size(self) -> int:
        size = max(self.spec.strategy.buffer_size or self.spec.min_sites, self.spec.min_sites)
        return min(size, max(2, self.setup.population))

    def upload_target(self, number: int, attempt: int) -> tuple[int, int]:
        """The round attempt an upload for task (``number``, ``attempt``) is counted in: itself, or under
        asynchronous rounds the open buffer."""
        rnd = self.round
        if self._async_plain and rnd is not None:
            return rnd.number, rnd.attempt
        return number, attempt

    def recent_version(self, version: str) -> bool:
        """Whether ``version`` is a model some site may still be asked to train on (asynchronous rounds)."""
        return self.asynchronous and version in self._versions.values()

    def _async_refusal(self, rnd: RoundAttempt, site: str, number: int, attempt: int) -> str | None:
        stale = rnd.number - number
        if stale > self.spec.strategy.max_staleness:
            return (
                f"update is {stale} model versions old (computed for round {number}, the model is now at round "
                f"{rnd.number}); strategy.max_staleness is {self.spec.strategy.max_staleness}: the site trains again "
                "on the newest model"
            )
        if self._outstanding.get(site) != (number, attempt):
            return f"site {site!r} holds no task for round {number} attempt {attempt} (it gets the newest model)"
        return None

    def eligible(self) -> list[str]:
        """Connected sites whose declaration fits the job and that are not suspended."""
        return sorted(
            s for s, d in self.connected.items() if self.setup.identity.mismatch(d) is None and s not in self.suspended
        )

    def shortfall(self) -> str:
        """Why too few sites can train: the connected sites that do not fit the job and why, the ones offline."""
        return shortfall(self.setup.identity, self.connected, self.suspended, self.setup.population, self._needed())

    def wake_at(self) -> float | None:
        """The earliest time the machine needs a :class:`Tick` (None: only events move it)."""
        if not self.running:
            return None
        rnd, ev = self.round, self.evaluation
        if self.phase is Phase.WAITING:
            return self.wait_deadline
        if self.phase in (Phase.TRAINING, Phase.UNMASKING) and rnd is not None:
            return rnd.secure.wake_at() if rnd.secure is not None else rnd.upload_deadline
        if self.phase is Phase.EVALUATING and ev is not None:
            inner = ev.secure.wake_at() if ev.secure is not None else None
            return min(t for t in (ev.deadline, inner) if t is not None)
        return None

    def secure_instance(self, split: str, number: int, attempt: int) -> SecAggRound | None:
        """The secure-aggregation instance an upload addresses (its masked input is folded into it)."""
        if split:
            ev = self.evaluation
            if (
                ev is not None
                and ev.secure is not None
                and (ev.number, ev.split, ev.instance) == (number, split, attempt)
            ):
                return ev.secure.sa
            return None
        rnd = self.round
        if rnd is not None and (rnd.number, rnd.attempt) == (number, attempt):
            return rnd.secagg
        return None

    def between_buffers(self) -> bool:
        """Asynchronous plain rounds: a buffer has filled and the next one is not open yet (the new model is being
        made, or the job waits for sites). An update arriving now counts in the next buffer; the runner holds it until
        that buffer opens instead of refusing it, so the site's work is not lost. Not during a federated evaluation:
        a site whose upload were held could not evaluate, and the evaluation would wait for it."""
        if not (self._async_plain and self.running) or self._stop_reason is not None:
            return False
        if self.phase is Phase.AGGREGATING:
            return self.number < self.spec.rounds
        return self.phase is Phase.WAITING and self.round is None and self.number <= self.spec.rounds

    def upload_refusal(self, site: str, number: int, attempt: int, split: str = "") -> str | None:
        """Why an admitted upload can no longer be counted (the round moved on or closed), or None."""
        if split:
            ev = self.evaluation
            if ev is None or ev.secure is None or (ev.number, ev.split, ev.instance) != (number, split, attempt):
                return f"the {split} evaluation of round {number} closed while this upload was in flight"
            return ev.secure.inputs.refusal(site) if ev.secure.uploads_open else "the masked inputs are closed"
        rnd = self.round
        if self._async_plain and rnd is not None and rnd.state.open:
            return self._async_refusal(rnd, site, number, attempt) or rnd.state.refusal(site)
        if rnd is None or (rnd.number, rnd.attempt) != (number, attempt) or not rnd.state.open:
            return f"round {number} closed while this upload was in flight"
        return rnd.state.refusal(site)

    # -- events -------------------------------------------------------------------------------------------------
    def handle(self, event: Event) -> list[Action]:
        """Apply ``event``; the actions to carry out, in order. A refusal raises before anything changes."""
        self._out = []
        if isinstance(event, SiteConnected):
            self._site_connected(event)
        elif isinstance(event, SiteDisconnected):
            self._site_disconnected(event)
        elif isinstance(event, UploadStarted):
            self._upload_started(event)
        elif isinstance(event, UploadAbandoned):
            self._upload_abandoned(event)
        elif isinstance(event, UploadVerified):
            self._upload_verified(event)
        elif isinstance(event, SecAggReceived):
            self._secagg_received(event)
        elif isinstance(event, Declined):
            self._declined(event)
        elif isinstance(event, EvaluationReceived):
            self._evaluation_received(event)
        elif isinstance(event, StopRequested):
            self._stop(event)
        elif isinstance(event, ClearSuspension):
            self._clear_suspension(event)
        elif isinstance(event, Suspend):
            self._suspend(event)
        elif not self.running:
            pass  # a finished job only answers the events above (with refusals)
        elif isinstance(event, Start):
            self._start(event.now)
        elif isinstance(event, Tick):
            self._tick(event.now)
        elif isinstance(event, Aggregated):
            self._aggregated(event)
        elif isinstance(event, AggregationFailed):
            if self.round is not None and (self.round.number, self.round.attempt) == (event.number, event.attempt):
                self._fail_attempt(event.reason, event.now)
        elif isinstance(event, Crashed):
            self._finish(JobState.FAILED, f"internal error: {event.detail}")
        out, self._out = self._out, []
        return out

    # -- start, waiting and what comes next -----------------------------------------------------------------------
    def _start(self, now: float) -> None:
        if self.phase is not Phase.STARTING:
            return
        resume = self._resume
        if resume is None:
            self._emit(Audit("job_started", {"job_id": self.job_id, "task": self.setup.task_name}))
            self._next(now)
            return
        self._emit(UpdateJob({"state": JobState.RUNNING.value, "detail": f"resumed at round {resume.number}"}))
        self._emit(Audit("job_resumed", {"job_id": self.job_id, "round": resume.number, "notes": list(resume.notes)}))
        self._emit(Progress(f"job {self.job_id} resumed at round {resume.number}: " + "; ".join(resume.notes)))
        if resume.reopen_cohort is not None:
            # The attempt that was open: continue it at once, so sites retrying an upload they finished find it.
            self._reassembling = False
            self._open_round(now, list(resume.reopen_cohort), reopened=True)
            return
        self._wait(now)

    def _wait(self, now: float) -> None:
        self.phase = Phase.WAITING
        self.wait_deadline = now + self.spec.wait_for_sites_s
        self._check_waiting(now)

    def _needed(self) -> int:
        """Eligible sites a round (or an evaluation) waits for; suspended sites cannot be waited for."""
        available = min(self.spec.min_available_sites, self.setup.population - len(self.suspended))
        return max(self.spec.min_sites, available)

    def _check_waiting(self, now: float) -> None:
        if self.phase is not Phase.WAITING:
            return
        timed_out = self.wait_deadline is not None and now >= self.wait_deadline
        if len(self.eligible()) < self._needed() and not timed_out:
            return
        self.wait_deadline = None
        if self._reassembling:
            self._reassembling = False
            self._next(now)
        elif self._waiting_eval is not None:
            number, attempt, split = self._waiting_eval
            self._waiting_eval = None
            self._open_evaluation(now, number, attempt, split, waited=True)
        elif self.standardization is not None and self.standardization.pending:
            self._open_evaluation(now, 0, 0, STATS_SPLIT, waited=True)
        else:
            self._begin_round(now)

    def _next(self, now: float) -> None:
        """What follows a committed round (or a restart): a cut-off evaluation, the next round, or the final test."""
        if self._stop_reason is not None:
            self._finish(JobState.STOPPED, self._stop_reason or "stopped by an admin")
        elif self._reassembling:
            self._wait(now)
        elif self._pending_eval is not None:
            number, attempt = self._pending_eval
            self._pending_eval = None
            self._open_evaluation(now, number, attempt, "val")
        elif self.number > self.spec.rounds and self.spec.final_evaluation:
            self._open_evaluation(now, self.spec.rounds, 0, "test")
        elif self.number > self.spec.rounds:
            self._finish(JobState.FINISHED, f"completed {self.spec.rounds} rounds")
        else:
            self._wait(now)

    # -- a round attempt ------------------------------------------------------------------------------------------
    def _select(self, eligible: list[str]) -> list[str]:
        if self.asynchronous:
            return eligible  # every eligible site trains whenever it is free (FedBuff)
        k = max(self.spec.min_sites, math.ceil(self.spec.fraction * len(eligible)))
        # Over-selection: ask a few more sites than the round needs; it closes when k of them have reported.
        size = min(len(eligible), math.ceil(k * (1 + self.spec.over_selection)))
        seed = f"{self.job_id}/{self.number}/{self.attempt}"
        return selection.select(self.spec.strategy, eligible, size, seed, self.participation)

    def _target(self, cohort_size: int) -> int | None:
        """How many reports close an over-selected round or evaluation early (None without over-selection)."""
        if self.spec.over_selection <= 0:
            return None
        k = math.ceil(cohort_size / (1 + self.spec.over_selection))
        return min(cohort_size, max(self.spec.min_sites, k))

    def _buffer_target(self, cohort_size: int) -> int:
        """Asynchronous rounds: the updates that make a new model (the buffer), at most the sites there are."""
        size = self.spec.strategy.buffer_size or self.spec.min_sites
        return min(cohort_size, max(size, self.spec.min_sites))

    def _round_state(self, sites: frozenset[str], target: int | None) -> RoundState:
        min_sites = min(self.spec.min_sites, len(sites))
        return RoundState(sites, min_sites, None if target is None else max(min_sites, min(target, len(sites))))

    def _begin_round(self, now: float) -> None:
        self._restarted = False
        eligible = self.eligible()
        if len(eligible) < self.spec.min_sites:
            why = self.shortfall()
            self._emit(Progress(f"round {self.number}: too few eligible sites after waiting: {why}; retrying"))
            self._retry(
                now,
                f"round {self.number} could not start in {self.attempt + 1} waits of job.wait_for_sites_s "
                f"({self.spec.wait_for_sites_s:g}s): {why}",
            )
            return
        cohort = self._select(eligible)
        over = self.privacy.would_exceed(len(cohort))
        if over is not None:
            p = self.spec.privacy
            self._emit(Audit("budget_stop", {"job_id": self.job_id, "round": self.number, "epsilon": over}))
            self._finish(
                JobState.BUDGET_EXHAUSTED,
                f"privacy budget exhausted after {self.number - 1} rounds: round {self.number} would reach epsilon "
                f"{over:.3f} > {p.target_epsilon:g} (delta {p.delta:g})",
            )
            return
        self._open_round(now, cohort)

    def _train_task(
        self, cohort: list[str], upload_deadline: float, now: float
    ) -> tuple[pb.TrainTask, SecAggRound | None]:
        spec, privacy = self.spec, self.privacy
        task = pb.TrainTask(
            job_id=self.job_id,
            round=self.number,
            attempt=self.attempt,
            model_version=self.model_version,
            deadline_unix=upload_deadline,
            task_params_json=self.setup.identity.task_params,
            params=pb.TrainParams(
                local_epochs=spec.params.local_epochs,
                batch_size=spec.params.batch_size,
                learning_rate=spec.params.rate(self.number, spec.rounds),
                seed=round_seed(spec.params.seed, self.number),
                optimizer=spec.params.optimizer,
                momentum=spec.params.momentum,
                weight_decay=spec.params.weight_decay,
                keep_optimizer_state=spec.params.keep_optimizer_state,
                proximal_mu=spec.params.proximal_mu,
            ),
            norm_bound=spec.strategy.norm_bound,
        )
        stamp(task, self.scaling)
        secagg = None
        task.buffered = self.buffered  # train and keep the update; it is summed with its buffer's instance
        if spec.secure_aggregation.enabled and not self.buffered:
            numel = sum(s.numel for s in self.setup.specs)
            skellam = privacy.skellam(len(cohort)) if privacy.distributed else None
            secagg = SecAggRound.create(
                self.job_id,
                self.number,
                self.attempt,
                cohort,
                numel,
                spec.secure_aggregation,
                list(self.setup.ca_certs),
                skellam,
                now=now,
            )
            task.secagg.CopyFrom(secagg.setup())
        task.privacy.CopyFrom(
            pb.PrivacySetup(
                unit=spec.privacy.unit,
                clip_norm=privacy.clip_norm,
                noise_multiplier=spec.privacy.noise_multiplier,
                mode=("distributed" if privacy.distributed else "central") if privacy.site_level else "",
            )
        )
        if secagg is not None and secagg.skellam is not None:
            task.privacy.rotation_seed = secagg.rotation_seed
            task.privacy.skellam_json = json.dumps(secagg.skellam.to_dict(), sort_keys=True)
        return task, secagg

    def _secure_sum(self, sa: SecAggRound, upload_deadline: float, deadline: float, now: float) -> SecureSum:
        cohort = len(sa.params.cohort)
        return SecureSum(
            sa,
            min_inputs=self.spec.min_sites,
            target=self._target(cohort),
            upload_deadline=upload_deadline,
            deadline=deadline,
            stage_timeout=self.spec.secure_aggregation.stage_timeout_s,
            now=now,
        )

    def _open_round(self, now: float, cohort: list[str], *, reopened: bool = False) -> None:
        # The timeout model (docs/ARCHITECTURE.md): round_timeout_s bounds the whole round. With secure aggregation
        # the last part of it is kept for the two unmasking stages; sites must upload before the rest.
        deadline = now + self.spec.round_timeout_s
        upload_deadline = deadline - self.spec.unmask_reserve_s
        task, secagg = self._train_task(cohort, upload_deadline, now)
        members = frozenset(cohort)
        rnd = RoundAttempt(self.number, self.attempt, members, task, now, deadline, upload_deadline, reopened=reopened)
        if secagg is not None:
            rnd.secure = self._secure_sum(secagg, upload_deadline, deadline, now)
        elif self.asynchronous:
            # Buffered (secure) rounds: this state sees only dropouts and the deadline; ready sites fill the buffer.
            target = self._buffer_target(len(cohort))
            rnd.plain = RoundState(members, 1) if self.buffered else self._round_state(members, target)
            if self.buffer is not None:
                self.buffer.instance_over()
            self._versions = {
                n: v for n, v in self._versions.items() if n >= self.number - self.spec.strategy.max_staleness
            }
            self._versions[self.number] = self.model_version
            # A site whose task is now too old to be taken is free for a new one (its old update will be refused).
            for site, (n, _) in list(self._outstanding.items()):
                if self.number - n > self.spec.strategy.max_staleness:
                    del self._outstanding[site]
        else:
            rnd.plain = self._round_state(members, self._target(len(cohort)))
        self.round, self.phase = rnd, Phase.TRAINING
        if reopened:
            assert self._resume is not None
            for up in self._resume.uploads:
                # Verified against the spool by plan_resume: count them again, exactly once.
                metrics = {str(k): float(v) for k, v in dict(up["metrics"]).items()}
                self._book(rnd, str(up["site"]), str(up["sha256"]), int(up["num_samples"]), metrics)
                self._round_event(rnd, UploadAccepted(str(up["site"])), now)
        else:
            self._emit(RecordRoundStart(self.number, self.attempt, tuple(cohort), self.model_version))
        for site in cohort:
            if self.round is not rnd or site in rnd.reported or not rnd.state.open:
                continue
            if self.asynchronous and site in self._outstanding:
                continue  # still training on an older model; its update counts here, weighted by its staleness
            if self.buffer is not None and self.buffer.holds(site):
                continue  # it holds a trained update for a buffer
            if not self._send_train(site, task) and not reopened:
                # After a restart the sites are still reconnecting: they get the task when they are back, and the
                # round waits for them until its deadline instead of counting them lost.
                self._round_event(rnd, SiteLost(site), now)
        self._fill_buffer(now)

    def _fill_buffer(self, now: float) -> None:
        """Buffered secure rounds: once K sites hold an update and no instance runs, open the buffer's instance."""
        rnd, buf = self.round, self.buffer
        if (
            rnd is None
            or buf is None
            or rnd.secure is not None
            or not rnd.state.open
            or self.phase is not Phase.TRAINING
        ):
            return
        for site in buf.stale(rnd.number):
            self._send_train(site, rnd.task)  # its update is too old: train again on the newest model
        members = buf.take()
        if members is None:
            return
        # The instance gets the whole round timeout from now: the time the buffer took to fill is not its own.
        rnd.deadline = now + self.spec.round_timeout_s
        rnd.upload_deadline = rnd.deadline - self.spec.unmask_reserve_s
        numel = sum(s.numel for s in self.setup.specs)
        sa = SecAggRound.create(
            self.job_id,
            rnd.number,
            rnd.attempt,
            sorted(members),
            numel,
            self.spec.secure_aggregation,
            list(self.setup.ca_certs),
            now=now,
        )
        secure = rnd.secure = self._secure_sum(sa, rnd.upload_deadline, rnd.deadline, now)
        rnd.cohort = rnd.cohort | frozenset(members)
        setup = sa.setup()
        stale = {s: staleness_of(h, rnd.number) for s, h in members.items()}
        self._emit(Audit("buffer_instance", {"job_id": self.job_id, "round": rnd.number, "staleness": stale}))
        for site, held in sorted(members.items()):
            task = instance_task(rnd.task, setup, held, rnd.number, self.spec.strategy, rnd.upload_deadline)
            if self.round is rnd and not self._send(site, pb.WorkItem(train=task)):
                self._secure_outcome(rnd, secure.lost(site, now, self._send), now)

    def _ready_received(self, site: str, msg: pb.SecAggMessage, now: float) -> None:
        """A site trained its buffered task and keeps the update: queue it for a buffer."""
        buf = self.buffer
        if buf is None or not self.running:
            raise FailedPrecondition("this job does not buffer updates (strategy.mode async with secure aggregation)")
        held = Held(msg.round, msg.attempt, msg.ready)
        refusal = buf.refusal(site, held, self._outstanding.get(site), self._versions, self.number)
        if refusal is not None:
            raise FailedPrecondition(refusal)
        del self._outstanding[site]
        buf.ready[site] = held
        self._fill_buffer(now)

    def _book(self, rnd: RoundAttempt, site: str, sha256: str, num_samples: int, metrics: dict[str, float]) -> None:
        """Count an accepted upload into the open attempt (also when a restart takes one back from the spool)."""
        rnd.reported[site] = Report(sha256, num_samples, metrics)
        # DP-FedAvg weighs every site the same; plain FedAvg by sample count; FedBuff also by staleness.
        rnd.weights[site] = 1.0 if self.privacy.site_level else float(num_samples)
        if "staleness" in metrics:
            rnd.weights[site] *= self.spec.strategy.staleness_weight(int(metrics["staleness"]))
        if "clip_bit" in metrics:
            rnd.clip_bits.append(1 if metrics["clip_bit"] > 0 else -1)
        if "dp_epsilon" in metrics:
            self.privacy.record_site(site, metrics["dp_epsilon"])
        if "loss" in metrics:
            rnd.loss_sum += metrics["loss"] * num_samples
            rnd.weight_sum += num_samples

    def _round_event(self, rnd: RoundAttempt, event: RoundEvent, now: float) -> None:
        """Feed the attempt's close rule (or its secure instance); act on the verdict."""
        if rnd.secure is not None:
            secure = rnd.secure
            if isinstance(event, UploadAccepted):
                done = secure.input_accepted(event.site, now, self._send)
            elif isinstance(event, SiteLost):
                done = secure.lost(event.site, now, self._send, event.cause)
            elif isinstance(event, Stop):
                done = secure.stop(event.reason)
            else:
                done = secure.advance(now, self._send)
            self._secure_outcome(rnd, done, now)
            return
        assert rnd.plain is not None
        for close in rnd.plain.handle(event):
            rnd.close_reason = close.reason
            if close.succeeded:
                self._aggregate(rnd)
            else:
                self._fail_attempt(close.reason, now)

    def _secure_outcome(self, rnd: RoundAttempt, done: Done | None, now: float) -> None:
        secure = rnd.secure
        assert secure is not None
        if self.round is not rnd:
            return
        if done is None:
            if secure.stage == "unmask":
                self.phase = Phase.UNMASKING
            return
        if done.ok:
            rnd.close_reason = done.reason
            self._aggregate(rnd)
        else:
            self._emit(Audit("secagg_aborted", {"job_id": self.job_id, "round": rnd.number, "reason": done.reason}))
            self._fail_attempt(done.reason, now)

    def _aggregate(self, rnd: RoundAttempt) -> None:
        self.phase = Phase.AGGREGATING
        if rnd.secure is not None:
            self._emit(Aggregate(rnd.number, rnd.attempt, secure=True))
            return
        central = self.privacy.site_level
        # DP-FedAvg, central: noise on the sum of clipped updates, divided by the round's target cohort size (a
        # fixed, public denominator, so one site changes the mean by at most C / m).
        denominator = float(rnd.state.target or len(rnd.cohort)) if central else 0.0
        self._emit(Aggregate(rnd.number, rnd.attempt, False, dict(rnd.weights), central, denominator))

    def _aggregated(self, event: Aggregated) -> None:
        rnd = self.round
        if rnd is None or (rnd.number, rnd.attempt) != (event.number, event.attempt):
            return
        if self.phase is not Phase.AGGREGATING:
            return
        for site in event.evidence:
            self._count_abort(site, "revealed a secure-aggregation share that contradicts its commitment")
        reported = tuple(sorted(rnd.state.reported))
        self.participation.record(sorted(rnd.cohort), reported, self.spec.strategy.availability_window)
        if event.report:
            self._emit(Audit("robust_aggregation", {"job_id": self.job_id, "round": rnd.number, **event.report}))
        epsilon = self.privacy.record_round(len(rnd.cohort))
        if self.privacy.adaptive is not None and rnd.clip_bits:
            old_c = self.privacy.clip_norm
            new_c = self.privacy.adapt_clip(rnd.clip_bits)
            self._emit(Audit("clip_adapted", {"job_id": self.job_id, "round": rnd.number, "old": old_c, "new": new_c}))
        if event.totals is not None:  # secure aggregation: only the totals, from the masked lanes
            samples = round(event.totals.get("samples", 0.0))
            loss_sum = event.totals.get("loss_sum", 0.0)
            train_loss = loss_sum / samples if samples else None
        else:
            samples = rnd.weight_sum
            train_loss = rnd.loss_sum / rnd.weight_sum if rnd.weight_sum else None
        train_s = max(0.0, event.now - rnd.started - event.seconds)
        self._emit(
            CommitRound(
                rnd.number,
                rnd.attempt,
                reported,
                event.model_version,
                train_loss,
                samples,
                {"train_s": train_s, "aggregate_s": event.seconds},
                rnd.close_reason,
                epsilon,
                self.privacy.state(),
                dict(self.privacy.site_epsilon),
                {"optimizer": dict(event.optimizer), "participation": self.participation.to_json(), **event.report},
            )
        )
        self._emit(Failpoint("coordinator.round_committed", rnd.number))
        self._emit(
            Audit(
                "round_completed",
                {
                    "job_id": self.job_id,
                    "round": rnd.number,
                    "sites": list(reported),
                    "model_version": event.model_version,
                },
            )
        )
        self.model_version = event.model_version
        self.completed = rnd.number
        self._round_line = (rnd.number, len(reported), len(rnd.cohort), train_loss, event.now - rnd.started)
        self.round = None
        number, attempt = self.number, self.attempt
        self.number, self.attempt = number + 1, 0
        if self._stop_reason is None and self.spec.evaluate_every and number % self.spec.evaluate_every == 0:
            self._open_evaluation(event.now, number, attempt, "val")
            return
        self._print_round(None)
        self._next(event.now)

    def _fail_attempt(self, reason: str, now: float) -> None:
        rnd = self.round
        if rnd is None:
            return
        if rnd.secure is not None and rnd.secure.stage != "done":
            rnd.secure.stop(reason)
        elif rnd.state.open:
            rnd.state.handle(Stop(reason))
        reported = tuple(sorted(rnd.state.reported))
        self._emit(FailRound(rnd.number, rnd.attempt, reported, reason, {"train_s": now - rnd.started}))
        self._emit(
            Audit(
                "round_failed", {"job_id": self.job_id, "round": rnd.number, "attempt": rnd.attempt, "reason": reason}
            )
        )
        self._emit(Progress(f"round {rnd.number} attempt {rnd.attempt} failed: {reason}"))
        self.round = None
        self._retry(now, f"round {self.number} failed {self.attempt + 1} times; the last attempt: {reason}")

    def _retry(self, now: float, exhausted: str) -> None:
        """The attempt did not complete: try again with a new cohort, up to ``max_round_retries``."""
        if self._stop_reason is not None:
            self._finish(JobState.STOPPED, self._stop_reason or "stopped by an admin")
            return
        self.attempt += 1
        if self.attempt > self.spec.max_round_retries:
            self._finish(JobState.FAILED, exhausted)
            return
        self._wait(now)

    # -- secure aggregation: site messages, aborts, suspension ----------------------------------------------------
    def _secagg_received(self, event: SecAggReceived) -> None:
        msg, site = event.message, event.site
        if msg.split:
            ev = self.evaluation
            if ev is None or ev.secure is None or not self.running or (ev.number, ev.split) != (msg.round, msg.split):
                raise FailedPrecondition(f"no secure {msg.split} evaluation of round {msg.round} is open")
            done = ev.secure.receive(site, msg, event.now, self._send)
            self._after_secagg_message(site, msg, ev.number)
            self._secure_eval_outcome(ev, done, event.now)
            return
        if msg.WhichOneof("stage") == "ready":
            self._ready_received(site, msg, event.now)
            return
        rnd = self.round
        if rnd is None or rnd.secure is None or not self.running:
            raise FailedPrecondition("no secure-aggregation round is open")
        if self.phase not in (Phase.TRAINING, Phase.UNMASKING):
            raise FailedPrecondition(f"the secure-aggregation stages of round {rnd.number} are closed")
        done = rnd.secure.receive(site, msg, event.now, self._send)  # refusals raise before anything changes
        self._after_secagg_message(site, msg, rnd.number)
        self._secure_outcome(rnd, done, event.now)

    def _after_secagg_message(self, site: str, msg: pb.SecAggMessage, number: int) -> None:
        kind = msg.WhichOneof("stage")
        if kind == "abort_reason":
            # A site's word that it found tampering cannot be checked: it is believed for itself only. The site is a
            # dropout of this instance (the others go on while they meet the threshold), and its aborts are counted.
            fields = {"job_id": self.job_id, "round": number, "split": msg.split, "reason": msg.abort_reason[:500]}
            self._emit(Audit("secagg_site_abort", fields, actor=site))
            self._count_abort(site, f"aborted secure aggregation: {msg.abort_reason[:200]}")
        elif kind == "unmask":
            self._emit(Failpoint("coordinator.unmasking", number))

    def _count_abort(self, site: str, reason: str) -> None:
        self.aborts[site] += 1
        limit = self.spec.secure_aggregation.max_site_aborts
        if limit and self.aborts[site] >= limit and site not in self.suspended:
            self.suspended[site] = f"{self.aborts[site]} secure-aggregation aborts in this job (last: {reason})"
            self._emit(
                Audit("site_suspended", {"job_id": self.job_id, "aborts": self.aborts[site], "reason": reason}, site)
            )
            self._emit(
                Progress(
                    f"site {site} suspended from job {self.job_id} after {self.aborts[site]} secure-aggregation "
                    f"aborts; `cohort job clear-site {self.job_id} {site}` lets it take part again"
                )
            )
        self._emit(UpdateJob({"site_aborts": json.dumps(self._abort_state(), sort_keys=True)}))

    def _abort_state(self) -> dict[str, object]:
        return {"aborts": dict(self.aborts), "suspended": dict(self.suspended)}

    def _clear_suspension(self, event: ClearSuspension) -> None:
        if event.site not in self.suspended:
            raise NotFound(f"site {event.site!r} is not suspended from job {self.job_id}")
        del self.suspended[event.site]
        self.aborts[event.site] = 0
        self._emit(Audit("site_unsuspended", {"job_id": self.job_id, "site": event.site}, actor=event.admin))
        self._emit(UpdateJob({"site_aborts": json.dumps(self._abort_state(), sort_keys=True)}))
        self._emit(Progress(f"site {event.site} may take part in job {self.job_id} again (cleared by {event.admin})"))

    # -- uploads --------------------------------------------------------------------------------------------------
    def _upload_started(self, event: UploadStarted) -> None:
        site, h = event.site, event.header
        if h.job_id != self.job_id:
            raise FailedPrecondition(f"update is for job {h.job_id!r}, but the running job is {self.job_id!r}")
        if h.split:
            self._eval_upload_started(site, h, event.specs)
            return
        rnd = self.round
        if self.buffered and rnd is not None and rnd.secure is None:
            raise FailedPrecondition(
                "updates stay at the sites until their buffer's secure-aggregation instance asks for them (send ready)"
            )
        if self._async_plain and rnd is not None and self.running:
            refusal = self._async_refusal(rnd, site, h.round, h.attempt)
            if refusal is not None:
                raise FailedPrecondition(refusal)
            if h.base_model_version != self._versions.get(h.round):
                raise FailedPrecondition("update was computed against another model version than its task named")
        elif rnd is None or rnd.number != h.round or rnd.attempt != h.attempt or not self.running:
            current = f"round {rnd.number} attempt {rnd.attempt}" if rnd else "no round"
            raise FailedPrecondition(f"update is for round {h.round} attempt {h.attempt}, but {current} is open")
        if site not in rnd.state.cohort:
            raise PermissionDenied(f"site {site!r} is not in the cohort of round {rnd.number}")
        if not self.asynchronous and h.base_model_version != rnd.base_version:
            raise FailedPrecondition("update was computed against another model version than this round's")
        held = self.buffer.members.get(site) if self.buffer is not None else None
        if self.buffer is not None and (held is None or held.version != h.base_model_version):
            raise FailedPrecondition("the masked update is for another model version than the one its site trained on")
        self._check_header(rnd, h, event.specs)
        previous = rnd.reported.get(site)
        if previous is not None:
            if previous.sha256 == h.manifest.sha256:
                self._emit(AckDuplicate(previous.sha256))
                return
            raise AlreadyExists(f"site {site!r} already uploaded a different update for round {rnd.number}")
        refusal = rnd.state.refusal(site)
        if refusal is not None:
            raise FailedPrecondition(refusal)
        if site in rnd.in_flight:
            raise FailedPrecondition(f"an upload from site {site!r} for this round is already in progress")
        rnd.in_flight.add(site)

    def _check_header(self, rnd: RoundAttempt, h: pb.UpdateHeader, specs: tuple[Spec, ...]) -> None:
        if rnd.secagg is not None:
            if not rnd.uploads_open:
                raise FailedPrecondition("masked inputs are taken once the keys are shared; wait for the shares")
            _check_masked(rnd.secagg, h, specs)
            return
        if specs != self.setup.specs:
            expected = {s.name: s for s in self.setup.specs}
            for s in specs:
                if s.name not in expected:
                    raise InvalidArgument(f"update has tensor {s.name!r}, which the model does not have")
                if s != expected[s.name]:
                    raise InvalidArgument(
                        f"tensor {s.name!r} has dtype/shape {s.dtype}/{list(s.shape)}; the model "
                        f"needs {expected[s.name].dtype}/{list(expected[s.name].shape)}"
                    )
            raise InvalidArgument("update tensors are missing or out of order compared with the model")
        if not 1 <= h.num_samples <= MAX_SAMPLES:
            raise InvalidArgument(f"num_samples must be between 1 and {MAX_SAMPLES}")
        if len(h.metrics) > MAX_METRICS or any(len(k) > 64 or not math.isfinite(v) for k, v in h.metrics.items()):
            raise InvalidArgument(f"metrics: at most {MAX_METRICS} finite values with names of 64 characters or less")
        if not math.isfinite(h.train_seconds) or h.train_seconds < 0:
            raise InvalidArgument("train_seconds must be a finite, non-negative number")

    def _upload_verified(self, event: UploadVerified) -> None:
        site, h = event.site, event.header
        if h.split:
            self._eval_upload_verified(site, h, event.now)
            return
        rnd = self.round
        if rnd is not None and (self.asynchronous or (rnd.number, rnd.attempt) == (h.round, h.attempt)):
            rnd.in_flight.discard(site)
        refusal = self.upload_refusal(site, h.round, h.attempt)
        if refusal is not None:
            raise FailedPrecondition(refusal)
        assert rnd is not None
        metrics = dict(h.metrics)
        if self._async_plain:
            metrics["staleness"] = float(rnd.number - h.round)  # the coordinator's own count, kept with the upload
            self._outstanding.pop(site, None)
        elif self.buffer is not None and site in self.buffer.members:
            metrics["staleness"] = float(staleness_of(self.buffer.members[site], rnd.number))
        sha = h.manifest.sha256
        self._emit(RecordUpload(rnd.number, rnd.attempt, site, sha, h.num_samples, metrics, h.train_seconds))
        self._emit(Failpoint("coordinator.upload_accepted", rnd.number))
        self._book(rnd, site, sha, h.num_samples, metrics)
        self._round_event(rnd, UploadAccepted(site), event.now)

    def _upload_abandoned(self, event: UploadAbandoned) -> None:
        rnd, ev = self.round, self.evaluation
        if rnd is not None and (self.asynchronous or (rnd.number, rnd.attempt) == (event.number, event.attempt)):
            rnd.in_flight.discard(event.site)
        if ev is not None:
            ev.in_flight.discard(event.site)

    # -- sites ----------------------------------------------------------------------------------------------------
    def _send_train(self, site: str, task: pb.TrainTask) -> bool:
        sent = self._send(site, pb.WorkItem(train=task))
        if sent and self.asynchronous:
            self._outstanding[site] = (task.round, task.attempt)
        return sent

    def _send(self, site: str, item: pb.WorkItem) -> bool:
        if site not in self.connected:
            return False
        self._emit(Send(site, item))
        return True

    def _site_connected(self, event: SiteConnected) -> None:
        self.connected[event.site] = event.declaration
        if not self.running:
            return
        site, rnd = event.site, self.round
        if self.buffer is not None:
            # Buffered secure rounds: an arriving site that holds nothing trains at once on the newest model.
            idle = site not in self._outstanding and not self.buffer.holds(site) and site in self.eligible()
            if rnd is not None and self.phase is Phase.TRAINING and rnd.state.open and idle:
                rnd.cohort = rnd.cohort | {site}
                self._send_train(site, rnd.task)
            self._check_waiting(event.now)
            return
        # A restarted site picks its task up again. Not under secure aggregation: a restarted site lost this round's
        # keys, so it stays a dropout until the next round.
        plain = rnd is not None and self.phase is Phase.TRAINING and rnd.plain is not None
        if plain and rnd is not None and self.asynchronous and rnd.state.open and site in self.eligible():
            # Asynchronous rounds: a site that arrives trains at once on the newest model.
            if site not in rnd.state.cohort and rnd.plain is not None:
                rnd.cohort = rnd.cohort | {site}
                rnd.plain.cohort = rnd.plain.cohort | {site}
            if site not in rnd.state.reported and site not in self._outstanding:
                self._send_train(site, rnd.task)
            self._round_event(rnd, SiteBack(site), event.now)
        elif plain and rnd is not None and site in rnd.state.cohort and rnd.state.open:
            self._round_event(rnd, SiteBack(site), event.now)
            if site not in rnd.state.reported and self.round is rnd:
                self._send_train(site, rnd.task)
        self._check_waiting(event.now)

    def _site_disconnected(self, event: SiteDisconnected) -> None:
        self.connected.pop(event.site, None)
        self._outstanding.pop(event.site, None)  # its task died with the session
        if self.buffer is not None:
            self.buffer.forget(event.site)  # and so did an update it kept for a buffer
        if not self.running:
            return
        site, rnd = event.site, self.round
        collecting = rnd is not None and self.phase in (Phase.TRAINING, Phase.UNMASKING)
        if collecting and rnd is not None and (rnd.secure is not None or (site in rnd.state.cohort and rnd.state.open)):
            self._round_event(rnd, SiteLost(site), event.now)
        ev = self.evaluation
        if ev is not None and ev.secure is not None and site in ev.expected:
            self._secure_eval_outcome(ev, ev.secure.lost(site, event.now, self._send), event.now)
        elif ev is not None and site in ev.expected and site not in ev.reports:
            ev.expected.discard(site)
            self._check_evaluation(event.now)

    def _declined(self, event: Declined) -> None:
        req = event.request
        if req.split:
            ev = self.evaluation
            if (
                ev is None
                or ev.secure is None
                or (ev.number, ev.split, ev.instance) != (req.round, req.split, req.attempt)
            ):
                raise FailedPrecondition(f"no secure {req.split} evaluation of round {req.round} is open")
            if event.site not in ev.expected:
                raise PermissionDenied(f"site {event.site!r} was not asked for this evaluation")
            self._emit(self._decline_audit(event, req.round))
            self._secure_eval_outcome(ev, ev.secure.lost(event.site, event.now, self._send), event.now)
            return
        rnd = self.round
        if rnd is None or rnd.number != req.round or rnd.attempt != req.attempt or not self.running:
            raise FailedPrecondition(f"round {req.round} attempt {req.attempt} is not open")
        if event.site not in rnd.state.cohort and event.site not in rnd.cohort:
            raise PermissionDenied(f"site {event.site!r} is not in the cohort of round {rnd.number}")
        self._emit(self._decline_audit(event, rnd.number))
        if rnd.secure is not None or rnd.state.open:
            self._round_event(rnd, SiteLost(event.site, f"declined: {event.request.reason[:200]}"), event.now)

    def _decline_audit(self, event: Declined, number: int) -> Audit:
        fields = {
            "job_id": self.job_id,
            "round": number,
            "split": event.request.split,
            "reason": event.request.reason[:500],
        }
        return Audit("site_declined", fields, actor=event.site)

    # -- evaluation -----------------------------------------------------------------------------------------------
    def _open_evaluation(self, now: float, number: int, attempt: int, split: str, *, waited: bool = False) -> None:
        sites = self.eligible()
        if self._restarted and len(sites) < self._needed() and not waited:
            # Right after a restart the sites are still reconnecting: wait for them, as a round does, instead of
            # evaluating with none. (Later, an evaluation takes whoever is connected, like before.)
            self._waiting_eval = (number, attempt, split)
            self._wait(now)
            return
        self._restarted = False
        deadline = now + self.spec.round_timeout_s
        ev = Evaluation(number, attempt, split, self.model_version, set(sites), deadline, now)
        ev.enough = self._target(len(sites))
        self.evaluation, self.phase = ev, Phase.EVALUATING
        self._emit(Failpoint("coordinator.evaluating", number))
        if self.spec.secure_aggregation.enabled:
            self._open_secure_evaluation(ev, sites, now)
            return
        # Reports a site sent for this very model before a restart count; the site would not evaluate it twice.
        for site, values in self._stored_evals.get((number, split, ev.version), {}).items():
            ev.reports[site] = values
            ev.expected.add(site)
        item = pb.WorkItem(
            evaluate=pb.EvaluateTask(
                job_id=self.job_id,
                round=number,
                model_version=ev.version,
                split=split,
                deadline_unix=ev.deadline,
                task_params_json=self.setup.identity.task_params,
            )
        )
        stamp(item.evaluate, self.scaling)
        for site in sites:
            if site not in ev.reports and not self._send(site, item):
                ev.expected.discard(site)
        self._check_evaluation(now)

    def _open_secure_evaluation(self, ev: Evaluation, sites: list[str], now: float) -> None:
        """Under secure aggregation the sites' results are summed securely: the coordinator learns the totals only.
        Each evaluation is a new instance (a restart starts another), so sites answer it whatever they did before."""
        instance = self._generation * 4 + self._eval_instances[(ev.number, ev.split)]
        self._eval_instances[(ev.number, ev.split)] += 1
        if len(sites) < 2 or instance >= MAX_EVAL_INSTANCES:
            self._check_evaluation(now, force=True)  # nothing to sum securely: no result
            return
        ev.instance = instance
        upload_deadline = ev.deadline - self.spec.unmask_reserve_s
        if ev.split == STATS_SPLIT:
            assert self.standardization is not None
            lanes = self.standardization.lanes()
        else:
            lanes = EVAL_LANES + SCORE_LANES if self.setup.report_scores else EVAL_LANES
        sa = SecAggRound.create(
            self.job_id,
            ev.number,
            instance,
            sites,
            0,
            self.spec.secure_aggregation,
            list(self.setup.ca_certs),
            now=now,
            split=ev.split,
            lanes=lanes,
        )
        ev.secure = self._secure_sum(sa, upload_deadline, ev.deadline, now)
        task = pb.EvaluateTask(
            job_id=self.job_id,
            round=ev.number,
            model_version=ev.version,
            split=ev.split,
            deadline_unix=upload_deadline,
            attempt=instance,
            task_params_json=self.setup.identity.task_params,
        )
        stamp(task, self.scaling)
        task.secagg.CopyFrom(sa.setup())
        for site in sites:
            if not self._send(site, pb.WorkItem(evaluate=task)):
                self._secure_eval_outcome(ev, ev.secure.lost(site, now, self._send), now)

    def _secure_eval_outcome(self, ev: Evaluation, done: Done | None, now: float) -> None:
        if done is None or self.evaluation is not ev or ev.secure is None:
            return
        if done.ok:
            try:
                unmasked = ev.secure.sa.finish()  # a few lanes: cheap, unlike a model's unmasking
            except SecAggAborted as exc:
                done = Done(False, f"secure aggregation: {exc}")
            else:
                t = unmasked.totals
                if ev.split == STATS_SPLIT:  # the feature statistics' totals: the phase derives the scaling
                    ev.lane_totals, ev.totals = dict(t), (records_of(t), math.nan, math.nan)
                    self._check_evaluation(now)
                    return
                n = round(t.get("samples", 0.0))
                ev.totals = (n, t["loss_sum"] / n, t["accuracy_sum"] / n) if n else (0, math.nan, math.nan)
                ev.scores = scores_of_lanes(t)  # the federation's histogram; no site's alone
        if not done.ok:
            fields = {"job_id": self.job_id, "round": ev.number, "split": ev.split, "reason": done.reason}
            self._emit(Audit("secure_evaluation_failed", fields))
            ev.totals, ev.failure = (0, math.nan, math.nan), done.reason
        self._check_evaluation(now)

    def _eval_upload_started(self, site: str, h: pb.UpdateHeader, specs: tuple[Spec, ...]) -> None:
        ev = self.evaluation
        if ev is None or ev.secure is None or not self.running or (ev.number, ev.split) != (h.round, h.split):
            raise FailedPrecondition(f"no secure {h.split} evaluation of round {h.round} is open")
        if h.attempt != ev.instance:
            raise FailedPrecondition(f"the open {h.split} evaluation of round {h.round} is instance {ev.instance}")
        if site not in ev.secure.inputs.cohort:
            raise PermissionDenied(f"site {site!r} is not taking part in this evaluation")
        if not ev.secure.uploads_open:
            raise FailedPrecondition("masked inputs are taken once the keys are shared; wait for the shares")
        if h.base_model_version != ev.version:
            raise FailedPrecondition("the masked input is for another model version than the one being evaluated")
        _check_masked(ev.secure.sa, h, specs)
        if site in ev.inputs:
            raise AlreadyExists(f"site {site!r} already sent its masked input for this evaluation")
        if site in ev.in_flight:
            raise FailedPrecondition(f"an upload from site {site!r} for this evaluation is already in progress")
        ev.in_flight.add(site)

    def _eval_upload_verified(self, site: str, h: pb.UpdateHeader, now: float) -> None:
        ev = self.evaluation
        if ev is not None:
            ev.in_flight.discard(site)
        refusal = self.upload_refusal(site, h.round, h.attempt, h.split)
        if refusal is not None:
            raise FailedPrecondition(refusal)
        assert ev is not None
        assert ev.secure is not None
        ev.inputs.add(site)
        self._secure_eval_outcome(ev, ev.secure.input_accepted(site, now, self._send), now)

    def _evaluation_received(self, event: EvaluationReceived) -> None:
        site, report = event.site, event.report
        if report.job_id != self.job_id:
            raise FailedPrecondition(f"report is for job {report.job_id!r}, the running job is {self.job_id!r}")
        ev = self.evaluation
        if ev is None or ev.number != report.round or ev.split != report.split or not self.running:
            raise FailedPrecondition("no evaluation of that round and split is open")
        if ev.secure is not None:
            raise FailedPrecondition("this evaluation is summed securely: send the masked input, not a report")
        if report.model_version != ev.version:
            raise FailedPrecondition("report is for another model version than the one being evaluated")
        if site in ev.reports:
            raise AlreadyExists(f"site {site!r} already reported this evaluation")
        if site not in ev.expected:
            raise PermissionDenied(f"site {site!r} was not asked for this evaluation")
        values = (report.loss, report.accuracy, report.eval_seconds)
        if not all(math.isfinite(v) for v in values) or not 0 <= report.accuracy <= 1:
            raise InvalidArgument("loss, accuracy and eval_seconds must be finite; accuracy within [0, 1]")
        if report.num_samples > MAX_SAMPLES:
            raise InvalidArgument(f"num_samples must be at most {MAX_SAMPLES}")
        scores = None
        if report.score_histogram:
            scores = ScoreHistogram.from_flat(report.score_histogram)
            if sum(scores.flat()) != report.num_samples:
                raise InvalidArgument("the score histogram must count every evaluated record exactly once")
        self._emit(
            RecordEvaluation(ev.number, ev.split, site, ev.version, report.num_samples, report.loss, report.accuracy)
        )
        self._emit(Failpoint("coordinator.evaluation_recorded", ev.number))
        ev.reports[site] = (report.num_samples, report.loss, report.accuracy)
        if scores is not None:
            ev.add_scores(site, scores)
        self._check_evaluation(event.now)

    def _check_evaluation(self, now: float, force: bool = False) -> None:
        ev = self.evaluation
        if ev is None or not (ev.done or force or now >= ev.deadline):
            return
        self.evaluation = None
        if ev.secure is not None and ev.secure.stage != "done":
            ev.secure.stop("the evaluation ended")
        if ev.split == STATS_SPLIT:
            self._standardized(ev, now)
            return
        n, loss, acc = ev.aggregate()
        metrics = ev.score_metrics()
        if ev.split == "val":
            if n:
                self._emit(SetRoundEvaluation(ev.number, ev.attempt, loss, acc, n, metrics))
            self._print_round((n, loss, acc), now - ev.started, metrics)
            self._next(now)
            return
        self._emit(
            UpdateJob(
                {"test_loss": loss if n else None, "test_accuracy": acc if n else None, "test_samples": n}
                | ({"test_metrics": json.dumps(metrics, sort_keys=True)} if metrics else {})
            )
        )
        if n:
            sites = f"{len(ev.reports)} sites" if ev.secure is None else f"{len(ev.inputs)} sites (secure sum)"
            line = f"federated test: {n} samples from {sites} | loss {loss:.4f} | accuracy {acc:.4f}"
            self._emit(Progress(line + _imbalance(metrics)))
        if self._stop_reason is not None:
            self._finish(JobState.STOPPED, self._stop_reason or "stopped by an admin")
        else:
            self._finish(JobState.FINISHED, f"completed {self.spec.rounds} rounds")

    @property
    def scaling(self) -> FeatureScaling | None:
        """The federation's feature scaling every train and evaluate task carries (None: the task's fallback)."""
        return self.standardization.scaling if self.standardization is not None else self.setup.scaling

    def _standardized(self, ev: Evaluation, now: float) -> None:
        """The statistics phase ended: keep the scaling (on the job row too) and go on to round 1, or try again."""
        phase = self.standardization
        assert phase is not None
        scaling, reason = phase.derive(ev.lane_totals) if ev.lane_totals is not None else (None, "")
        if scaling is not None:
            assert ev.lane_totals is not None
            records = records_of(ev.lane_totals)
            self._emit(UpdateJob({"feature_scaling": scaling_json(scaling)}))
            fields = {"job_id": self.job_id, "sites": len(ev.inputs), "records": records, "features": scaling.features}
            self._emit(Audit("features_standardized", fields))
            self._emit(
                Progress(
                    f"feature statistics: {records} training records from {len(ev.inputs)} sites (secure sum); "
                    f"{scaling.features} features standardized with the federation's mean, std and quantile bounds"
                )
            )
            self._emit(Failpoint("coordinator.standardized", 0))
            self._next(now)
            return
        reason = (
            reason
            or ev.failure
            or (
                "fewer than 2 eligible sites: nothing to sum securely"
                if ev.secure is None
                else "the statistics timed out"
            )
        )
        self._emit(Audit("statistics_failed", {"job_id": self.job_id, "reason": reason}))
        self._emit(Progress(f"feature statistics failed: {reason}"))
        if self._stop_reason is not None:
            self._finish(JobState.STOPPED, self._stop_reason or "stopped by an admin")
        elif phase.give_up(self.spec.max_round_retries):
            self._finish(JobState.FAILED, f"the feature-statistics phase failed {phase.failures} times: {reason}")
        else:
            self._wait(now)

    def _print_round(
        self, val: tuple[int, float, float] | None, extra_s: float = 0.0, metrics: dict[str, float] | None = None
    ) -> None:
        if self._round_line is None:
            return
        number, reported, size, train_loss, seconds = self._round_line
        parts = [f"round {number}/{self.spec.rounds}", f"sites {reported}/{size}"]
        parts.append(f"train loss {train_loss:.4f}" if train_loss is not None else "train loss -")
        if val is not None and val[0] > 0:
            parts += [f"val loss {val[1]:.4f}", f"val acc {val[2]:.4f}"]
            if metrics and "auc_pr" in metrics:
                parts.append(f"val AUC-PR {metrics['auc_pr']:.4f}")
        parts.append(f"{seconds + extra_s:.1f}s")
        self._emit(Progress(" | ".join(parts)))
        self._round_line = None

    # -- the clock ------------------------------------------------------------------------------------------------
    def _tick(self, now: float) -> None:
        rnd, ev = self.round, self.evaluation
        if self.phase is Phase.WAITING:
            self._check_waiting(now)
        elif self.phase in (Phase.TRAINING, Phase.UNMASKING) and rnd is not None:
            if rnd.secure is not None:
                self._secure_outcome(rnd, rnd.secure.advance(now, self._send), now)
            elif rnd.state.open and now >= rnd.upload_deadline and self.buffer is not None:
                ready = len(self.buffer.ready)
                self._fail_attempt(f"the buffer did not fill: {ready} of {self.buffer.size} sites ready", now)
            elif rnd.state.open and now >= rnd.upload_deadline:
                self._round_event(rnd, DeadlinePassed(), now)
        elif self.phase is Phase.EVALUATING and ev is not None:
            if ev.secure is not None and ev.secure.stage != "done":
                self._secure_eval_outcome(ev, ev.secure.advance(now, self._send), now)
            self._check_evaluation(now)

    # -- the end --------------------------------------------------------------------------------------------------
    def _stop(self, event: StopRequested) -> None:
        if not self.running:
            raise FailedPrecondition(f"job {self.job_id} is already {self.state.value}")
        self._stop_reason = event.reason
        self.detail = event.reason
        if self.phase in (Phase.STARTING, Phase.WAITING):
            self._finish(JobState.STOPPED, event.reason or "stopped by an admin")
        elif self.phase in (Phase.TRAINING, Phase.UNMASKING):
            self._fail_attempt(event.reason, event.now)
        elif self.phase is Phase.EVALUATING:
            self._check_evaluation(event.now, force=True)
        # AGGREGATING: the round commits, then the job stops (_next).

    def _suspend(self, event: Suspend) -> None:
        if not self.running:
            return
        self.state, self.phase, self.detail = JobState.INTERRUPTED, Phase.DONE, event.reason
        self._emit(UpdateJob({"state": JobState.INTERRUPTED.value, "detail": event.reason}))
        self._emit(Audit("job_interrupted", {"job_id": self.job_id, "reason": event.reason}))

    def _finish(self, state: JobState, detail: str) -> None:
        self.state, self.phase, self.detail = state, Phase.DONE, detail
        self.round, self.evaluation = None, None
        self._emit(UpdateJob({"state": state.value, "detail": detail}))
        self._emit(Audit(f"job_{state.value}", {"job_id": self.job_id, "detail": detail}))
        final = self.model_version if self.completed else ""
        finished = pb.JobFinished(job_id=self.job_id, reason=detail, final_model_version=final)
        self._emit(Broadcast(pb.WorkItem(job_finished=finished)))
        self._emit(Progress(f"job {self.job_id} {state.value}: {detail}"))
        self._emit(FinishJob(state, detail))

    def _emit(self, action: Action) -> None:
        self._out.append(action)


def _imbalance(metrics: dict[str, float]) -> str:
    """`` | AUC-PR 0.8123 | recall@1%FPR 0.7012`` for a task that reports scores, else ``""``."""
    if "auc_pr" not in metrics:
        return ""
    return f" | AUC-PR {metrics['auc_pr']:.4f} | recall@1%FPR {metrics.get(RECALL_KEY, 0.0):.4f}"


def _check_masked(sa: SecAggRound, h: pb.UpdateHeader, specs: tuple[Spec, ...]) -> None:
    """A masked input's header: one uint8 tensor of the instance's size; no counts, metrics or timing in the clear."""
    if specs != (sa.masked_spec,):
        raise InvalidArgument(
            f"this round uses secure aggregation: upload one tensor {sa.masked_spec.name!r} of "
            f"{sa.masked_spec.shape[0]} bytes (uint8)"
        )
    if h.num_samples or h.train_seconds or set(h.metrics) - SECURE_HEADER_METRICS:
        raise InvalidArgument(
            "under secure aggregation an upload header carries no sample count, metrics or timing (only the site's "
            "own dp_epsilon/dp_delta): they travel masked, as lanes"
        )
    if not all(math.isfinite(v) and v >= 0 for v in h.metrics.values()):
        raise InvalidArgument("dp_epsilon and dp_delta must be finite, non-negative numbers")
