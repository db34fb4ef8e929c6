"""Runs one job: feeds its :class:`~coordinator.round.machine.JobMachine` events and carries out its actions.

This is the only part of a job that does I/O: the store, the registry's work queues, the spool, the model files, the
clock and the worker threads. It decides nothing. Events are applied one at a time under one lock, so an action's
effects (a record written, a masked input folded) and the machine's state never disagree.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from common import failpoints, files
from common.errors import CohortError, FailedPrecondition, InvalidArgument, NotFound
from common.proto.cohort.v1 import cohort_pb2 as pb
from common.secagg.errors import SecAggAborted
from common.serde import EncodedTensors, Limits, Spec
from coordinator.round.aggregation import (
    Float32Values,
    MaskedPadding,
    RunningSum,
    SpoolWriter,
    UpdateSpool,
    flat_blocks,
    next_model,
)
from coordinator.round.events import (
    AckDuplicate,
    Action,
    Aggregate,
    Aggregated,
    AggregationFailed,
    Audit,
    Broadcast,
    CommitRound,
    Crashed,
    Event,
    Failpoint,
    FailRound,
    FinishJob,
    JobState,
    Progress,
    RecordEvaluation,
    RecordRoundStart,
    RecordUpload,
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
from coordinator.round.machine import JobMachine
from coordinator.round.model_meta import round_metadata
from coordinator.round.privacy import JobPrivacy
from coordinator.round.records import RoundAttempt
from coordinator.state.model_store import ModelStore, views_of
from coordinator.state.registry import Registry
from coordinator.state.resume import spool_dir
from coordinator.state.store import Store
from coordinator.strategy import robust
from coordinator.strategy.config import StrategyConfig
from coordinator.strategy.server_opt import OptimizerState, server_step

log = logging.getLogger("cohort.coordinator.job")

ProgressHook = Callable[[str], None]


class RunnerWatch(Protocol):
    """Metrics and log lines about one job (coordinator/observe/watch.py): told what the runner did, never asked."""

    def applied(self, event: Event, actions: Sequence[Action], seconds: float) -> None: ...
    def timed(self, phase: str, number: int, attempt: int, seconds: float) -> None: ...


class Observer(Protocol):
    def watch(self, runner: JobRunner) -> RunnerWatch: ...


class JobRunner:
    def __init__(
        self,
        machine: JobMachine,
        *,
        model: EncodedTensors,
        store: Store,
        models: ModelStore,
        registry: Registry,
        spool_root: Path,
        limits: Limits,
        progress: ProgressHook | None = None,
        strategy_files: ModelStore | None = None,
        optimizer: OptimizerState | None = None,
        clock: Callable[[], float] = time.time,
        observer: Observer | None = None,
    ) -> None:
        self.machine = machine
        # The time every event carries: the wall clock, or a simulation's virtual clock (simulation/).
        self.clock = clock
        self.job_id = machine.job_id
        self.spec = machine.spec
        # The global model is held once: its encoding's buffer (served to the sites), and its tensors as views into it.
        self.global_model = model
        self.global_tensors = views_of(model)
        self.store, self.models, self.registry = store, models, registry
        self.spool_root, self.limits = spool_root, limits
        self.progress = progress or (lambda line: log.info("%s", line))
        self.after_commit: Callable[[], object] | None = None  # set by Jobs: the retention of model files
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._applied = asyncio.Event()  # set (and replaced) after every event: waiters look at the machine again
        self._tasks: set[asyncio.Task[None]] = set()
        self._pending: tuple[int, int, EncodedTensors, OptimizerState] | None = None
        # The server optimizer's moments as of the last committed round; saved with every commit (strategy_files).
        self.optimizer = optimizer or OptimizerState()
        self.strategy_files = strategy_files
        self.watch = observer.watch(self) if observer is not None else None

    # -- views for status, servicers and tests --------------------------------------------------------------------
    @property
    def state(self) -> JobState:
        return self.machine.state

    @property
    def detail(self) -> str:
        return self.machine.detail

    @property
    def privacy(self) -> JobPrivacy:
        return self.machine.privacy

    @property
    def current_round(self) -> RoundAttempt | None:
        """The open round attempt, if any."""
        return self.machine.round

    @property
    def completed_rounds(self) -> int:
        return self.machine.completed

    @property
    def global_specs(self) -> tuple[Spec, ...]:
        return self.global_model.specs

    def model_for(self, version: str) -> EncodedTensors:
        """The current global model, if that is what ``version`` names."""
        if version != self.global_model.version and self.machine.recent_version(version):
            return self.models.load_encoded(version)[1]  # asynchronous rounds: a site still on a recent model
        if version != self.global_model.version:
            raise NotFound(
                f"model {version[:19]}... is not the current global model "
                f"({self.global_model.version[:19]}...); wait for the next task"
            )
        return self.global_model

    # -- the loop -------------------------------------------------------------------------------------------------
    async def run(self) -> None:
        self.registry.subscribe(self._on_site)
        try:
            async with self._lock:
                for session in self.registry.connected():
                    self._apply(SiteConnected(session.site, session.declaration, self.clock()))
                self._apply(Start(self.clock()))
            while self.machine.running:
                self._wake.clear()  # before reading the deadline: an event after this wakes the wait below
                wake = self.machine.wake_at()
                timeout = None if wake is None else max(0.0, wake - self.clock())
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout)
                except TimeoutError:
                    if self.machine.running:
                        await self.feed(Tick(self.clock()))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("job %s crashed", self.job_id)
            async with self._lock:
                self._apply(Crashed(type(exc).__name__))
        finally:
            self.registry.unsubscribe(self._on_site)

    async def feed(self, event: Event) -> list[Action]:
        """Apply one event and carry out its actions; returns them (a refusal raises, and changes nothing)."""
        async with self._lock:
            return self._apply(event)

    def _apply(self, event: Event) -> list[Action]:
        actions = self.machine.handle(event)
        started = time.perf_counter()
        for action in actions:
            self._execute(action)
        if self.watch is not None:
            self.watch.applied(event, actions, time.perf_counter() - started)
        if not isinstance(event, Tick):
            self._wake.set()  # the next deadline may have moved: the loop reads it again
        applied, self._applied = self._applied, asyncio.Event()
        applied.set()
        return actions

    async def _next_buffer(self) -> bool:
        """Asynchronous plain rounds: while a full buffer becomes the next model, wait (at most the round timeout) for
        the next buffer to open; an update that arrives then counts there, one version staler, instead of being
        refused and its site's training lost. False if it is still not open."""
        deadline = time.monotonic() + self.spec.round_timeout_s
        while self.machine.between_buffers():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._applied.wait(), remaining)
        return True

    def _check_clip(self, values: Float32Values | MaskedPadding) -> None:
        """Central DP: a plaintext update must be clipped to the open round's norm (it changes when the clip adapts)."""
        rnd = self.machine.round
        if isinstance(values, Float32Values) and self.machine.privacy.site_level and rnd is not None:
            bound = rnd.task.privacy.clip_norm
            if values.l2_norm > bound * (1 + 1e-4):
                raise InvalidArgument(f"update L2 norm {values.l2_norm:.6g} exceeds the job's clip norm {bound:g}")

    async def stop(self, reason: str) -> None:
        """Stop the job (an admin asked); the machine decides what that means in the current phase. Raises when the
        job is not running."""
        await self.feed(StopRequested(reason, self.clock()))

    async def suspend(self, reason: str) -> None:
        """Graceful shutdown: the job is interrupted, its open round and accepted uploads stay for the next start."""
        await self.feed(Suspend(reason))

    def _spawn(self, coro: object) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_site(self, site: str, connected: bool) -> None:
        if connected:
            session = next((s for s in self.registry.connected() if s.site == site), None)
            if session is not None:
                self._spawn(self._feed_quietly(SiteConnected(site, session.declaration, self.clock())))
        else:
            self._spawn(self._feed_quietly(SiteDisconnected(site, self.clock())))

    async def _feed_quietly(self, event: Event) -> None:
        try:
            await self.feed(event)
        except CohortError as exc:  # a registry event the machine no longer needs
            log.debug("job %s: %s ignored: %s", self.job_id, type(event).__name__, exc)

    # -- actions --------------------------------------------------------------------------------------------------
    def _execute(self, action: Action) -> None:
        store = self.store
        if isinstance(action, Send):
            self.registry.send(action.site, action.item)
        elif isinstance(action, Broadcast):
            for session in self.registry.connected():
                self.registry.send(session.site, action.item)
        elif isinstance(action, RecordRoundStart):
            store.start_round(self.job_id, action.number, action.attempt, list(action.cohort), action.base_version)
        elif isinstance(action, RecordUpload):
            store.record_upload(
                self.job_id,
                action.number,
                action.attempt,
                action.site,
                sha256=action.sha256,
                num_samples=action.num_samples,
                metrics=action.metrics,
                train_seconds=action.train_seconds,
            )
        elif isinstance(action, Aggregate):
            rnd = self.machine.round
            assert rnd is not None
            self._spawn(self._aggregate(action, rnd))
        elif isinstance(action, CommitRound):
            self._commit(action)
        elif isinstance(action, FailRound):
            store.finish_round(
                self.job_id,
                action.number,
                action.attempt,
                state="failed",
                reported=list(action.reported),
                detail=action.reason,
                timings=action.timings,
            )
            self._forget_spool(action.number, action.attempt)
        elif isinstance(action, RecordEvaluation):
            store.record_evaluation(
                self.job_id,
                action.number,
                action.split,
                action.site,
                action.model_version,
                action.num_samples,
                action.loss,
                action.accuracy,
            )
        elif isinstance(action, SetRoundEvaluation):
            store.set_round_eval(
                self.job_id,
                action.number,
                action.attempt,
                action.loss,
                action.accuracy,
                action.num_samples,
                action.metrics,
            )
        elif isinstance(action, UpdateJob):
            store.update_job(self.job_id, **action.fields)
        elif isinstance(action, Audit):
            store.audit(action.kind, action.actor, **action.fields)
        elif isinstance(action, Progress):
            self.progress(action.line)
        elif isinstance(action, Failpoint):
            failpoints.hit(action.name, round=action.number)
        elif isinstance(action, FinishJob):
            # The final model is on disk (models/<digest>.safetensors); a finished job holds no model in memory, so
            # the coordinator's memory does not grow with the number of jobs it has run.
            self.global_tensors = {}
            self.global_model = EncodedTensors(self.global_model.specs, b"", self.global_model.sha256)
        elif isinstance(action, AckDuplicate):
            pass  # the upload handler answers it

    def _commit(self, action: CommitRound) -> None:
        pending = self._pending
        assert pending is not None
        assert pending[:2] == (action.number, action.attempt)
        _, _, encoded, optimizer = pending
        started = time.perf_counter()
        # The commit point: the round row, the job's model and its privacy state in one transaction.
        self.store.finish_round(
            self.job_id,
            action.number,
            action.attempt,
            state="completed",
            reported=list(action.reported),
            model_version=action.model_version,
            train_loss=action.train_loss,
            train_samples=action.train_samples,
            timings=action.timings,
            detail=action.detail,
            epsilon=action.epsilon,
            privacy_state=action.privacy_state,
            strategy_state=action.strategy_state,
        )
        self.global_tensors, self.global_model, self._pending = views_of(encoded), encoded, None
        self.optimizer = optimizer
        if action.site_epsilon:
            self.store.update_job(self.job_id, site_epsilon=json.dumps(action.site_epsilon, sort_keys=True))
        self._forget_spool(action.number, action.attempt)
        if self.after_commit is not None:
            self.after_commit()
        self._timed("commit", action.number, action.attempt, time.perf_counter() - started)

    def _timed(self, phase: str, number: int, attempt: int, seconds: float) -> None:
        if self.watch is not None:
            self.watch.timed(phase, number, attempt, seconds)

    def spool_of(self, number: int, attempt: int) -> Path:
        """Where an attempt's uploads are spooled."""
        return spool_dir(self.spool_root, self.job_id, number, attempt)

    def _forget_spool(self, number: int, attempt: int) -> None:
        """A recorded attempt's spooled uploads are no longer needed (a resume starts from its record)."""
        shutil.rmtree(spool_dir(self.spool_root, self.job_id, number, attempt), ignore_errors=True)

    async def _aggregate(self, action: Aggregate, rnd: RoundAttempt) -> None:
        started = time.monotonic()
        try:
            totals: dict[str, float] | None = None
            evidence: tuple[str, ...] = ()
            report: dict[str, object] = {}
            delta: np.ndarray | RunningSum
            if action.secure:
                secagg = rnd.secagg
                assert secagg is not None
                try:
                    unmasked = await asyncio.to_thread(secagg.finish)
                finally:
                    evidence = tuple(sorted({r.holder for r in secagg.server.rejected}))
                    self._timed("unmask", action.number, action.attempt, time.monotonic() - started)
                assert unmasked.mean is not None
                delta, totals = unmasked.mean, unmasked.totals
            else:
                delta, report = await asyncio.to_thread(self._fold, action)
            new, optimizer, ref = await asyncio.to_thread(self._step, delta, action.number)
            del delta  # the round's sum or mean: freed before the checkpoint is written
            meta = round_metadata(self.machine, action.number, rnd, totals)  # task, round, metrics, epsilon ...
            encoded = await asyncio.to_thread(self.models.save_encoded, new, meta)
            failpoints.hit("coordinator.checkpoint_saved", round=action.number)
        except (SecAggAborted, InvalidArgument) as exc:
            await self.feed(
                AggregationFailed(action.number, action.attempt, f"secure aggregation: {exc}", self.clock())
            )
            return
        except Exception as exc:
            log.exception("job %s: aggregating round %d failed", self.job_id, action.number)
            await self.feed(Crashed(type(exc).__name__))
            return
        self._pending = (action.number, action.attempt, encoded, optimizer)
        seconds = time.monotonic() - started
        await self.feed(
            Aggregated(
                action.number, action.attempt, encoded.version, seconds, self.clock(), totals, evidence, ref, report
            )
        )

    def _fold(self, action: Aggregate) -> tuple[np.ndarray | RunningSum, dict[str, object]]:
        """The round's aggregated plaintext update, and what a robust rule reports (see :func:`fold_spooled`)."""
        directory = spool_dir(self.spool_root, self.job_id, action.number, action.attempt)
        return fold_spooled(self.spec.strategy, self.global_specs, directory, action, self.machine.privacy)

    def _step(
        self, delta: np.ndarray | RunningSum, number: int
    ) -> tuple[EncodedTensors, OptimizerState, dict[str, object]]:
        """Apply the server optimizer to the round's update; save its new moments (named in the round's commit)."""
        return step_model(
            self.spec.strategy,
            delta,
            self.optimizer,
            self.global_tensors,
            self.global_specs,
            self.strategy_files,
            {"job": self.job_id, "round": str(number)},
        )

    # -- uploads --------------------------------------------------------------------------------------------------
    async def receive_upload(
        self, site: str, header: pb.UpdateHeader, specs: tuple[Spec, ...], chunks: AsyncIterator[pb.UpdateChunk]
    ) -> pb.UploadReply:
        """Admit, spool (size, values and digest checked in one pass), fold if masked, then count the upload."""
        if not header.split:
            await self._next_buffer()
        actions = await self.feed(UploadStarted(site, header, specs, self.clock()))
        for action in actions:
            if isinstance(action, AckDuplicate):
                return pb.UploadReply(accepted=True, duplicate=True, update_sha256=action.sha256)
        number, attempt, split = header.round, header.attempt, header.split
        secagg = self.machine.secure_instance(split, number, attempt)
        # Asynchronous rounds: the buffer that counts the update may close while it streams in, so it is spooled
        # aside and moved into the open buffer's spool when it is counted.
        # (Buffered secure rounds: a masked input is for one instance, named by its round and attempt, like a sync one.)
        staged = self.machine.asynchronous and not self.machine.buffered and not split
        if split:
            assert secagg is not None
        values: Float32Values | MaskedPadding
        values = Float32Values() if secagg is None else MaskedPadding(secagg.params.dim, secagg.params.bits)
        where = (
            self.spool_root / self.job_id / "incoming"
            if staged
            else spool_dir(self.spool_root, self.job_id, number, attempt, split)
        )
        spool = UpdateSpool(
            where / f"{site}.update",
            specs,
            header.manifest.total_bytes,
            header.manifest.sha256,
            self.limits.max_chunk_bytes,
            values,
        )
        writer = SpoolWriter(spool)
        counted = False
        try:
            try:
                first = True
                async for msg in chunks:
                    if msg.WhichOneof("kind") != "data":
                        raise InvalidArgument("only data chunks may follow the upload header")
                    refusal = self.machine.upload_refusal(site, number, attempt, split)
                    if refusal is not None and not (staged and self.machine.between_buffers()):
                        raise FailedPrecondition(refusal)
                    await writer.write(msg.data)
                    if first:
                        first = False
                        failpoints.hit("coordinator.upload_receiving", round=number)  # the stream is open
                path = await writer.finish()
            except BaseException:
                writer.discard()
                raise
            while not counted:
                # The buffer it streamed toward may have filled meanwhile: it counts in the next one.
                waited = await self._next_buffer() if staged else True
                async with self._lock:
                    if staged and waited and self.machine.between_buffers():
                        continue  # others filled the next buffer first: this one counts in the one after
                    refusal = self.machine.upload_refusal(site, number, attempt, split)
                    if refusal is not None:
                        raise FailedPrecondition(refusal)
                    self._check_clip(values)
                    if secagg is not None:
                        # Folded before it is counted, under the lock: the sum and the count never disagree.
                        await asyncio.to_thread(secagg.fold_masked_file, site, path)
                    if staged:
                        buffer = self.spool_of(*self.machine.upload_target(number, attempt))
                        files.private_dir(buffer, "state_dir/spool")
                        os.replace(path, buffer / path.name)
                        files.fsync_dir(buffer)
                    # A plaintext update stays in the spool, verified, and is folded when the round closes.
                    self._apply(UploadVerified(site, header, self.clock()))
                    counted = True
        finally:
            if split:  # a secure evaluation's masked input is folded, not kept
                spool.final_path.unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    where.rmdir()
            if not counted:
                spool.final_path.unlink(missing_ok=True)
                with contextlib.suppress(CohortError):
                    await asyncio.shield(self.feed(UploadAbandoned(site, number, attempt)))
        return pb.UploadReply(accepted=True, duplicate=False, update_sha256=header.manifest.sha256)


def fold_spooled(
    strategy: StrategyConfig, specs: tuple[Spec, ...], directory: Path, action: Aggregate, privacy: JobPrivacy
) -> tuple[np.ndarray | RunningSum, dict[str, object]]:
    """The round's aggregated plaintext update from the spooled updates in ``directory``, and what a robust rule
    reports. Shared by the runner and the simulator (simulation/), so both compute the same model.

    The mean is one running sum folded in site order: a fixed order makes the float32 sum, and so the new model,
    a function of the accepted updates alone (the same whatever order they arrived in, and after a restart took
    them back from the spool). Plain FedAvg returns that :class:`RunningSum` itself, which :func:`step_model` reads
    block by block; central DP's noisy mean and the robust rules (which read the spooled updates in blocks of
    coordinates, coordinator/strategy/robust.py) return the update as one float64 array.
    """
    paths = {site: directory / f"{site}.update" for site in action.weights}
    if strategy.aggregation != "mean" or strategy.norm_bound > 0:
        numel = sum(s.numel for s in specs)
        result = robust.aggregate(strategy, robust.Updates(paths, action.weights, numel))
        return result.delta, result.report
    running = RunningSum(specs)
    for site in sorted(action.weights):
        running.add_file(paths[site], action.weights[site])
    if action.central_noise:
        noise = privacy.central_noise(running.numel)
        return running.noisy_mean(noise, action.denominator), {}
    if running.total_weight <= 0:
        raise ValueError("no update was accepted")
    return running, {}


def step_model(
    strategy: StrategyConfig,
    delta: np.ndarray | RunningSum,
    optimizer: OptimizerState,
    tensors: dict[str, torch.Tensor],
    specs: tuple[Spec, ...],
    strategy_files: ModelStore | None,
    labels: dict[str, str],
) -> tuple[EncodedTensors, OptimizerState, dict[str, object]]:
    """Apply the server optimizer to the round's update: the new model (encoded; its tensors are views of the
    encoding), the optimizer's next state, and the reference the round's commit records (its step, and the
    content-addressed file its moments were saved to)."""
    if isinstance(delta, RunningSum):
        if strategy.name == "fedavg":  # stateless: the sum becomes the next model in place (the same bits)
            state = OptimizerState(optimizer.step + 1)
            return delta.into_model(tensors, strategy.learning_rate), state, {"step": state.step}
        delta = delta.mean()
    step, new_optimizer = server_step(strategy, delta, optimizer)
    ref: dict[str, object] = {"step": new_optimizer.step}
    if new_optimizer.moments:
        assert strategy_files is not None, "a stateful server optimizer needs its state directory"
        saved = strategy_files.save(
            {k: torch.from_numpy(v) for k, v in new_optimizer.moments.items()}, {**labels, "optimizer": strategy.name}
        )
        ref["moments"] = saved.version
    return next_model(tensors, specs, flat_blocks(step)), new_optimizer, ref
