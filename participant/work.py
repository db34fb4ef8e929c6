"""A site's work: the queue of train and evaluate tasks, one at a time, off the event loop.

Each task downloads the global model (digest-checked, cached by digest: the round's training and the evaluation that
follows share one download), trains or evaluates in a worker thread (:class:`participant.site.Site`), and reports
back. Record-level DP is decided here: a site whose budget a round would pass declines it instead of training. A
task the coordinator re-sends (it does after a reconnect) is done once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Literal

import grpc
import torch

from common import failpoints
from common.errors import CohortError
from common.lifecycle import cancel_requested
from common.metrics import score_lane_values
from common.proto.cohort.v1 import cohort_pb2 as pb
from common.secagg.lanes import eval_lane_values, train_lane_values
from common.secagg_wire import STATS_SPLIT, setup_from_proto
from common.serde import CHUNK_BYTES, Assembler, EncodedTensors
from common.tasks.base import RecordDP
from common.tasks.setup import TaskSetup
from participant import site_rules
from participant.bulk import Unreachable
from participant.config import ParticipantConfig
from participant.connection import Connection
from participant.final_model import fetch_model, site_notes, write_final_model
from participant.record_dp import SiteBudget
from participant.secagg_client import SecAggSessions
from participant.site import LocalUpdate, Site

log = logging.getLogger("cohort.participant")

WorkKey = tuple[str, ...]


class Work:
    def __init__(
        self,
        config: ParticipantConfig,
        site: Site,
        connection: Connection,
        secagg: SecAggSessions,
        budget: SiteBudget | None,
    ) -> None:
        self.config = config
        self.site = site
        self._conn = connection
        self.secagg = secagg
        self._budget = budget
        self.completed: collections.deque[WorkKey] = collections.deque(maxlen=64)
        self._queue: asyncio.Queue[pb.WorkItem] = asyncio.Queue()
        self._pending: set[WorkKey] = set()
        self._cache: tuple[str, dict[str, torch.Tensor]] | None = None
        self._model_buffer: bytearray | None = None  # the last model's receive buffer, reused by the next download
        self._served: set[str] = set()  # jobs this site trained or evaluated for (keep_final_model keeps theirs)
        self._keeping: asyncio.Task[None] | None = None
        self._optimizer_job = ""  # the job whose local optimizer state the site keeps (keep_optimizer_state)
        self._side: set[asyncio.Task[None]] = set()
        # Asynchronous rounds with secure aggregation: the update of the last buffered task, kept until its buffer's
        # secure instance asks for it (coordinator/round/buffered.py). Lost with the process: the site trains again.
        self._held: tuple[pb.TrainTask, LocalUpdate] | None = None

    @property
    def busy(self) -> bool:
        """A train or evaluate task is queued or running."""
        return bool(self._pending)

    # -- what arrives on the work stream ------------------------------------------------------------------------
    def dispatch(self, item: pb.WorkItem) -> None:
        kind = item.WhichOneof("kind")
        if kind == "train" or kind == "evaluate":
            key = _key(item)
            held = self._held
            if key in self.completed and held is not None and _key(pb.WorkItem(train=held[0])) == key:
                # A buffered task re-sent after a reconnect: the coordinator forgot the kept update with the old
                # session; it is still here, so say so again instead of training twice.
                self._spawn(self._announce(held[0]))
                return
            if key in self._pending or key in self.completed:
                return  # the coordinator re-sent a task we already have
            summing = kind == "train" and item.train.buffered and item.train.HasField("secagg")
            if kind == "train" and not summing and self.record_dp_for(item.train) is False:
                self.completed.append(key)
                t = item.train
                reason = "this site's record-level privacy settings or budget"
                self._spawn(self._conn.decline(t.job_id, t.round, t.attempt, reason))
                return
            self._pending.add(key)
            self._served.add(item.train.job_id if kind == "train" else item.evaluate.job_id)
            if kind == "train" and item.train.HasField("secagg"):
                self._spawn(self.secagg.start(item.train))
            elif kind == "train" and item.train.buffered:
                t = item.train  # a new buffered task: an instance still waiting for its shares was abandoned
                self.secagg.supersede(t.job_id, t.round, t.attempt)
            if kind == "evaluate" and item.evaluate.HasField("secagg"):
                self._spawn(self.secagg.start(item.evaluate))
            self._queue.put_nowait(item)
        elif kind == "secagg":
            self._spawn(self.secagg.on_step(item.secagg))
        elif kind == "job_finished":
            finished = item.job_finished
            log.info("job %s finished: %s", finished.job_id, finished.reason)
            if self.config.keep_final_model and finished.final_model_version and finished.job_id in self._served:
                self._keeping = asyncio.get_running_loop().create_task(self._keep_final(finished))
                self._side.add(self._keeping)
                self._keeping.add_done_callback(self._side.discard)
            if self._cache is not None and not self._pending:
                self._cache = self._model_buffer = None  # free the model until the next job needs one

    def when_kept(self, callback: Callable[[], None]) -> None:
        """``callback()`` once the final model being kept (keep_final_model) is written, or at once."""
        if self._keeping is None or self._keeping.done():
            callback()
        else:
            self._keeping.add_done_callback(lambda _: callback())

    async def _keep_final(self, finished: pb.JobFinished) -> None:
        path, version = self.config.keep_final_model, finished.final_model_version
        assert path is not None
        timeout = self.config.coordinator.transfer_timeout_s
        stub = self._conn.stub
        try:
            assembler, metadata = await self._conn.retrying(
                "final model download",
                time.time() + timeout,
                lambda: fetch_model(stub, finished.job_id, version, timeout),
            )
            tensors = await asyncio.to_thread(assembler.finish)
            notes = site_notes(self._conn.site_id, finished)
            await asyncio.to_thread(write_final_model, path, tensors, {**metadata, **notes})
        except (CohortError, grpc.aio.AioRpcError, OSError) as exc:
            detail = f"{exc.code().name}: {exc.details()}" if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
            log.error("job %s: the final model could not be kept at %s: %s", finished.job_id, path, detail)
            return
        log.info("job %s: final model %s... kept at %s", finished.job_id, version[:19], path)

    def _spawn(self, coro: object) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self._side.add(task)
        task.add_done_callback(self._side.discard)

    async def cancel_side_tasks(self) -> None:
        for t in list(self._side):
            t.cancel()
        await asyncio.gather(*self._side, return_exceptions=True)

    def record_dp_for(self, task: pb.TrainTask) -> RecordDP | Literal[False] | None:
        """This site's DP-SGD settings for the task; False when the site must not train it (and says why)."""
        decided = site_rules.record_dp_for(self.config.privacy, self._budget, task, self.site.num_train_samples)
        if isinstance(decided, str):
            log.error("round %d: %s; not training", task.round, decided)
            return False
        return decided

    # -- the worker -----------------------------------------------------------------------------------------------
    async def run(self) -> None:
        while not cancel_requested():  # a cancel that a gRPC call turned into its own error still ends the worker
            item = await self._queue.get()
            key = _key(item)
            try:
                if item.WhichOneof("kind") == "train":
                    await self._train(item.train)
                else:
                    await self._evaluate(item.evaluate)
                self.completed.append(key)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if cancel_requested():
                    raise asyncio.CancelledError from exc  # the daemon is closing: not a failed task
                if isinstance(exc, grpc.aio.AioRpcError):
                    log.warning("%s %s failed: %s: %s", key[0], key[1:], exc.code().name, exc.details())
                else:
                    log.exception("%s %s failed", key[0], key[1:])
            finally:
                self._pending.discard(key)
        raise asyncio.CancelledError

    async def _model(self, job_id: str, version: str, deadline: float) -> dict[str, torch.Tensor]:
        if self._cache is not None and self._cache[0] == version:
            return self._cache[1]
        stub, timeout = self._conn.stub, self.config.coordinator.transfer_timeout_s

        # The previous model's buffer receives this one (no new model-sized buffer a round); its tensors, the cache,
        # are overwritten, so the cache goes first. Nothing else holds them between tasks: training copied them into
        # the site's model, and updates live in their own buffer.
        self._cache, reuse = None, self._model_buffer

        async def download() -> dict[str, torch.Tensor]:
            assembler = await self._bulk_download(job_id, version, timeout, reuse)
            if assembler is None:
                assembler, _ = await fetch_model(stub, job_id, version, timeout, reuse)
            self._conn.stats.model_bytes_received += assembler.total
            self._model_buffer = assembler.buffer
            return await asyncio.to_thread(assembler.finish)

        tensors = await self._conn.retrying("model download", deadline, download)
        self._cache = (version, tensors)
        return tensors

    async def _bulk_download(
        self, job_id: str, version: str, timeout: float, reuse: bytearray | None
    ) -> Assembler | None:
        """The model over the data channel; None when it is not offered or cannot be reached (then gRPC)."""
        bulk = self._conn.bulk
        if not bulk.usable:
            return None
        try:
            return await bulk.download(job_id, version, timeout, reuse)
        except Unreachable:
            return None

    async def _train(self, task: pb.TrainTask) -> None:
        if task.buffered and task.HasField("secagg"):
            await self._sum_held(task)
            return
        if task.job_id != self._optimizer_job:
            self.site.optimizer_state.clear()  # a kept optimizer state belongs to one job
            self._optimizer_job = task.job_id
        t0 = time.perf_counter()
        tensors = await self._model(task.job_id, task.model_version, task.deadline_unix)
        t1 = time.perf_counter()
        clip = site_rules.clip_of(task)
        record_dp = self.record_dp_for(task)
        if record_dp is False:
            return
        failpoints.hit("participant.training", round=task.round)
        setup = TaskSetup.of(task)  # the job's task parameters and feature scaling
        local = await asyncio.to_thread(self.site.train, tensors, task.params, clip, record_dp or None, setup)
        if record_dp:
            assert self._budget is not None
            local, self._conn.stats.epsilon = site_rules.spend(local, self._budget)
        t2 = time.perf_counter()
        result = local.result
        if task.buffered:
            # Kept here until a buffer's secure instance takes it; the coordinator learns only that it is ready.
            self._held = (task, local)
            await self.secagg.ready(task)
            self._conn.stats.trainings += 1
            self._conn.stats.train_seconds += t2 - t1
            log.info("round %d: trained on %d samples, update kept for a buffer", task.round, result.num_samples)
            return
        if task.HasField("secagg"):
            # Under secure aggregation the sample count, loss, accuracy and steps travel masked (the coordinator
            # learns their sums); only this site's own privacy guarantee stays in the clear (docs/SECURITY.md).
            lanes = train_lane_values(result.num_samples, result.loss, result.accuracy, result.extra.get("steps", 0.0))
            masked = await self.secagg.masked(task, local.update, result.num_samples, lanes)
            if masked is None:
                return
            upload_tensors = masked
        else:
            upload_tensors = local.update
        header = site_rules.update_header(task, local, upload_tensors, secure=task.HasField("secagg"))
        reply = await self._upload(header, upload_tensors, task.deadline_unix, task.round)
        if task.HasField("secagg"):
            failpoints.hit("participant.masked_sent", round=task.round)
        self._conn.stats.trainings += 1
        self._conn.stats.train_seconds += t2 - t1
        log.info(
            "round %d: trained on %d samples (loss %.4f), uploaded %s%s; model %.3fs, train %.3fs, upload %.3fs",
            task.round,
            local.result.num_samples,
            local.result.loss,
            reply.update_sha256[:12],
            " (duplicate)" if reply.duplicate else "",
            t1 - t0,
            t2 - t1,
            time.perf_counter() - t2,
        )

    async def _announce(self, task: pb.TrainTask) -> None:
        try:
            await self.secagg.ready(task)
        except grpc.aio.AioRpcError as exc:
            log.warning("round %d: ready for a buffer not taken: %s: %s", task.round, exc.code().name, exc.details())

    async def _sum_held(self, task: pb.TrainTask) -> None:
        """A buffer's secure instance: mask the kept update (weighted by its staleness) and upload it."""
        held = self._held
        if held is None or held[0].job_id != task.job_id or held[0].model_version != task.model_version:
            log.warning(
                "round %d: no kept update for model %s...; declining the buffer", task.round, task.model_version[:19]
            )
            await self._conn.decline(task.job_id, task.round, task.attempt, "no kept update for that model version")
            return
        reason = site_rules.staleness_refusal(held[0], task)
        if reason is not None:
            log.error("round %d: %s; declining the buffer", task.round, reason)
            await self._conn.decline(task.job_id, task.round, task.attempt, reason)
            return
        local = held[1]
        result = local.result
        lanes = train_lane_values(result.num_samples, result.loss, result.accuracy, result.extra.get("steps", 0.0))
        masked = await self.secagg.masked(task, local.update, result.num_samples, lanes)
        if masked is None:
            return
        header = site_rules.update_header(task, local, masked, secure=True)
        reply = await self._upload(header, masked, task.deadline_unix, task.round)
        if self._held is held:
            self._held = None
        log.info(
            "round %d: kept update (staleness weight %.3f) summed securely, uploaded %s",
            task.round,
            task.staleness_weight,
            reply.update_sha256[:12],
        )

    async def _upload(
        self, header: pb.UpdateHeader, tensors: EncodedTensors, deadline: float, number: int
    ) -> pb.UploadReply:
        stub, timeout = self._conn.stub, self.config.coordinator.transfer_timeout_s

        async def upload() -> pb.UploadReply:
            bulk = self._conn.bulk
            if bulk.usable:
                with contextlib.suppress(Unreachable):  # then over gRPC
                    reply: pb.UploadReply = await bulk.upload(header, tensors.data, timeout)
                    self._conn.stats.update_bytes_sent += len(tensors.data)
                    return reply

            async def chunks() -> AsyncIterator[pb.UpdateChunk]:
                yield pb.UpdateChunk(header=header)
                for part in tensors.chunks(CHUNK_BYTES):
                    yield pb.UpdateChunk(data=bytes(part))
                    failpoints.hit("participant.upload", round=number)  # the stream is open, not yet ended

            reply = await stub.UploadUpdate(chunks(), timeout=timeout)
            self._conn.stats.update_bytes_sent += len(tensors.data)
            return reply

        return await self._conn.retrying("upload", deadline, upload)

    async def _evaluate(self, task: pb.EvaluateTask) -> None:
        if task.split == STATS_SPLIT:
            await self._statistics(task)
            return
        tensors = await self._model(task.job_id, task.model_version, task.deadline_unix)
        result, seconds = await asyncio.to_thread(self.site.evaluate, tensors, task.split, TaskSetup.of(task))
        self._conn.stats.evaluations += 1
        if task.HasField("secagg"):
            # A secure evaluation: the results are summed with the other sites' (the coordinator sees the totals).
            # The score histogram's lanes count only when the coordinator's layout has them.
            lanes = eval_lane_values(result.num_samples, result.loss, result.accuracy)
            await self._upload_lanes(task, lanes | score_lane_values(result.scores))
            return
        report = pb.EvaluationReport(
            job_id=task.job_id,
            round=task.round,
            model_version=task.model_version,
            split=task.split,
            num_samples=result.num_samples,
            loss=result.loss,
            accuracy=result.accuracy,
            eval_seconds=seconds,
            score_histogram=result.scores.flat() if result.scores is not None else [],
        )
        stub, timeout = self._conn.stub, self.config.coordinator.rpc_timeout_s

        async def send() -> pb.Ack:
            ack: pb.Ack = await stub.ReportEvaluation(report, timeout=timeout)
            return ack

        await self._conn.retrying("evaluation report", task.deadline_unix, send)

    async def _statistics(self, task: pb.EvaluateTask) -> None:
        """The statistics phase: this site's feature statistics, masked, into the secure sum (no model needed)."""
        try:
            _, _, layout = setup_from_proto(task.job_id, task.round, task.attempt, task.secagg, task.split)
            lanes = await asyncio.to_thread(self.site.statistics, TaskSetup.of(task), layout)
        except CohortError as exc:
            log.error("feature statistics: cannot take part: %s", exc)
            await self._conn.decline(task.job_id, task.round, task.attempt, f"feature statistics: {exc}", task.split)
            return
        if await self._upload_lanes(task, lanes):
            log.info("feature statistics of %d training records sent, masked", self.site.num_train_samples)

    async def _upload_lanes(self, task: pb.EvaluateTask, lanes: dict[str, float]) -> bool:
        """A lanes-only secure instance's input, masked once the neighbours' shares are in, uploaded (False: this
        site takes no further part)."""
        masked = await self.secagg.masked_lanes(task, lanes)
        if masked is None:
            return False
        header = pb.UpdateHeader(
            job_id=task.job_id,
            round=task.round,
            attempt=task.attempt,
            split=task.split,
            base_model_version=task.model_version,
            manifest=masked.manifest(),
        )
        await self._upload(header, masked, task.deadline_unix, task.round)
        return True


def _key(item: pb.WorkItem) -> WorkKey:
    if item.WhichOneof("kind") == "train":
        t = item.train
        kind = "sum" if t.buffered and t.HasField("secagg") else "train"  # a buffer's instance: same round, attempt
        return (kind, t.job_id, str(t.round), str(t.attempt))
    e = item.evaluate
    return ("evaluate", e.job_id, str(e.round), e.split, e.model_version, str(e.attempt))
