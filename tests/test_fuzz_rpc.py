"""Fuzzing every RPC handler through real gRPC and mutual TLS: random and mutated requests (and raw bytes that may not
even decode) get an OK or a refusal with a proper status, never INTERNAL or UNKNOWN, never a hang, never an error in
the coordinator's log, and a refusal changes nothing (store rows, sessions, the open round, the open evaluation,
secure-aggregation state, spooled files); only refusal events may join the audit log.

Each test starts one coordinator in a steady state (a round, an evaluation or a secure-aggregation stage open and
waiting for a site that never answers) and runs its Hypothesis examples against it. Hypothesis runs in a worker
thread; each call is scheduled on the test's event loop, where the coordinator lives, and bounded by a timeout.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar, cast

import grpc
import numpy as np
import pytest
import torch
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import (
    SITES,
    UNLISTED,
    CoordinatorFactory,
    Pki,
    channel,
    coordinator_config,
    download_model,
    job_config,
    join_request,
    poll_until,
    runner_of,
    update_header,
)
from test_fuzz_decoders import (
    CRYPTOGRAPHY_SERIAL_WARNING,
    FUZZ_SCALE,
    edited_bytes,
    mutations,
    random_of,
    snapshot,
    texts,
    valid_job_spec,
)

from common.proto.cohort.v1 import cohort_pb2 as pb
from common.proto.cohort.v1 import cohort_pb2_grpc as pb_grpc
from common.secagg.lanes import train_lane_values
from common.serde import EncodedTensors, Spec, encode, new_hasher
from coordinator.config import CoordinatorConfig, JobConfig, SecureAggregationConfig
from coordinator.daemon import CoordinatorDaemon
from coordinator.state.audit import verify_database
from participant.secagg_session import SecAggSession, SiteKeys

pytestmark = pytest.mark.slow

T = TypeVar("T")
M = TypeVar("M", pb.WaitRequest, pb.HeartbeatRequest)
CALL_TIMEOUT = 10.0  # every call; a DEADLINE_EXCEEDED is a hang
A, B, C, D = SITES[:4]  # a, b (and c) are in the round; d is allowed but not connected; UNLISTED is not allowed

REFUSALS = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.OUT_OF_RANGE,
    }
)
REFUSAL_EVENTS = frozenset({"rpc_refused", "join_refused", "secagg_refused", "rate_limited"})
Event = tuple[str, str]  # an audit row's kind and detail (JSON)
CORE_WRITE_RACE = "Internal error from Core"


def fast_joins(cfg: CoordinatorConfig) -> CoordinatorConfig:
    """No join rate limit in the way of thousands of fuzzed calls (the limiter is tested on its own)."""
    server = replace(
        cfg.server, join_rate_per_min=1e9, join_burst=1 << 30, join_global_rate_per_min=1e9, join_global_burst=1 << 30
    )
    return replace(cfg, server=server)


# ---------------------------------------------------------------------------------------------------------------
# A hand-driven participant and the harness around one coordinator
# ---------------------------------------------------------------------------------------------------------------


class HandSite:
    """A participant driven by hand over a real mTLS channel; its work stream is read in the background."""

    def __init__(self, name: str, address: str, pki: Pki) -> None:
        self.name = name
        self.channel = channel(address, pki.site(name), pki.coordinator.ca)
        self.stub: pb_grpc.FederationAsyncStub = pb_grpc.FederationStub(self.channel)
        self.items: asyncio.Queue[pb.WorkItem] = asyncio.Queue()
        self.session_id = ""
        self._reader: asyncio.Task[None] | None = None

    async def join(self) -> None:
        reply = await self.stub.Join(join_request(), timeout=CALL_TIMEOUT)
        self.session_id = reply.session_id
        stream = self.stub.WaitForWork(pb.WaitRequest(session_id=reply.session_id))
        self._reader = asyncio.create_task(self._read(stream))

    async def _read(self, stream: Any) -> None:
        try:
            async for item in stream:
                if item.WhichOneof("kind") != "heartbeat":
                    await self.items.put(item)
        except grpc.aio.AioRpcError:
            pass  # the coordinator closed the stream at teardown

    async def next(self, kind: str) -> pb.WorkItem:
        while True:
            item = await asyncio.wait_for(self.items.get(), timeout=30)
            if item.WhichOneof("kind") == kind:
                return item

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        await self.channel.close()


@dataclass
class Harness:
    """One coordinator, hand sites, and a channel per identity; ``run`` schedules work on the coordinator's loop."""

    coord: CoordinatorDaemon
    pki: Pki
    loop: asyncio.AbstractEventLoop
    sites: dict[str, HandSite] = field(default_factory=dict)
    channels: dict[str, grpc.aio.Channel] = field(default_factory=dict)
    accepted: dict[str, int] = field(default_factory=dict)
    refused: dict[str, int] = field(default_factory=dict)

    @classmethod
    async def start(cls, factory: CoordinatorFactory, pki: Pki, state: Path, job: JobConfig | None) -> Harness:
        # Hand sites send no Heartbeat calls: a 600 s interval keeps the liveness watch from dropping them.
        coord = await factory(fast_joins(coordinator_config(pki, state, job=job, heartbeat_s=600.0)))
        h = cls(coord, pki, asyncio.get_running_loop())
        ca = pki.coordinator.ca
        for name in (*SITES, UNLISTED):
            h.channels[name] = channel(coord.address, pki.site(name), ca)
        h.channels["admin"] = channel(coord.address, pki.admin, ca)
        return h

    async def add_sites(self, *names: str) -> None:
        for name in names:
            site = HandSite(name, self.coord.address, self.pki)
            await site.join()
            self.sites[name] = site

    async def close(self) -> None:
        for site in self.sites.values():
            await site.close()
        for ch in self.channels.values():
            await ch.close()

    def federation(self, who: str) -> pb_grpc.FederationAsyncStub:
        return pb_grpc.FederationStub(self.channels[who])

    def admin(self, who: str = "admin") -> pb_grpc.AdminAsyncStub:
        return pb_grpc.AdminStub(self.channels[who])

    # -- from the Hypothesis thread -------------------------------------------------------------------------------
    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        try:
            return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=CALL_TIMEOUT + 20)
        except TimeoutError:
            raise AssertionError("the coordinator did not answer in time: a hang") from None

    def check(self, name: str, call: Callable[[], Awaitable[object]]) -> grpc.StatusCode:
        """Make one call: OK, or a proper refusal that changed nothing but the audit log's refusal events."""
        before = self.run(self._state())
        code, details = self.run(_status_of(call))
        if code is grpc.StatusCode.OK:
            self.accepted[name] = self.accepted.get(name, 0) + 1
            self.run(_settle())
            return code
        after = self.run(self._state())
        events_before, events_after = cast(list[Event], before.pop("audit")), cast(list[Event], after.pop("audit"))
        new_events = events_after[len(events_before) :]
        if code is grpc.StatusCode.INTERNAL and details == CORE_WRITE_RACE:
            # grpc/grpc#36066: the server refused an upload before the client had sent all of it, and the client's
            # next write turned the server's status into this one. The server's own answer is in the audit log.
            answers = [json.loads(detail)["code"] for kind, detail in new_events if kind == "rpc_refused"]
            code = grpc.StatusCode[answers[-1]] if answers else code
        self.refused[name] = self.refused.get(name, 0) + 1
        assert code is not grpc.StatusCode.DEADLINE_EXCEEDED, f"{name} hung: no answer within {CALL_TIMEOUT:g} s"
        assert code in REFUSALS, f"{name}: {code.name}: {details}"
        kinds = {kind for kind, _ in new_events}
        assert kinds <= REFUSAL_EVENTS, f"{name}: a refusal wrote {kinds}"
        for key in before:
            assert after[key] == before[key], f"{name} refused ({code.name}: {details}) but changed {key}"
        return code

    async def _state(self) -> dict[str, object]:
        return coordinator_state(self.coord)


async def _status_of(call: Callable[[], Awaitable[object]]) -> tuple[grpc.StatusCode, str]:
    try:
        await call()
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


async def _settle() -> None:
    """Let what an accepted call set going (a spawned round event, a stream's detach) finish before the next one."""
    for _ in range(3):
        await asyncio.sleep(0.005)


def coordinator_state(coord: CoordinatorDaemon) -> dict[str, object]:
    """Everything a refused request must leave alone, plus the audit kinds (which refusals may append to)."""
    c = coord.coordinator
    db = sqlite3.connect(f"file:{c.store.path}?mode=ro", uri=True)
    try:
        tables = {t: db.execute(f"SELECT * FROM {t} ORDER BY rowid").fetchall() for t in ("jobs", "rounds", "uploads")}
        tables["evaluations"] = db.execute("SELECT * FROM evaluations ORDER BY rowid").fetchall()
        audit = [(r[0], r[1]) for r in db.execute("SELECT kind, detail FROM audit ORDER BY seq")]
    finally:
        db.close()
    state: dict[str, object] = dict(tables)
    state["audit"] = audit
    state["sessions"] = [(s.site, s.session_id, s.declaration, s.streams, s.joined) for s in c.registry.sessions()]
    state["jobs_in_memory"] = sorted((j, r.state) for j, r in c.runners.items())
    spool = c.spool_root
    # Files only: an upload's round folder may stay behind empty (it goes with the round).
    state["spool"] = (
        sorted(str(p.relative_to(spool)) for p in spool.rglob("*") if p.is_file()) if spool.exists() else []
    )
    runner = c.runner
    if runner is not None:
        state["site_epsilon"] = dict(runner.privacy.site_epsilon)
        rnd = runner.current_round
        if rnd is not None:
            state["round"] = (
                rnd.number,
                rnd.attempt,
                rnd.state.phase,
                sorted(rnd.state.reported),
                sorted(rnd.state.lost),
                dict(rnd.accepted),
                sorted(rnd.in_flight),
                rnd.loss_sum,
                rnd.weight_sum,
                list(rnd.clip_bits),
                rnd.uploads_open,
                runner.machine.phase,
            )
            if rnd.secagg is not None:
                sa = rnd.secagg
                aborted = dict(rnd.secure.aborted) if rnd.secure is not None else {}
                state["secagg"] = (sorted(sa.expected), sorted(sa.answered), aborted, snapshot(sa.server))
        ev = runner.machine.evaluation
        if ev is not None:
            state["evaluation"] = (ev.number, ev.split, ev.version, sorted(ev.expected), dict(ev.reports))
    return state


def assert_clean_log(caplog: pytest.LogCaptureFixture) -> None:
    bad = [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.ERROR]
    assert not bad, "errors in the coordinator's log:\n" + "\n".join(bad)


def fuzz_settings(n: int) -> settings:
    return settings(
        max_examples=n * FUZZ_SCALE,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


async def in_thread(h: Harness, fuzz: Callable[[], None]) -> None:
    """Run the Hypothesis test ``fuzz`` off the event loop, then check the audit chain still verifies."""
    await asyncio.to_thread(fuzz)
    assert verify_database(h.coord.coordinator.store.path).ok
    assert sum(h.refused.values()) > 0


# ---------------------------------------------------------------------------------------------------------------
# Building valid requests to mutate
# ---------------------------------------------------------------------------------------------------------------


async def download(stub: pb_grpc.FederationAsyncStub, job_id: str, version: str) -> dict[str, torch.Tensor]:
    return await download_model(stub, job_id, version, timeout=CALL_TIMEOUT)


def upload(task: pb.TrainTask, enc: EncodedTensors, **header: object) -> tuple[pb.UpdateHeader, bytes]:
    return update_header(task, enc, **({"train_seconds": 1.0} | header)), bytes(enc.data)


def secure_upload(task: pb.TrainTask, enc: EncodedTensors) -> tuple[pb.UpdateHeader, bytes]:
    """A masked input's header: no count, metrics or timing in the clear (they travel as lanes)."""
    header = update_header(task, enc)
    header.num_samples, header.train_seconds = 0, 0.0
    header.metrics.clear()
    return header, bytes(enc.data)


def encoded(specs: Sequence[Spec], data: bytes) -> EncodedTensors:
    h = new_hasher(specs)
    h.update(data)
    return EncodedTensors(tuple(specs), data, h.hexdigest())


UPLOAD_OPS = (
    "as_is",
    "flip",
    "flip_and_rehash",
    "nan_and_rehash",
    "truncate",
    "extend",
    "no_data",
    "data_first",
    "header_twice",
    "only_data",
    "empty_chunk",
    "empty_stream",
    "chunk_oneof",
)


@st.composite
def upload_streams(draw: st.DrawFn, header: pb.UpdateHeader, data: bytes) -> list[pb.UpdateChunk]:
    """A valid upload after header mutations and/or stream-level damage (some of it with a matching digest)."""
    op = draw(st.sampled_from(UPLOAD_OPS))
    specs = [Spec(t.name, t.dtype, tuple(t.shape)) for t in header.manifest.tensors]
    h = pb.UpdateHeader()
    h.CopyFrom(header)
    if op in ("flip", "flip_and_rehash") and data:
        i = draw(st.integers(0, 1 << 16)) % len(data)
        data = data[:i] + bytes([data[i] ^ (1 << draw(st.integers(0, 7)))]) + data[i + 1 :]
    if op == "nan_and_rehash":
        data = np.full(len(data) // 4, np.nan, "<f4").tobytes()
    if op in ("flip_and_rehash", "nan_and_rehash"):
        h.manifest.sha256 = encoded(specs, data).sha256
    if op == "truncate":
        data = data[: draw(st.integers(0, 1 << 16)) % max(1, len(data))]
    if op == "extend":
        data += draw(st.binary(min_size=1, max_size=16))
    if draw(st.booleans()):
        h = draw(mutations(h))
    size = draw(st.sampled_from((4096, 64, 7, 1 << 20)))
    chunks = [pb.UpdateChunk(data=data[i : i + size]) for i in range(0, len(data), size)]
    msgs = [pb.UpdateChunk(header=h), *chunks]
    if op == "no_data":
        msgs = msgs[:1]
    elif op == "data_first":
        msgs = [*chunks, pb.UpdateChunk(header=h)]
    elif op == "header_twice":
        msgs.insert(1, pb.UpdateChunk(header=h))
    elif op == "only_data":
        msgs = chunks
    elif op == "empty_chunk":
        msgs.insert(1, pb.UpdateChunk(data=b""))
    elif op == "empty_stream":
        msgs = []
    elif op == "chunk_oneof" and msgs:
        i = draw(st.integers(0, len(msgs) - 1))
        msgs[i] = draw(mutations(msgs[i]))
    return msgs


async def _iterate(msgs: Sequence[T]) -> AsyncIterator[T]:
    for m in msgs:
        yield m


async def first_item(call: Any) -> None:
    """Read a server stream's first message (or its error), then cancel it: a valid work stream never ends."""
    async for _ in call:
        break
    call.cancel()


async def drain(call: Any) -> None:
    async for _ in call:
        pass


# ---------------------------------------------------------------------------------------------------------------
# The participant surface with a round open
# ---------------------------------------------------------------------------------------------------------------


async def round_harness(factory: CoordinatorFactory, pki: Pki, tmp_path: Path) -> tuple[Harness, pb.TrainTask]:
    """Sites a, b, c in round 1; c never uploads, so the round stays open (600 s deadline)."""
    job = job_config(rounds=2, min_sites=2, min_available_sites=3, round_timeout_s=600, wait_for_sites_s=600)
    h = await Harness.start(factory, pki, tmp_path / "state", job)
    try:
        await h.add_sites(A, B, C)
        task = (await h.sites[A].next("train")).train
        for s in (B, C):
            await h.sites[s].next("train")
    except BaseException:
        await h.close()
        raise
    return h, task


CALLERS = (A, B, D, UNLISTED, "admin")


async def test_fuzz_participant_calls_in_an_open_round(
    pki: Pki, tmp_path: Path, coordinator_factory: CoordinatorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    h, task = await round_harness(coordinator_factory, pki, tmp_path)
    runner = runner_of(h.coord)
    base = await download(h.sites[A].stub, task.job_id, task.model_version)
    zeros = encode({k: torch.zeros_like(v) for k, v in base.items()})
    valid = {
        "Join": join_request(),
        "WaitForWork": pb.WaitRequest(session_id=h.sites[A].session_id),
        "Heartbeat": pb.HeartbeatRequest(session_id=h.sites[A].session_id),
        "DownloadModel": pb.ModelRequest(job_id=task.job_id, model_version=task.model_version),
        "Decline": pb.DeclineRequest(job_id=task.job_id, round=task.round, attempt=task.attempt, reason="budget"),
        "SecAgg": pb.SecAggMessage(job_id=task.job_id, round=task.round, abort_reason="x"),
        "ReportEvaluation": pb.EvaluationReport(
            job_id=task.job_id, round=1, model_version=task.model_version, split="val", num_samples=5, accuracy=0.5
        ),
    }
    classes = {name: type(msg) for name, msg in valid.items()}
    header, data = upload(task, zeros)

    @fuzz_settings(260)
    @given(st.data())
    def fuzz(data_: st.DataObject) -> None:
        method = data_.draw(st.sampled_from(("UploadUpdate", "UploadUpdate", *sorted(valid))))
        # Joins and declines by a cohort site would (rightly) change the round: the cohort sites fuzz the rest.
        callers = {"Join": (D, UNLISTED, "admin"), "Decline": (A, D, UNLISTED, "admin")}.get(method, CALLERS)
        who = data_.draw(st.sampled_from(callers))
        stub = h.federation(who)
        if method == "UploadUpdate":
            msgs = data_.draw(upload_streams(header, data))
            h.check(method, lambda: stub.UploadUpdate(_iterate(msgs), timeout=CALL_TIMEOUT))
            return
        msg: Any = data_.draw(st.one_of(st.just(valid[method]), mutations(valid[method]), random_of(classes[method])))
        if method == "WaitForWork":
            wait = msg
            h.check(method, lambda: first_item(stub.WaitForWork(wait, timeout=CALL_TIMEOUT)))
            h.run(poll_until(lambda: _streams(h, A) == 1, what="the fuzzed work stream to detach"))
        elif method == "DownloadModel":
            h.check(method, lambda: drain(stub.DownloadModel(msg, timeout=CALL_TIMEOUT)))
        elif method == "Heartbeat":
            beat = msg
            h.check(method, lambda: stub.Heartbeat(beat, timeout=CALL_TIMEOUT))
        else:
            h.check(method, lambda: getattr(stub, method)(msg, timeout=CALL_TIMEOUT))

    try:
        await in_thread(h, fuzz)
        assert runner.state == "running"
        assert runner.current_round is not None
        assert h.accepted.get("UploadUpdate", 0) >= 1  # the unmutated upload of a and/or b went through
    finally:
        await h.close()
    assert_clean_log(caplog)


def _streams(h: Harness, site: str) -> int:
    return next(s.streams for s in h.coord.coordinator.registry.sessions() if s.site == site)


RAW_METHODS: dict[str, tuple[str, str]] = {  # method -> (service, kind)
    "Join": ("Federation", "unary_unary"),
    "WaitForWork": ("Federation", "unary_stream"),
    "Heartbeat": ("Federation", "unary_unary"),
    "DownloadModel": ("Federation", "unary_stream"),
    "UploadUpdate": ("Federation", "stream_unary"),
    "ReportEvaluation": ("Federation", "unary_unary"),
    "SecAgg": ("Federation", "unary_unary"),
    "Decline": ("Federation", "unary_unary"),
    "StartJob": ("Admin", "unary_unary"),
    "StopJob": ("Admin", "unary_unary"),
    "GetStatus": ("Admin", "unary_unary"),
}


async def test_fuzz_raw_request_bytes(
    pki: Pki, tmp_path: Path, coordinator_factory: CoordinatorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Bytes that are mutated encodings of valid requests, or random: protobuf decoding failures included."""
    h, task = await round_harness(coordinator_factory, pki, tmp_path)
    base = await download(h.sites[A].stub, task.job_id, task.model_version)
    header, data = upload(task, encode({k: torch.zeros_like(v) for k, v in base.items()}))
    valid: dict[str, Message] = {
        "Join": join_request(),
        "WaitForWork": pb.WaitRequest(session_id=h.sites[A].session_id),
        "Heartbeat": pb.HeartbeatRequest(session_id=h.sites[A].session_id),
        "DownloadModel": pb.ModelRequest(job_id=task.job_id, model_version=task.model_version),
        "UploadUpdate": pb.UpdateChunk(header=header),
        "ReportEvaluation": pb.EvaluationReport(job_id=task.job_id, round=1, split="val"),
        "SecAgg": pb.SecAggMessage(job_id=task.job_id, round=1, share_keys=pb.SecAggShareKeys()),
        "Decline": pb.DeclineRequest(job_id=task.job_id, round=1, attempt=0),
        "StartJob": pb.StartJobRequest(spec=valid_job_spec()),
        "StopJob": pb.StopJobRequest(job_id="no-such-job", reason="fuzz"),
        "GetStatus": pb.StatusRequest(),
    }

    @fuzz_settings(200)
    @given(st.data())
    def fuzz(data_: st.DataObject) -> None:
        method = data_.draw(st.sampled_from(sorted(RAW_METHODS)))
        service, kind = RAW_METHODS[method]
        who = "admin" if service == "Admin" else (D if method == "Join" else A)
        serialized = valid[method].SerializeToString()
        blob = data_.draw(st.one_of(edited_bytes(serialized), st.binary(max_size=64)))
        path = f"/cohort.v1.{service}/{method}"
        ch: Any = h.channels[who]  # a generic channel: requests and replies as bytes
        if kind == "unary_unary":
            h.check(method, lambda: ch.unary_unary(path)(blob, timeout=CALL_TIMEOUT))
        elif kind == "unary_stream":
            h.check(method, lambda: first_item(ch.unary_stream(path)(blob, timeout=CALL_TIMEOUT)))
            h.run(poll_until(lambda: _streams(h, A) == 1, what="the fuzzed work stream to detach"))
        else:  # an upload: the damaged message first, then the data
            tail = [pb.UpdateChunk(data=data).SerializeToString()]
            msgs = [blob, *tail]
            h.check(method, lambda: ch.stream_unary(path)(_iterate(msgs), timeout=CALL_TIMEOUT))

    try:
        await in_thread(h, fuzz)
        assert runner_of(h.coord).state == "running"
    finally:
        await h.close()
    assert_clean_log(caplog)


# ---------------------------------------------------------------------------------------------------------------
# Evaluation reports with an evaluation open
# ---------------------------------------------------------------------------------------------------------------


async def test_fuzz_evaluation_reports(
    pki: Pki, tmp_path: Path, coordinator_factory: CoordinatorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    job = job_config(rounds=2, min_sites=2, min_available_sites=2, round_timeout_s=600, wait_for_sites_s=600)
    h = await Harness.start(coordinator_factory, pki, tmp_path / "state", job)
    try:
        await h.add_sites(A, B)
        task = (await h.sites[A].next("train")).train
        await h.sites[B].next("train")
        await h.add_sites(C)  # connected after the cohort was drawn: evaluated, never reports
        base = await download(h.sites[A].stub, task.job_id, task.model_version)
        zeros = encode({k: torch.zeros_like(v) for k, v in base.items()})
        for s in (A, B):
            header, data = upload(task, zeros)
            msgs = [pb.UpdateChunk(header=header), pb.UpdateChunk(data=data)]
            await h.sites[s].stub.UploadUpdate(_iterate(msgs), timeout=CALL_TIMEOUT)
        ev = (await h.sites[A].next("evaluate")).evaluate
        await poll_until(lambda: runner_of(h.coord).machine.evaluation is not None, what="the evaluation to open")
        report = pb.EvaluationReport(
            job_id=ev.job_id,
            round=ev.round,
            model_version=ev.model_version,
            split=ev.split,
            num_samples=20,
            loss=0.3,
            accuracy=0.9,
            eval_seconds=0.1,
        )

        @fuzz_settings(150)
        @given(
            msg=st.one_of(st.just(report), mutations(report, max_steps=2), random_of(pb.EvaluationReport)),
            who=st.sampled_from(CALLERS),
        )
        def fuzz(msg: pb.EvaluationReport, who: str) -> None:
            h.check("ReportEvaluation", lambda: h.federation(who).ReportEvaluation(msg, timeout=CALL_TIMEOUT))

        await in_thread(h, fuzz)
        assert runner_of(h.coord).machine.evaluation is not None  # c never reported: still open
    finally:
        await h.close()
    assert_clean_log(caplog)


# ---------------------------------------------------------------------------------------------------------------
# Secure aggregation: stage 0 (advertisements), then stage 2 (masked inputs)
# ---------------------------------------------------------------------------------------------------------------


def _no_valid_abort(msg: pb.SecAggMessage, task: pb.TrainTask) -> pb.SecAggMessage:
    """An abort_reason for the open round is accepted and (rightly) fails the round: keep the round open."""
    if msg.WhichOneof("stage") == "abort_reason" and (msg.job_id, msg.round) == (task.job_id, task.round):
        msg.attempt = task.attempt + 1
    return msg


@pytest.mark.filterwarnings(CRYPTOGRAPHY_SERIAL_WARNING)  # a fuzzed cert_pem, see test_fuzz_decoders
async def test_fuzz_secure_aggregation(
    pki: Pki, tmp_path: Path, coordinator_factory: CoordinatorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    # 24-bit ring: every masked input is whole bytes (see the report on padding bits in the coordinator's fold).
    secagg = SecureAggregationConfig(enabled=True, bits=24, stage_timeout_s=600)
    job = job_config(
        rounds=2,
        min_sites=2,
        min_available_sites=3,
        round_timeout_s=600,
        wait_for_sites_s=600,
        secure_aggregation=secagg,
    )
    h = await Harness.start(coordinator_factory, pki, tmp_path / "state", job)
    try:
        await h.add_sites(A, B, C)
        tasks = {s: (await h.sites[s].next("train")).train for s in (A, B, C)}
        task = tasks[A]
        sessions = {s: SecAggSession.start(tasks[s], s, SiteKeys.load(pki.site(s))) for s in (A, B, C)}
        adverts = {s: sessions[s].advertise() for s in (A, B, C)}
        for s in (A, B):
            await h.sites[s].stub.SecAgg(adverts[s], timeout=CALL_TIMEOUT)
        rnd = runner_of(h.coord).current_round
        assert rnd is not None
        assert rnd.secagg is not None

        def secagg_fuzz(examples: int, base: dict[str, pb.SecAggMessage]) -> Callable[[], None]:
            @fuzz_settings(examples)
            @given(st.data())
            def fuzz(data_: st.DataObject) -> None:
                who = data_.draw(st.sampled_from(CALLERS))
                origin = data_.draw(st.sampled_from(sorted(base)))
                msg = data_.draw(
                    st.one_of(st.just(base[origin]), mutations(base[origin], max_steps=4), random_of(pb.SecAggMessage))
                )
                msg = _no_valid_abort(msg, task)
                h.check("SecAgg", lambda: h.federation(who).SecAgg(msg, timeout=CALL_TIMEOUT))

            return fuzz

        # Stage 0: a and b advertised, c has not; every message must decode and be checked without harm.
        await in_thread(h, secagg_fuzz(120, {A: adverts[A], B: adverts[B]}))
        assert rnd.secagg.server.stage.value == "advertise"

        # Stages 0 and 1 complete; the masked inputs are open, and c never sends one.
        await h.sites[C].stub.SecAgg(adverts[C], timeout=CALL_TIMEOUT)
        replies: dict[str, pb.SecAggMessage] = {}
        for s in (A, B, C):
            reply = sessions[s].on_step((await h.sites[s].next("secagg")).secagg)
            assert reply is not None
            replies[s] = reply
        for s in (A, B, C):
            await h.sites[s].stub.SecAgg(replies[s], timeout=CALL_TIMEOUT)
        for s in (A, B, C):
            assert sessions[s].on_step((await h.sites[s].next("secagg")).secagg) is None
        await poll_until(lambda: rnd.uploads_open, what="the masked inputs to open")
        base_model = await download(h.sites[A].stub, task.job_id, task.model_version)
        update = encode({k: torch.zeros_like(v) for k, v in base_model.items()})
        lanes = train_lane_values(10, 0.5, 0.5, 1)
        masked = {s: secure_upload(tasks[s], sessions[s].masked_update(update, 10, lanes)) for s in (A, B)}

        @fuzz_settings(100)
        @given(st.data())
        def fuzz_uploads(data_: st.DataObject) -> None:
            who = data_.draw(st.sampled_from((A, B, A, B, D)))
            header, data = masked[A if who == D else who]
            msgs = data_.draw(upload_streams(header, data))
            h.check("UploadUpdate", lambda: h.federation(who).UploadUpdate(_iterate(msgs), timeout=CALL_TIMEOUT))

        await in_thread(h, fuzz_uploads)
        shares = {s: replies[s] for s in (A, B)}
        await in_thread(h, secagg_fuzz(60, {**adverts, **{f"{s}-keys": m for s, m in shares.items()}}))
        assert rnd.secagg.server.stage.value == "masked_input"
        assert runner_of(h.coord).state == "running"
    finally:
        await h.close()
    assert_clean_log(caplog)


# ---------------------------------------------------------------------------------------------------------------
# The admin surface
# ---------------------------------------------------------------------------------------------------------------


def _steer_clear(spec: pb.JobSpec) -> pb.JobSpec:
    """Fuzzed task names import modules by name (an admin's job spec may name any installed task): keep them from
    importing anything but Cohort's own modules (relative module paths stay: they must be refused)."""
    task = spec.task
    if ":" in task and not task.startswith(("common.", "tests.", "no_such_module", ".")):
        task = task.replace(":", "_")
    spec.task = task
    return spec


JOB_TASKS = ("breast_cancer", "digits", "no_such_task", "common.tasks.base:load_task", "no_such_module_x:TASK", "")


async def test_fuzz_admin_calls(
    pki: Pki, tmp_path: Path, coordinator_factory: CoordinatorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    h = await Harness.start(coordinator_factory, pki, tmp_path / "state", None)
    coordinator = h.coord.coordinator
    spec = valid_job_spec()
    spec.min_sites, spec.wait_for_sites_s, spec.round_timeout_s = 2, 600, 600
    spec.privacy.target_epsilon, spec.privacy.noise_multiplier = 50.0, 2.0

    jobs = coordinator.jobs

    async def stop_all() -> None:
        # Empty the queue first: a queued job starts (and audits `job_started`) when the running one ends, and would
        # do so in the middle of the next call's before/after comparison.
        for row in jobs.queued():
            jobs.cancel(row["job_id"], "fuzz", "test")
        for runner in list(coordinator.runners.values()):
            if runner.state == "running":
                await runner.stop("fuzz")
        await asyncio.wait_for(jobs.wait(), CALL_TIMEOUT)

    @fuzz_settings(150)
    @given(st.data())
    def fuzz(data_: st.DataObject) -> None:
        method = data_.draw(st.sampled_from(("StartJob", "StartJob", "StopJob", "GetStatus")))
        who = data_.draw(st.sampled_from(("admin", "admin", "admin", A)))
        stub = h.admin(who)
        if method == "StartJob":
            start = pb.JobSpec()
            start.CopyFrom(spec)
            if data_.draw(st.booleans()):
                start.task = data_.draw(st.sampled_from(JOB_TASKS))
            job = data_.draw(st.one_of(mutations(start, max_steps=4), random_of(pb.JobSpec)))
            req = pb.StartJobRequest(spec=_steer_clear(job))
            keep_running = data_.draw(st.booleans())  # drawn whatever the outcome: the same draws on a replay
            code = h.check(method, lambda: stub.StartJob(req, timeout=CALL_TIMEOUT))
            if code is grpc.StatusCode.OK and not keep_running:
                h.run(stop_all())  # sometimes keep it running, so later starts meet a running job
        elif method == "StopJob":
            known = sorted(coordinator.runners)  # the draws below have the same shape however many jobs there are
            pick, job_id = data_.draw(st.integers(0, 7)), data_.draw(texts())
            if known and pick < 4:
                job_id = known[pick % len(known)]
            req_stop = pb.StopJobRequest(job_id=job_id, reason=data_.draw(texts()))
            h.check(method, lambda: stub.StopJob(req_stop, timeout=CALL_TIMEOUT))
            h.run(stop_all())
        else:
            h.check(method, lambda: stub.GetStatus(pb.StatusRequest(), timeout=CALL_TIMEOUT))

    try:
        await in_thread(h, fuzz)
        assert h.accepted.get("StartJob", 0) >= 1
        await stop_all()
    finally:
        await h.close()
    assert_clean_log(caplog)
