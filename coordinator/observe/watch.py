"""What the coordinator reports about itself while it runs: metrics, operator log lines, the run report at job end.

:class:`Observability` is attached once per daemon (``attach``). It listens to the session registry (joins and
leaves) and gives every job runner a :class:`JobWatch`, which the runner calls after it carried out the actions of
one event (:meth:`JobWatch.applied`) and when it timed a step only it sees (:meth:`JobWatch.timed`: unmasking, the
commit). Round phases are derived here from the events and actions, with the coordinator's clock; the round machine
(coordinator/round/machine.py) knows nothing of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.logs import quiet_accountant
from coordinator.observe.metrics import CoordinatorMetrics
from coordinator.round.events import (
    Action,
    Aggregate,
    Aggregated,
    Audit,
    CommitRound,
    Event,
    FailRound,
    FinishJob,
    RecordRoundStart,
    UploadStarted,
    UploadVerified,
)

if TYPE_CHECKING:
    from coordinator.federation import Federation
    from coordinator.round.runner import JobRunner

log = logging.getLogger("cohort.coordinator.ops")

REPORT_TIMEOUT_S = 60.0
RECENT_ROUNDS = 500


@dataclass
class RoundClock:
    """When one round attempt passed each point (coordinator clock, seconds since the epoch) and its phase times."""

    number: int
    attempt: int
    started: float
    cohort: int
    secure: bool
    first_upload: float | None = None
    inputs_in: float | None = None
    phases: dict[str, float] = field(default_factory=dict)
    outcome: str = "open"
    seconds: float = 0.0


class Observability:
    def __init__(self, state: Federation, report_dir: Path | None) -> None:
        self.state = state
        self.metrics = CoordinatorMetrics()
        self.metrics.sites_allowed.set(len(state.allowed))
        self.report_dir = report_dir
        self.rounds: deque[RoundClock] = deque(maxlen=RECENT_ROUNDS)  # the dashboard's round-time breakdown
        self._reports: set[asyncio.Task[None]] = set()
        state.registry.subscribe(self._on_site)
        state.jobs.observer = self
        quiet_accountant()

    @classmethod
    def attach(cls, state: Federation) -> Observability:
        return cls(state, state.config.state_dir / "reports")

    def watch(self, runner: JobRunner) -> JobWatch:
        return JobWatch(self, runner)

    # -- sessions -----------------------------------------------------------------------------------------------
    def _on_site(self, site: str, connected: bool) -> None:
        m = self.metrics
        m.sites_connected.set(len(self.state.registry.connected()))
        if connected:
            m.site_joins.inc()
            log.info("site %s joined", site, extra={"site": site})
        else:
            m.site_leaves.inc()
            log.info("site %s left", site, extra={"site": site})

    # -- from the servicers and handlers ------------------------------------------------------------------------
    def refused(self, method: str, code: str) -> None:
        self.metrics.rpcs_refused.labels(method, code).inc()
        if method == "UploadUpdate":
            self.metrics.uploads_refused.labels(code).inc()

    def handshake_refused(self, reason: str) -> None:
        self.metrics.handshakes_refused.labels(reason).inc()

    def model_sent(self, nbytes: int, channel: str = "grpc") -> None:
        self.metrics.bytes_sent.inc(nbytes)
        self.metrics.transfers.labels(channel, "download").inc()

    def update_received(self, channel: str) -> None:
        """An upload answered as accepted (or a duplicate acknowledged) over ``channel``."""
        self.metrics.transfers.labels(channel, "upload").inc()

    # -- the run report -----------------------------------------------------------------------------------------
    def job_ended(self, job_id: str) -> None:
        if self.report_dir is None:
            return
        from coordinator.observe.report import ReportData

        try:
            data = ReportData.from_store(self.state.store, job_id)
        except Exception:
            log.exception("job %s: could not read the records for its report", job_id, extra={"job": job_id})
            return
        target = self.report_dir / job_id
        task = asyncio.get_running_loop().create_task(self._write_report(data, target), name=f"report-{job_id}")
        self._reports.add(task)
        task.add_done_callback(self._reports.discard)

    async def _write_report(self, data: Any, target: Path) -> None:
        from coordinator.observe.report import write_report

        try:
            paths = await asyncio.to_thread(write_report, data, target)
            log.info("job %s: run report %s", data.job_id, paths.html, extra={"job": data.job_id})
        except Exception:
            log.exception("job %s: writing the run report failed", data.job_id, extra={"job": data.job_id})

    async def close(self) -> None:
        """Let run reports being written finish (bounded), stop listening."""
        self.state.registry.unsubscribe(self._on_site)
        if self._reports:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*self._reports, return_exceptions=True), REPORT_TIMEOUT_S)


class JobWatch:
    """One job's metrics and log lines, fed by its runner."""

    def __init__(self, obs: Observability, runner: JobRunner) -> None:
        self.obs = obs
        self.runner = runner
        self.job_id = runner.job_id
        self._open: dict[tuple[int, int], RoundClock] = {}
        spec = runner.spec
        m = obs.metrics
        m.job_rounds.set(spec.rounds)
        m.job_round.set(runner.completed_rounds)
        m.epsilon_budget.set(spec.privacy.target_epsilon if spec.privacy.unit != "none" else 0.0)
        m.epsilon.set(0.0)
        m.sites_suspended.set(len(runner.machine.suspended))

    def _extra(self, number: int | None = None, site: str | None = None) -> dict[str, Any]:
        extra: dict[str, Any] = {"job": self.job_id}
        if number is not None:
            extra["round"] = number
        if site is not None:
            extra["site"] = site
        return extra

    def timed(self, phase: str, number: int, attempt: int, seconds: float) -> None:
        try:
            self._timed(phase, number, attempt, seconds)
        except Exception:  # metrics never stop a job
            log.exception("job %s: recording the %s time failed", self.job_id, phase, extra=self._extra(number))

    def applied(self, event: Event, actions: Sequence[Action], seconds: float) -> None:
        """The runner carried out ``actions`` (for ``event``) in ``seconds``."""
        try:
            self._applied(event, actions, seconds)
        except Exception:  # metrics never stop a job
            log.exception("job %s: metrics for %s failed", self.job_id, type(event).__name__, extra=self._extra())

    def _timed(self, phase: str, number: int, attempt: int, seconds: float) -> None:
        self.obs.metrics.phase_seconds.labels(phase).observe(seconds)
        clock = self._open.get((number, attempt)) or next(
            (c for c in reversed(self.obs.rounds) if (c.number, c.attempt) == (number, attempt)), None
        )
        if clock is not None:
            clock.phases[phase] = clock.phases.get(phase, 0.0) + seconds

    def _applied(self, event: Event, actions: Sequence[Action], seconds: float) -> None:
        now = time.time()
        m = self.obs.metrics
        if isinstance(event, UploadStarted) and not event.header.split:
            clock = self._open.get((event.header.round, event.header.attempt))
            if clock is not None and clock.first_upload is None:
                clock.first_upload = now
                self._phase(clock, "training_wait", now - clock.started)
        elif isinstance(event, UploadVerified):
            self._verified(event)
        elif isinstance(event, Aggregated):
            clock = self._open.get((event.number, event.attempt))
            unmask = clock.phases.get("unmask", 0.0) if clock is not None else 0.0
            aggregate = max(0.0, event.seconds - unmask)
            m.phase_seconds.labels("aggregate").observe(aggregate)
            if clock is not None:
                clock.phases["aggregate"] = aggregate
        for action in actions:
            if isinstance(action, RecordRoundStart):
                self._round_started(action, seconds, now)
            elif isinstance(action, Aggregate):
                clock = self._open.get((action.number, action.attempt))
                if clock is not None:
                    clock.inputs_in = now
                    self._phase(clock, "upload", now - (clock.first_upload or now))
            elif isinstance(action, CommitRound):
                self._round_ended(action.number, action.attempt, "completed", len(action.reported), now)
                m.job_round.set(action.number)
                privacy = self.runner.spec.privacy
                if privacy.unit == "site":
                    m.epsilon.set(action.epsilon)
                elif action.site_epsilon:
                    m.epsilon.set(max(action.site_epsilon.values()))
            elif isinstance(action, FailRound):
                self._round_ended(action.number, action.attempt, "failed", len(action.reported), now)
            elif isinstance(action, Audit):
                m.audit_events.labels(action.kind).inc()
                if action.kind == "secagg_site_abort":
                    m.secagg_site_aborts.inc()
                elif action.kind == "secagg_aborted":
                    m.secagg_rounds_aborted.inc()
            elif isinstance(action, FinishJob):
                log.info("job %s ended: %s %s", self.job_id, action.state.value, action.detail, extra=self._extra())
                self.obs.job_ended(self.job_id)
        m.sites_suspended.set(len(self.runner.machine.suspended))

    def _phase(self, clock: RoundClock, phase: str, seconds: float) -> None:
        clock.phases[phase] = seconds
        self.obs.metrics.phase_seconds.labels(phase).observe(seconds)

    def _round_started(self, action: RecordRoundStart, seconds: float, now: float) -> None:
        m = self.obs.metrics
        secure = self.runner.spec.secure_aggregation.enabled
        clock = RoundClock(action.number, action.attempt, now - seconds, len(action.cohort), secure)
        self._open[(action.number, action.attempt)] = clock
        self._phase(clock, "dispatch", seconds)
        m.rounds_started.inc()
        m.sites_selected.set(len(action.cohort))
        log.info(
            "round %d attempt %d started with %d sites; secure aggregation %s",
            action.number,
            action.attempt,
            len(action.cohort),
            "on (the coordinator sees sums only)" if secure else "off",
            extra=self._extra(action.number),
        )

    def _round_ended(self, number: int, attempt: int, outcome: str, reported: int, now: float) -> None:
        m = self.obs.metrics
        (m.rounds_completed if outcome == "completed" else m.rounds_failed).inc()
        m.sites_reported.set(reported)
        clock = self._open.pop((number, attempt), None)
        if clock is None:  # reopened after a restart: its start was not seen by this process
            return
        clock.outcome, clock.seconds = outcome, now - clock.started
        m.round_seconds.labels(outcome).observe(clock.seconds)
        m.sites_dropped.inc(max(0, clock.cohort - reported))
        self.obs.rounds.append(clock)

    def _verified(self, event: UploadVerified) -> None:
        m = self.obs.metrics
        header = event.header
        m.uploads_accepted.labels("evaluation" if header.split else "train").inc()
        m.bytes_received.inc(header.manifest.total_bytes)
        if "dp_epsilon" in header.metrics:
            eps, delta = header.metrics["dp_epsilon"], header.metrics.get("dp_delta", 0.0)
            m.site_record_epsilon.labels(event.site).set(eps)
            log.info(
                "site %s: record-level epsilon %.3f at delta %g after round %d",
                event.site,
                eps,
                delta,
                header.round,
                extra=self._extra(header.round, event.site),
            )
