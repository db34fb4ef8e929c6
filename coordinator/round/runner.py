"""One training job: rounds of select -> train -> aggregate -> evaluate, then a final test evaluation.

The runner owns the job's global model (serialized once per round and streamed to every participant from that one
buffer), the active round (a :class:`RoundState` plus its :class:`RunningSum`), and the federated evaluations.
Servicers call its ``receive_*`` methods; everything it learns goes to the store before it is acted on.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from cryptography import x509

from common import failpoints
from common.proto.cohort.v1 import cohort_pb2 as pb
from common.serde import EncodedTensors, Limits, Spec, state_dict_float32
from common.tasks.base import Task, round_seed
from coordinator.config import JobConfig
from coordinator.round.aggregation import RunningSum, apply_flat
from coordinator.round.intake import Intake
from coordinator.round.job_state import ActiveRound, Evaluation, JobIdentity
from coordinator.round.machine import (
    CloseRound,
    DeadlinePassed,
    Event,
    RoundState,
    SiteBack,
    SiteLost,
    Stop,
    UploadAccepted,
)
from coordinator.round.privacy import JobPrivacy
from coordinator.round.secagg import SecAggRound, key_stages, unmask_stages
from coordinator.state.model_store import ModelStore
from coordinator.state.registry import Registry
from coordinator.state.resume import ResumePoint, spool_dir
from coordinator.state.store import Store

log = logging.getLogger("cohort.coordinator.round.runner")

ProgressHook = Callable[[str], None]


class JobRunner(Intake):
    def __init__(
        self,
        job_id: str,
        spec: JobConfig,
        task: Task,
        *,
        store: Store,
        models: ModelStore,
        registry: Registry,
        spool_root: Path,
        limits: Limits,
        progress: ProgressHook | None = None,
        ca_certs: list[x509.Certificate] | None = None,
        population: int = 0,
        resume: ResumePoint | None = None,
        privacy_state: dict[str, object] | None = None,
    ) -> None:
        self.job_id = job_id
        self.spec = spec
        self.task = task
        self.identity = JobIdentity.of(task)
        self.store = store
        self.models = models
        self.registry = registry
        self.spool_root = spool_root
        self.limits = limits
        self.ca_certs = ca_certs or []
        self.privacy = JobPrivacy(
            spec.privacy,
            max(1, population),
            spec.fraction,
            secure_aggregation=spec.secure_aggregation,
            min_survivors=spec.min_sites,
        )
        self._budget_stop: str | None = None
        self.progress = progress or (lambda line: log.info("%s", line))
        self.state = "running"
        self.detail = ""
        self._stop = asyncio.Event()
        self._round: ActiveRound | None = None
        self._eval: Evaluation | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._resume = resume
        self.completed_rounds = 0 if resume is None else resume.number - 1  # rounds the global model reflects
        if resume is None:
            initial = state_dict_float32(task.build_model(seed=spec.params.seed))
            self.global_tensors = initial
            self.global_model = models.save(initial, {"job": job_id, "round": "0"})
            store.create_job(
                job_id, spec.name, asdict(spec) | {"identity": asdict(self.identity)}, self.global_model.version
            )
        else:
            self.global_tensors, self.global_model = resume.tensors, resume.model
            self.privacy.restore(privacy_state or {})
        self.global_specs: tuple[Spec, ...] = self.global_model.specs
        self.privacy.model_numel = sum(s.numel for s in self.global_specs)
        registry.subscribe(self._on_site)

    # -- control ------------------------------------------------------------------------------------------------
    def stop(self, reason: str) -> None:
        if self._stop.is_set():
            return
        self.detail = reason
        self._stop.set()
        if self._round is not None:
            self._spawn(self._apply(self._round, Stop(reason)))
        if self._eval is not None:
            self._eval.done.set()

    def suspend(self, reason: str) -> None:
        """Graceful shutdown: leave the job resumable (its open round, accepted uploads and spool stay on disk)."""
        if self.state != "running":
            return
        self.state, self.detail = "interrupted", reason
        self.registry.unsubscribe(self._on_site)
        self.store.update_job(self.job_id, state="interrupted", detail=reason)
        self.store.audit("job_interrupted", "coordinator", job_id=self.job_id, reason=reason)

    def _spawn(self, coro: object) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _wait(self, event: asyncio.Event, timeout: float) -> bool:
        """Wait for ``event`` until ``timeout``; returns early (False) when the job is stopped."""
        stop = asyncio.ensure_future(self._stop.wait())
        target = asyncio.ensure_future(event.wait())
        try:
            await asyncio.wait({stop, target}, timeout=max(0.0, timeout), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            target.cancel()
        return event.is_set()

    @property
    def current_round(self) -> ActiveRound | None:
        """The open round, if any (read-only view for status and tests)."""
        return self._round

    def eligible(self) -> list[str]:
        return sorted(s.site for s in self.registry.connected() if self.identity.mismatch(s.declaration) is None)

    # -- the job loop -------------------------------------------------------------------------------------------
    async def run(self) -> None:
        resume = self._resume
        if resume is None:
            self.store.audit("job_started", "coordinator", job_id=self.job_id, task=self.task.name)
            number, attempt = 1, 0
        else:
            self.store.update_job(self.job_id, state="running", detail=f"resumed at round {resume.number}")
            self.store.audit("job_resumed", "coordinator", job_id=self.job_id, round=resume.number, notes=resume.notes)
            self.progress(f"job {self.job_id} resumed at round {resume.number}: " + "; ".join(resume.notes))
            number, attempt = resume.number, resume.attempt
        try:
            if resume is not None:
                await self._wait_for_sites()  # let the federation reassemble after the restart (bounded)
            while number <= self.spec.rounds and not self._stop.is_set():
                reopen = resume if resume is not None and resume.reopen is not None else None
                resume = None
                ok = await self._run_round(number, attempt, reopen)
                if self._budget_stop is not None:
                    self._finish("budget_exhausted", self._budget_stop)
                    return
                if self._stop.is_set():
                    break
                if ok:
                    if self.spec.evaluate_every and number % self.spec.evaluate_every == 0:
                        await self._evaluate_round(number, attempt)
                    number, attempt = number + 1, 0
                else:
                    attempt += 1
                    if attempt > self.spec.max_round_retries:
                        self._finish("failed", f"round {number} failed {attempt} times; see the round records")
                        return
            if self._stop.is_set():
                self._finish("stopped", self.detail or "stopped by an admin")
                return
            if self.spec.final_evaluation:
                await self._final_evaluation()
            self._finish("finished", f"completed {self.spec.rounds} rounds")
        except Exception as exc:
            log.exception("job %s crashed", self.job_id)
            self._finish("failed", f"internal error: {type(exc).__name__}")

    def _finish(self, state: str, detail: str) -> None:
        self.state, self.detail = state, detail
        self.registry.unsubscribe(self._on_site)
        self.store.update_job(self.job_id, state=state, detail=detail)
        self.store.audit(f"job_{state}", "coordinator", job_id=self.job_id, detail=detail)
        done = pb.WorkItem(job_finished=pb.JobFinished(job_id=self.job_id, reason=detail))
        for session in self.registry.connected():
            self.registry.send(session.site, done)
        self.progress(f"job {self.job_id} {state}: {detail}")
        # The final model is on disk (models/<digest>.safetensors); a finished job holds no model in memory, so the
        # coordinator's memory does not grow with the number of jobs it has run.
        self.global_tensors = {}
        self.global_model = EncodedTensors(self.global_model.specs, b"", self.global_model.sha256)

    async def _wait_for_sites(self) -> list[str]:
        needed = max(self.spec.min_sites, self.spec.min_available_sites)
        deadline = time.monotonic() + self.spec.wait_for_sites_s
        while not self._stop.is_set():
            eligible = self.eligible()
            if len(eligible) >= needed:
                return eligible
            self.registry.changed.clear()
            if not await self._wait(self.registry.changed, deadline - time.monotonic()) and (
                time.monotonic() >= deadline
            ):
                return self.eligible()
        return []

    def _select(self, eligible: list[str], number: int, attempt: int) -> list[str]:
        k = max(self.spec.min_sites, math.ceil(self.spec.fraction * len(eligible)))
        # Over-selection: ask a few more sites than the round needs; it closes when k of them have reported.
        size = min(len(eligible), math.ceil(k * (1 + self.spec.over_selection)))
        # Reproducible selection, not a secret: which sites train is visible to them anyway.
        rng = random.Random(f"{self.job_id}/{number}/{attempt}")  # noqa: S311
        return sorted(rng.sample(eligible, size))

    def _target(self, cohort_size: int) -> int | None:
        """How many reports close an over-selected round early (None without over-selection)."""
        if self.spec.over_selection <= 0:
            return None
        k = math.ceil(cohort_size / (1 + self.spec.over_selection))
        return min(cohort_size, max(self.spec.min_sites, k))

    def _round_state(self, sites: frozenset[str], target: int | None) -> RoundState:
        min_sites = min(self.spec.min_sites, len(sites))
        return RoundState(sites, min_sites, None if target is None else max(min_sites, min(target, len(sites))))

    async def _run_round(self, number: int, attempt: int, reopen: ResumePoint | None = None) -> bool:
        started = time.monotonic()
        if reopen is not None and reopen.reopen is not None:
            cohort = list(reopen.reopen.cohort)  # the attempt that was open when the coordinator died
        else:
            eligible = await self._wait_for_sites()
            if self._stop.is_set():
                return False
            if len(eligible) < self.spec.min_sites:
                self.progress(
                    f"round {number}: only {len(eligible)} eligible sites connected, {self.spec.min_sites} needed; "
                    "retrying"
                )
                return False
            cohort = self._select(eligible, number, attempt)
        over = self.privacy.would_exceed(len(cohort))
        if over is not None:
            p = self.spec.privacy
            self._budget_stop = (
                f"privacy budget exhausted after {number - 1} rounds: round {number} would reach epsilon "
                f"{over:.3f} > {p.target_epsilon:g} (delta {p.delta:g})"
            )
            self.store.audit("budget_stop", "coordinator", job_id=self.job_id, round=number, epsilon=over)
            return False
        seed = round_seed(self.spec.params.seed, number)
        # The timeout model (docs/ARCHITECTURE.md): round_timeout_s bounds the whole round. With secure aggregation
        # the last part of it is kept for the two unmasking stages; sites must upload before the rest.
        deadline = time.time() + self.spec.round_timeout_s
        upload_deadline = deadline - self.spec.unmask_reserve_s
        task = pb.TrainTask(
            job_id=self.job_id,
            round=number,
            attempt=attempt,
            model_version=self.global_model.version,
            deadline_unix=upload_deadline,
            params=pb.TrainParams(
                local_epochs=self.spec.params.local_epochs,
                batch_size=self.spec.params.batch_size,
                learning_rate=self.spec.params.learning_rate,
                seed=seed,
            ),
        )
        secagg = None
        if self.spec.secure_aggregation.enabled:
            numel = sum(s.numel for s in self.global_specs)
            skellam = self.privacy.skellam(len(cohort)) if self.privacy.distributed else None
            secagg = SecAggRound.create(
                self.job_id, number, attempt, cohort, numel, self.spec.secure_aggregation, self.ca_certs, skellam
            )
            task.secagg.CopyFrom(secagg.setup())
        task.privacy.CopyFrom(
            pb.PrivacySetup(
                unit=self.spec.privacy.unit,
                clip_norm=self.privacy.clip_norm,
                noise_multiplier=self.spec.privacy.noise_multiplier,
                mode=("distributed" if self.privacy.distributed else "central") if self.privacy.site_level else "",
            )
        )
        if secagg is not None and secagg.skellam is not None:
            task.privacy.rotation_seed = secagg.rotation_seed
            task.privacy.skellam_json = json.dumps(secagg.skellam.to_dict(), sort_keys=True)
        rnd = ActiveRound(
            number=number,
            attempt=attempt,
            base=self.global_model,
            state=self._round_state(frozenset(cohort), self._target(len(cohort))),
            running=RunningSum(self.global_specs if secagg is None else ()),
            deadline=upload_deadline,
            spool_dir=spool_dir(self.spool_root, self.job_id, number, attempt),
            task=task,
            secagg=secagg,
            uploads_open=secagg is None,
        )
        if reopen is None:
            self.store.start_round(self.job_id, number, attempt, cohort, self.global_model.version)
        else:
            await self._take_back(rnd, reopen.uploads)
        self._round = rnd
        for site in cohort:
            if site in rnd.accepted:
                continue
            if not self.registry.send(site, pb.WorkItem(train=task)) and reopen is None:
                # After a restart the sites are still reconnecting: they get the task when they are back
                # (_on_site), and the round waits for them until its deadline instead of counting them lost.
                await self._apply(rnd, SiteLost(site))
        if secagg is not None:
            await self._secagg_key_stages(rnd, secagg)
        if not await self._wait(rnd.done, upload_deadline - time.time()):
            await self._apply(rnd, DeadlinePassed())
        await rnd.done.wait()
        outcome = rnd.outcome
        assert outcome is not None
        secagg_mean = None
        if outcome.succeeded and secagg is not None:
            result = await unmask_stages(secagg, self.registry.send, self._wait, deadline)
            if isinstance(result, str):
                outcome = CloseRound(False, result)
            else:
                secagg_mean = result[0]
        train_s = time.monotonic() - started
        settled = False  # the round's outcome is recorded (not cancelled by a shutdown half-way)
        try:
            if not outcome.succeeded:
                self.store.finish_round(
                    self.job_id,
                    number,
                    attempt,
                    state="failed",
                    reported=sorted(rnd.state.reported),
                    detail=outcome.reason,
                    timings={"train_s": train_s},
                )
                self.store.audit(
                    "round_failed",
                    "coordinator",
                    job_id=self.job_id,
                    round=number,
                    attempt=attempt,
                    reason=outcome.reason,
                )
                self.progress(f"round {number} attempt {attempt} failed: {outcome.reason}")
                settled = True
                return False
            t0 = time.monotonic()
            if secagg_mean is not None:
                new_tensors = apply_flat(self.global_tensors, self.global_specs, secagg_mean)
            else:
                await asyncio.to_thread(self._fold, rnd)
                if self.privacy.site_level:
                    # DP-FedAvg, central: Gaussian noise (std sigma * C) on the sum of clipped updates, divided by
                    # the cohort size (a fixed, public denominator, so one site changes the mean by at most C / m).
                    noise = self.privacy.central_noise(rnd.running.numel)
                    new_tensors = await asyncio.to_thread(
                        rnd.running.apply_noisy_sum, self.global_tensors, noise, float(rnd.state.target or len(cohort))
                    )
                else:
                    new_tensors = await asyncio.to_thread(rnd.running.apply_to, self.global_tensors)
            encoded = await asyncio.to_thread(self.models.save, new_tensors, {"job": self.job_id, "round": str(number)})
            failpoints.hit("coordinator.checkpoint_saved", round=number)
            aggregate_s = time.monotonic() - t0
            train_loss = rnd.loss_sum / rnd.weight_sum if rnd.weight_sum else None
            epsilon = self.privacy.record_round(len(cohort))
            if self.privacy.adaptive is not None and rnd.clip_bits:
                old_c = self.privacy.clip_norm
                new_c = self.privacy.adapt_clip(rnd.clip_bits)
                self.store.audit("clip_adapted", "coordinator", job_id=self.job_id, round=number, old=old_c, new=new_c)
            # The commit point: the round row, the job's model and its privacy state in one transaction.
            self.store.finish_round(
                self.job_id,
                number,
                attempt,
                state="completed",
                reported=sorted(rnd.state.reported),
                model_version=encoded.version,
                train_loss=train_loss,
                train_samples=rnd.weight_sum,
                timings={"train_s": train_s, "aggregate_s": aggregate_s},
                detail=outcome.reason,
                epsilon=epsilon,
                privacy_state=self.privacy.state(),
            )
            self.global_tensors, self.global_model = new_tensors, encoded
            self.completed_rounds = number
            failpoints.hit("coordinator.round_committed", round=number)
            if self.privacy.site_epsilon:
                self.store.update_job(self.job_id, site_epsilon=json.dumps(self.privacy.site_epsilon, sort_keys=True))
            self.store.audit(
                "round_completed",
                "coordinator",
                job_id=self.job_id,
                round=number,
                sites=sorted(rnd.state.reported),
                model_version=encoded.version,
            )
            self._round_line = (
                number,
                len(rnd.state.reported),
                len(cohort),
                train_loss,
                time.monotonic() - started,
            )
            if not (self.spec.evaluate_every and number % self.spec.evaluate_every == 0):
                self._print_round(None)
            settled = True
            return True
        finally:
            self._round = None
            if settled:  # recorded, not cut short by a shutdown: its spooled uploads are no longer needed
                shutil.rmtree(rnd.spool_dir, ignore_errors=True)

    async def _take_back(self, rnd: ActiveRound, uploads: list[dict[str, object]]) -> None:
        """Reopen a round after a restart: its accepted uploads (verified by resume.plan_resume) count again."""
        async with rnd.lock:
            for up in uploads:
                site = str(up["site"])
                metrics = up["metrics"]
                assert isinstance(metrics, dict)
                num_samples = int(str(up["num_samples"]))
                self._accepted(rnd, site, str(up["sha256"]), num_samples, metrics)
                self._apply_locked(rnd, UploadAccepted(site))

    def _fold(self, rnd: ActiveRound) -> None:
        """Fold the round's accepted plaintext updates into its running sum, in site order.

        A fixed order makes the float32 sum, and so the new model, a function of the accepted updates alone: the same
        whatever order they arrived in, and the same after a restart took them back from the spool.
        """
        for site in sorted(rnd.accepted):
            rnd.running.add_file(rnd.spool_dir / f"{site}.update", rnd.weights[site])

    async def _secagg_key_stages(self, rnd: ActiveRound, secagg: SecAggRound) -> None:
        """Stages 0 and 1 of secure aggregation; then only the sites that shared their keys (U2) may upload."""
        reason = await key_stages(secagg, self.registry.send, self._wait, rnd.done, rnd.deadline)
        if reason is None and not rnd.done.is_set():
            u2 = secagg.u2
            if len(u2) < self.spec.min_sites:
                reason = f"only {len(u2)} sites shared their keys; the round needs {self.spec.min_sites}"
            else:
                async with rnd.lock:
                    old, rnd.state = rnd.state, self._round_state(frozenset(u2), rnd.state.target)
                    for site in old.lost & u2:
                        rnd.state.handle(SiteLost(site))
                    rnd.uploads_open = True
        if reason is not None:
            self.store.audit("secagg_aborted", "coordinator", job_id=self.job_id, round=rnd.number, reason=reason)
            await self._apply(rnd, Stop(reason))

    def _print_round(self, val: tuple[int, float, float] | None, extra_s: float = 0.0) -> None:
        number, reported, size, train_loss, seconds = self._round_line
        parts = [f"round {number}/{self.spec.rounds}", f"sites {reported}/{size}"]
        parts.append(f"train loss {train_loss:.4f}" if train_loss is not None else "train loss -")
        if val is not None and val[0] > 0:
            parts += [f"val loss {val[1]:.4f}", f"val acc {val[2]:.4f}"]
        parts.append(f"{seconds + extra_s:.1f}s")
        self.progress(" | ".join(parts))

    # -- evaluation -------------------------------------------------------------------------------------------
    async def _collect(self, number: int, split: str, sites: list[str]) -> Evaluation:
        ev = Evaluation(number, split, self.global_model.version, set(sites), enough=self._target(len(sites)))
        self._eval = ev
        failpoints.hit("coordinator.evaluating", round=number)
        item = pb.WorkItem(
            evaluate=pb.EvaluateTask(
                job_id=self.job_id,
                round=number,
                model_version=ev.version,
                split=split,
                deadline_unix=time.time() + self.spec.round_timeout_s,
            )
        )
        for site in sites:
            if not self.registry.send(site, item):
                ev.expected.discard(site)
        ev.check_done()
        await self._wait(ev.done, self.spec.round_timeout_s)
        self._eval = None
        return ev

    async def _evaluate_round(self, number: int, attempt: int) -> None:
        t0 = time.monotonic()
        ev = await self._collect(number, "val", self.eligible())
        n, loss, acc = ev.aggregate()
        if n:
            self.store.set_round_eval(self.job_id, number, attempt, loss, acc, n)
        self._print_round((n, loss, acc), time.monotonic() - t0)

    async def _final_evaluation(self) -> None:
        ev = await self._collect(self.spec.rounds, "test", self.eligible())
        n, loss, acc = ev.aggregate()
        self.store.update_job(
            self.job_id, test_loss=loss if n else None, test_accuracy=acc if n else None, test_samples=n
        )
        if n:
            self.progress(
                f"federated test: {n} samples from {len(ev.reports)} sites | loss {loss:.4f} | accuracy {acc:.4f}"
            )

    # -- events from the registry -------------------------------------------------------------------------------
    def _on_site(self, site: str, connected: bool) -> None:
        rnd = self._round
        if rnd is not None and site in rnd.state.cohort and rnd.state.open:
            if connected and rnd.secagg is None:
                # A restarted site picks the task up again. Not under secure aggregation: a restarted site lost
                # this round's keys, so it stays a dropout until the next round.
                self._spawn(self._apply(rnd, SiteBack(site)))
                if site not in rnd.state.reported:
                    self.registry.send(site, pb.WorkItem(train=rnd.task))
            elif not connected:
                self._spawn(self._apply(rnd, SiteLost(site)))
        if rnd is not None and rnd.secagg is not None and not connected:
            rnd.secagg.site_lost(site)
        ev = self._eval
        if ev is not None and not connected and site in ev.expected and site not in ev.reports:
            ev.expected.discard(site)
            ev.check_done()

    async def _apply(self, rnd: ActiveRound, event: Event) -> None:
        async with rnd.lock:
            self._apply_locked(rnd, event)

    def _apply_locked(self, rnd: ActiveRound, event: Event) -> None:
        for action in rnd.state.handle(event):
            rnd.outcome = action
            rnd.done.set()
