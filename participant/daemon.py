"""The participant daemon: dials out to the coordinator, waits for work, trains locally, streams updates back.

It never listens on a port. A session is Join -> WaitForWork (a server stream of work items and heartbeats). When
the stream ends or goes silent past the heartbeat interval, the daemon reconnects with exponential backoff and
full jitter. Permanent refusals (not on the allow-list, wrong task or schema, bad certificate) stop the daemon with
the coordinator's message instead of retrying forever.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import replace
from types import TracebackType
from typing import Any, Literal, TypeVar

import grpc
import torch

from common import failpoints
from common.certs import Role
from common.errors import RETRY_AFTER_KEY, RETRYABLE_CODES, CohortError, InvalidArgument
from common.lifecycle import Status
from common.proto.cohort.v1 import cohort_pb2 as pb
from common.proto.cohort.v1 import cohort_pb2_grpc as pb_grpc
from common.retry import Backoff
from common.secagg.errors import SecAggAborted
from common.serde import CHUNK_BYTES, Assembler, EncodedTensors
from common.tasks.base import RecordDP, Task, load_task, task_digest
from common.tls import channel_credentials, keepalive_options, message_options, tls_files
from common.version import VERSION
from participant.config import ParticipantConfig
from participant.record_dp import SiteBudget, planned_training
from participant.secagg_session import SecAggSession, SiteKeys
from participant.site import Site

log = logging.getLogger("cohort.participant")

# Refusals that retrying cannot fix: stop and tell the operator.
FATAL_CODES = frozenset(
    {
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)

WorkKey = tuple[str, ...]
T = TypeVar("T")


class FatalRefusal(Exception):
    """The coordinator refused this site for a reason retrying cannot fix."""


class ParticipantDaemon:
    def __init__(self, config: ParticipantConfig, task: Task | None = None) -> None:
        self.config = config
        self.status = Status.INIT
        self.task = task
        self.site: Site | None = None
        self.site_id = ""
        self.job_id = ""
        self.error: str | None = None
        self.joined = asyncio.Event()
        self.completed: collections.deque[WorkKey] = collections.deque(maxlen=64)
        self._stop = asyncio.Event()
        self._closed = asyncio.Event()
        self._work: asyncio.Queue[pb.WorkItem] = asyncio.Queue()
        self._pending: set[WorkKey] = set()
        self._stub: pb_grpc.FederationAsyncStub | None = None
        self._channel: grpc.aio.Channel | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._cache: tuple[str, dict[str, torch.Tensor]] | None = None
        self._backoff = Backoff(config.reconnect.initial_backoff_s, config.reconnect.max_backoff_s)
        self._site_keys: SiteKeys | None = None
        self._budget: SiteBudget | None = None
        self._secagg: dict[tuple[str, int, int], SecAggSession] = {}
        self._declined: collections.deque[tuple[str, int, int]] = collections.deque(maxlen=16)
        self._side_tasks: set[asyncio.Task[None]] = set()

    # -- lifecycle ----------------------------------------------------------------------------------------------
    async def start(self) -> None:
        if self.status is not Status.INIT:
            return
        self.status = Status.STARTING
        cfg = self.config
        self._credentials = channel_credentials(tls_files(cfg.tls), Role.PARTICIPANT)
        self._site_keys = SiteKeys.load(tls_files(cfg.tls))
        if cfg.privacy.enabled:
            self._budget = SiteBudget(cfg.privacy.target_epsilon, cfg.privacy.delta, cfg.privacy.state_file)
        task = self.task or load_task(cfg.task)
        data = await asyncio.to_thread(task.load_data, cfg.data_dir)
        self.task, self.site = task, Site(task, data)
        self._digest = task_digest(task)
        torch.set_num_threads(cfg.training.torch_threads)
        self.status = Status.RUNNING
        self._tasks = [
            asyncio.create_task(self._connect_loop(), name="participant-connect"),
            asyncio.create_task(self._worker(), name="participant-worker"),
        ]

    async def close(self, reason: str = "shutdown") -> None:
        if self.status in (Status.CLOSING, Status.CLOSED):
            await self._closed.wait()
            return
        self.status = Status.CLOSING
        log.info("participant closing: %s", reason)
        self._stop.set()
        for t in (*self._tasks, *self._side_tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, *self._side_tasks, return_exceptions=True)
        if self._channel is not None:
            await self._channel.close()
        self.status = Status.CLOSED
        self._closed.set()

    async def wait_stopped(self) -> None:
        await self._stop.wait()

    async def __aenter__(self) -> ParticipantDaemon:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close("context exit")

    def _fail(self, message: str) -> None:
        self.error = message
        self.status = Status.FAILED
        log.error("%s", message)
        self._stop.set()

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)

    # -- connection ---------------------------------------------------------------------------------------------
    def _open_channel(self) -> pb_grpc.FederationAsyncStub:
        cfg = self.config.coordinator
        options = keepalive_options(5.0) + message_options(8 << 20)
        # gRPC's own reconnect backoff (1 s growing to 120 s by default) would keep a restarted coordinator waiting;
        # bound it by this daemon's reconnect settings.
        backoff = self.config.reconnect
        options += [
            ("grpc.initial_reconnect_backoff_ms", max(10, int(backoff.initial_backoff_s * 1000))),
            ("grpc.max_reconnect_backoff_ms", max(100, int(backoff.max_backoff_s * 1000))),
        ]
        if cfg.server_name:
            options.append(("grpc.ssl_target_name_override", cfg.server_name))
        self._channel = grpc.aio.secure_channel(cfg.address, self._credentials, options=options)
        self._stub = pb_grpc.FederationStub(self._channel)
        return self._stub

    async def _connect_loop(self) -> None:
        stub = self._open_channel()
        while not self._stop.is_set():
            hint = 0.0
            try:
                await self._session(stub)
            except FatalRefusal as exc:
                self._fail(str(exc))
                return
            except grpc.aio.AioRpcError as exc:
                if exc.code() in FATAL_CODES:
                    self._fail(f"coordinator refused this site ({exc.code().name}): {exc.details()}")
                    return
                log.warning("connection to coordinator lost (%s: %s); reconnecting", exc.code().name, exc.details())
                hint = retry_after_s(exc)
            except TimeoutError:
                log.warning("no message from the coordinator within the heartbeat window; reconnecting")
            self.joined.clear()
            # A rate-limited Join says when to come back; never sooner than that, never sooner than the backoff.
            await self._sleep(max(self._backoff.next_delay(), hint))

    async def _session(self, stub: pb_grpc.FederationAsyncStub) -> None:
        assert self.task is not None
        assert self.site is not None
        reply: pb.JoinReply = await stub.Join(
            pb.JoinRequest(
                task_name=self.task.name,
                task_digest=self._digest,
                schema_fingerprint=self.task.schema.fingerprint(),
                software_version=VERSION,
                num_train_samples=self.site.num_train_samples,
            ),
            timeout=self.config.coordinator.rpc_timeout_s,
        )
        self.site_id, self.job_id = reply.site_id, reply.job_id
        log.info("joined federation %r as site %r", reply.federation, reply.site_id)
        stream = stub.WaitForWork(pb.WaitRequest(session_id=reply.session_id))
        window = 2 * reply.heartbeat_interval_s + 1.0
        beating = asyncio.create_task(self._heartbeats(stub, reply, stream), name="participant-heartbeat")
        read: asyncio.Future[Any] | None = None
        try:
            while not self._stop.is_set():
                read = read or asyncio.ensure_future(stream.read())
                try:
                    # Shielded: cancelling a read would cancel the stream. While this site has a task in hand, a
                    # silent stream is not given up (this site may just have been too busy to read it): the task's
                    # transfers and HTTP/2 keepalive notice a dead coordinator.
                    item = await asyncio.wait_for(asyncio.shield(read), timeout=window)
                except TimeoutError:
                    if self._pending:
                        continue
                    raise
                except asyncio.CancelledError:
                    if beating.done() and not self._stop.is_set():
                        return  # _heartbeats ended the stream: the coordinator dropped this session
                    raise
                read = None
                if item is grpc.aio.EOF:
                    log.info("coordinator ended the work stream")
                    return
                assert isinstance(item, pb.WorkItem)
                if not self.joined.is_set():
                    self.joined.set()
                    self._backoff.reset()
                self._dispatch(item)
        finally:
            beating.cancel()
            stream.cancel()
            if read is not None:
                read.cancel()

    async def _heartbeats(self, stub: pb_grpc.FederationAsyncStub, reply: pb.JoinReply, stream: Any) -> None:
        """Tell the coordinator this site is alive, three times per heartbeat interval (it drops a site after one
        silent interval). A refused heartbeat means the session was replaced or dropped: end it and join again."""
        interval = max(0.05, reply.heartbeat_interval_s / 3)
        request = pb.HeartbeatRequest(session_id=reply.session_id)
        while True:
            try:
                await stub.Heartbeat(request, timeout=reply.heartbeat_interval_s)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    log.info("coordinator no longer knows this session (%s); joining again", exc.details())
                    stream.cancel()
                    return
                log.debug("heartbeat not delivered: %s", exc.code().name)
            await asyncio.sleep(interval)

    def _dispatch(self, item: pb.WorkItem) -> None:
        kind = item.WhichOneof("kind")
        if kind == "train" or kind == "evaluate":
            key = _key(item)
            if key in self._pending or key in self.completed:
                return  # the coordinator re-sent a task we already have
            if kind == "train" and self._record_dp_for(item.train) is False:
                self.completed.append(key)
                self._spawn(self._decline(item.train, "this site's record-level privacy settings or budget"))
                return
            self._pending.add(key)
            if kind == "train" and item.train.HasField("secagg"):
                self._spawn(self._secagg_start(item.train))
            self._work.put_nowait(item)
        elif kind == "secagg":
            self._spawn(self._secagg_step(item.secagg))
        elif kind == "job_finished":
            log.info("job %s finished: %s", item.job_finished.job_id, item.job_finished.reason)
            if self._cache is not None and self._pending == set():
                self._cache = None  # free the model until the next job needs one
            if self.config.exit_after_job:
                self._stop.set()  # run() then closes the daemon gracefully

    async def _decline(self, task: pb.TrainTask | pb.SecAggStep, reason: str) -> None:
        stub = self._stub
        assert stub is not None
        req = pb.DeclineRequest(job_id=task.job_id, round=task.round, attempt=task.attempt, reason=reason)
        with contextlib.suppress(grpc.aio.AioRpcError):
            await stub.Decline(req, timeout=self.config.coordinator.rpc_timeout_s)

    def _record_dp_for(self, task: pb.TrainTask) -> RecordDP | Literal[False] | None:
        """This site's DP-SGD settings for the task; False when the site must not train it (and says why)."""
        cfg = self.config.privacy
        if not cfg.enabled:
            if task.privacy.unit == "record":
                log.error(
                    "round %d: the job requires record-level DP but this site's privacy.enabled is false; not training",
                    task.round,
                )
                return False
            return None
        assert self._budget is not None
        assert self.site is not None
        plan = planned_training(self.site.num_train_samples, task.params.batch_size, task.params.local_epochs)
        if self._budget.would_exceed(plan.steps, plan.sample_rate, cfg.noise_multiplier):
            log.error(
                "round %d: training would take this site's epsilon past its budget of %g (spent %.3f at "
                "delta %g); not training",
                task.round,
                cfg.target_epsilon,
                self._budget.epsilon(),
                cfg.delta,
            )
            return False
        return RecordDP(noise_multiplier=cfg.noise_multiplier, max_grad_norm=cfg.max_grad_norm, delta=cfg.delta)

    # -- secure aggregation -------------------------------------------------------------------------------------
    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)

    async def _secagg_send(self, session: SecAggSession, msg: pb.SecAggMessage) -> None:
        stub = self._stub
        assert stub is not None

        async def send() -> pb.Ack:
            ack: pb.Ack = await stub.SecAgg(msg, timeout=self.config.coordinator.rpc_timeout_s)
            return ack

        await self._retrying("secure-aggregation message", session.task.deadline_unix, send)

    async def _secagg_abort(self, session: SecAggSession, reason: str) -> None:
        session.aborted = reason
        session.shares_ready.set()  # wake the trainer: it will not upload
        log.error("secure aggregation of round %d aborted: %s", session.task.round, reason)
        with contextlib.suppress(grpc.aio.AioRpcError):
            await self._secagg_send(session, session.message(abort_reason=reason))

    async def _secagg_start(self, task: pb.TrainTask) -> None:
        assert self._site_keys is not None
        key = (task.job_id, task.round, task.attempt)
        for (job, rnd, attempt), old in self._secagg.items():
            if job == task.job_id and (rnd, attempt) < (task.round, task.attempt) and not old.aborted:
                # The coordinator moved on (the round failed and is retried): stop waiting for that round's shares.
                old.aborted = "superseded by a later round"
                old.shares_ready.set()
        try:
            session = SecAggSession.start(task, self.site_id, self._site_keys)
            self._secagg[key] = session
            while len(self._secagg) > 4:
                self._secagg.pop(next(iter(self._secagg)))
            msg = await asyncio.to_thread(session.advertise)
            await self._secagg_send(session, msg)
            failpoints.hit("participant.secagg_advertised", round=task.round)
        except (CohortError, grpc.aio.AioRpcError) as exc:
            log.error("round %d: cannot take part in secure aggregation: %s", task.round, exc)

    async def _secagg_step(self, step: pb.SecAggStep) -> None:
        key = (step.job_id, step.round, step.attempt)
        session = self._secagg.get(key)
        if session is None and key not in self._declined:
            # No keys for that round here (this daemon restarted since the round began, or never started its
            # session): say so, or the coordinator, seeing the site connected, waits for it until the stage times out.
            self._declined.append(key)
            log.warning("round %d: no secure-aggregation keys for it (restarted?); declining", step.round)
            await self._decline(step, "restarted: this site lost the round's secure-aggregation keys")
            return
        if session is None or session.aborted:
            return
        if step.WhichOneof("stage") == "signatures":
            failpoints.hit("participant.unmasking", round=step.round)
        try:
            reply = await asyncio.to_thread(session.on_step, step)
        except SecAggAborted as exc:
            await self._secagg_abort(session, str(exc))
            return
        except CohortError as exc:
            log.error("round %d: secure-aggregation step refused: %s", step.round, exc)
            return
        if reply is not None:
            try:
                await self._secagg_send(session, reply)
            except grpc.aio.AioRpcError as exc:
                log.warning("round %d: secure-aggregation message not delivered: %s", step.round, exc.details())

    async def _masked(self, task: pb.TrainTask, update: EncodedTensors, num_samples: int) -> EncodedTensors | None:
        session = self._secagg.get((task.job_id, task.round, task.attempt))
        if session is None:
            log.error("round %d: no secure-aggregation session; not uploading", task.round)
            return None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(session.shares_ready.wait(), timeout=max(0.0, task.deadline_unix - time.time()))
        if session.aborted or not session.shares_ready.is_set():
            return None
        try:
            return await asyncio.to_thread(session.masked_update, update, num_samples)
        except SecAggAborted as exc:
            await self._secagg_abort(session, str(exc))
            return None

    # -- work ---------------------------------------------------------------------------------------------------
    async def _worker(self) -> None:
        while True:
            item = await self._work.get()
            key = _key(item)
            try:
                if item.WhichOneof("kind") == "train":
                    await self._train(item.train)
                else:
                    await self._evaluate(item.evaluate)
                self.completed.append(key)
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as exc:
                log.warning("%s %s failed: %s: %s", key[0], key[1:], exc.code().name, exc.details())
            except Exception:
                log.exception("%s %s failed", key[0], key[1:])
            finally:
                self._pending.discard(key)

    async def _retrying(self, what: str, deadline: float, call: Callable[[], Awaitable[T]]) -> T:
        backoff = Backoff(self.config.reconnect.initial_backoff_s, self.config.reconnect.max_backoff_s)
        while True:
            try:
                return await call()
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in RETRYABLE_CODES or time.time() >= deadline or self._stop.is_set():
                    raise
                log.info("%s: %s, retrying", what, exc.code().name)
            await self._sleep(min(backoff.next_delay(), max(0.0, deadline - time.time())))

    async def _model(self, job_id: str, version: str, deadline: float) -> dict[str, torch.Tensor]:
        if self._cache is not None and self._cache[0] == version:
            return self._cache[1]

        async def download() -> dict[str, torch.Tensor]:
            assert self._stub is not None
            stream = self._stub.DownloadModel(
                pb.ModelRequest(job_id=job_id, model_version=version),
                timeout=self.config.coordinator.transfer_timeout_s,
            )
            first = await stream.read()
            if not isinstance(first, pb.ModelChunk) or first.WhichOneof("kind") != "manifest":
                raise InvalidArgument("model stream did not start with a manifest")
            assembler = Assembler(first.manifest)
            while (chunk := await stream.read()) is not grpc.aio.EOF:
                assert isinstance(chunk, pb.ModelChunk)
                if chunk.WhichOneof("kind") != "data":
                    raise InvalidArgument("model stream carried a second manifest")
                assembler.add(chunk.data)
            if "sha256:" + assembler.expected_sha256 != version:
                raise InvalidArgument("the coordinator sent a different model than the task named")
            return await asyncio.to_thread(assembler.finish)

        tensors = await self._retrying("model download", deadline, download)
        self._cache = (version, tensors)
        return tensors

    async def _train(self, task: pb.TrainTask) -> None:
        assert self.site is not None
        t0 = time.perf_counter()
        tensors = await self._model(task.job_id, task.model_version, task.deadline_unix)
        t1 = time.perf_counter()
        clip = task.privacy.clip_norm if task.privacy.unit == "site" else 0.0
        record_dp = self._record_dp_for(task)
        if record_dp is False:
            return
        failpoints.hit("participant.training", round=task.round)
        local = await asyncio.to_thread(self.site.train, tensors, task.params, clip, record_dp or None)
        if record_dp:
            assert self._budget is not None
            extra = local.result.extra
            # Spent once the update leaves the site: record before uploading (a crash then retrain counts twice).
            spent = self._budget.record(int(extra["dp_steps"]), extra["dp_sample_rate"], extra["dp_noise_multiplier"])
            local = replace(
                local,
                result=replace(local.result, extra={**extra, "dp_epsilon": spent, "dp_delta": self._budget.delta}),
            )
        t2 = time.perf_counter()
        upload_tensors = local.update
        if task.HasField("secagg"):
            masked = await self._masked(task, local.update, local.result.num_samples)
            if masked is None:
                return
            upload_tensors = masked
        metrics = {"loss": local.result.loss, "accuracy": local.result.accuracy}
        metrics |= {k: v for k, v in local.result.extra.items() if math.isfinite(v)}
        header = pb.UpdateHeader(
            job_id=task.job_id,
            round=task.round,
            attempt=task.attempt,
            base_model_version=task.model_version,
            num_samples=local.result.num_samples,
            metrics=metrics,
            manifest=upload_tensors.manifest(),
            train_seconds=local.seconds,
        )

        async def upload() -> pb.UploadReply:
            assert self._stub is not None

            async def chunks() -> AsyncIterator[pb.UpdateChunk]:
                yield pb.UpdateChunk(header=header)
                for part in upload_tensors.chunks(CHUNK_BYTES):
                    yield pb.UpdateChunk(data=bytes(part))
                    failpoints.hit("participant.upload", round=task.round)  # the stream is open, not yet ended

            reply: pb.UploadReply = await self._stub.UploadUpdate(
                chunks(), timeout=self.config.coordinator.transfer_timeout_s
            )
            return reply

        reply = await self._retrying("upload", task.deadline_unix, upload)
        if task.HasField("secagg"):
            failpoints.hit("participant.masked_sent", round=task.round)
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

    async def _evaluate(self, task: pb.EvaluateTask) -> None:
        assert self.site is not None
        assert self._stub is not None
        tensors = await self._model(task.job_id, task.model_version, task.deadline_unix)
        result, seconds = await asyncio.to_thread(self.site.evaluate, tensors, task.split)
        report = pb.EvaluationReport(
            job_id=task.job_id,
            round=task.round,
            model_version=task.model_version,
            split=task.split,
            num_samples=result.num_samples,
            loss=result.loss,
            accuracy=result.accuracy,
            eval_seconds=seconds,
        )
        stub = self._stub

        async def send() -> pb.Ack:
            ack: pb.Ack = await stub.ReportEvaluation(report, timeout=self.config.coordinator.rpc_timeout_s)
            return ack

        await self._retrying("evaluation report", task.deadline_unix, send)


def retry_after_s(exc: grpc.aio.AioRpcError) -> float:
    """The coordinator's retry hint (trailing metadata of a RESOURCE_EXHAUSTED answer), in seconds; 0 if none."""
    if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return 0.0
    for key, value in exc.trailing_metadata() or ():
        if key == RETRY_AFTER_KEY:
            try:
                return min(300.0, max(0.0, float(value) / 1000))
            except (TypeError, ValueError):
                return 0.0
    return 0.0


def _key(item: pb.WorkItem) -> WorkKey:
    if item.WhichOneof("kind") == "train":
        t = item.train
        return ("train", t.job_id, str(t.round), str(t.attempt))
    e = item.evaluate
    return ("evaluate", e.job_id, str(e.round), e.split, e.model_version)


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
    return 1 if error else 0
