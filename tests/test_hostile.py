"""Hostile and broken input the coordinator must survive: revoked certificates (a deny-list reloaded while it runs),
stalled or trickling uploads (slow-loris), Join floods, too many or too large chunks, and replayed upload headers.

Each refusal is checked for its gRPC status, a clear message, an audit event, and that nothing changed: no upload row,
no spooled file, the round still open (or closed as a dropout, for a revoked site) and the registry as it should be.
Sites are driven by hand over real mutual-TLS gRPC, like tests/test_uploads.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from cryptography import x509
from support import (
    SITES,
    CoordinatorFactory,
    ParticipantFactory,
    Pki,
    channel,
    coordinator_config,
    download_model,
    job_config,
    join_request,
    participant_config,
    poll_until,
    runner_of,
    update_messages,
)

from common.certs import fingerprint
from common.config import load
from common.errors import RETRY_AFTER_KEY, ConfigError, RateLimited
from common.proto.cohort.v1 import cohort_pb2 as pb
from common.proto.cohort.v1 import cohort_pb2_grpc as pb_grpc
from common.retry import Backoff
from coordinator.config import CoordinatorConfig, ServerConfig
from coordinator.daemon import CoordinatorDaemon
from coordinator.round.runner import JobRunner
from coordinator.rpc.denylist import DenyList, parse_deny_list
from coordinator.rpc.ratelimit import AuditThrottle, JoinLimiter
from participant.config import ReconnectConfig
from participant.connection import retry_after_s

A, B, C = SITES[:3]
CODE = grpc.StatusCode


# -- helpers -------------------------------------------------------------------------------------------------------
@dataclass
class HandSite:
    """A participant driven by hand: a joined session with its work stream open."""

    name: str
    stub: pb_grpc.FederationAsyncStub
    stream: Any  # grpc.aio.UnaryStreamCall[pb.WaitRequest, pb.WorkItem]

    async def next_train(self) -> pb.TrainTask:
        while True:
            item = await asyncio.wait_for(self.stream.read(), timeout=30)
            assert isinstance(item, pb.WorkItem), item
            if item.WhichOneof("kind") == "train":
                return item.train


async def hand_site(stack: contextlib.AsyncExitStack, address: str, pki: Pki, name: str) -> HandSite:
    ch = await stack.enter_async_context(channel(address, pki.site(name), pki.coordinator.ca))
    stub = pb_grpc.FederationStub(ch)
    joined = await stub.Join(join_request(), timeout=10)
    stream = stub.WaitForWork(pb.WaitRequest(session_id=joined.session_id))
    stack.callback(stream.cancel)
    first = await asyncio.wait_for(stream.read(), timeout=10)  # the first heartbeat: the site is connected
    assert isinstance(first, pb.WorkItem)
    return HandSite(name, stub, stream)


async def download(site: HandSite, task: pb.TrainTask) -> dict[str, torch.Tensor]:
    return await download_model(site.stub, task.job_id, task.model_version)


async def sent(
    msgs: Sequence[pb.UpdateChunk], *, gap_s: float = 0.0, stall_after: int | None = None, release: asyncio.Event
) -> AsyncIterator[pb.UpdateChunk]:
    """Send ``msgs`` with ``gap_s`` between them; after ``stall_after`` of them (all of them, at most), go silent
    until ``release``."""
    for i, msg in enumerate(msgs):
        if stall_after is not None and i == stall_after:
            break
        if gap_s and i:
            await asyncio.sleep(gap_s)
        yield msg
    if stall_after is not None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(release.wait(), timeout=30)


async def refused(call: Any, code: grpc.StatusCode, text: str) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, (text, info.value.code(), info.value.details())
    assert text in (info.value.details() or ""), (text, info.value.details())
    return info.value


def with_limits(config: CoordinatorConfig, **server: Any) -> CoordinatorConfig:
    return replace(config, server=replace(config.server, **server))


def assert_round_untouched(runner: JobRunner, what: str, number: int = 1) -> None:
    rnd = runner.current_round
    assert rnd is not None, what
    assert (rnd.number, rnd.state.open, rnd.state.reported, rnd.in_flight) == (number, True, set(), set()), what


def spooled_parts(coord: CoordinatorDaemon) -> list[Path]:
    return sorted(coord.coordinator.spool_root.rglob("*.part"))


def write_deny_list(path: Path, text: str) -> None:
    """Write beside and rename over, as docs/CONFIG.md recommends; the mtime changes with every write."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def last_refusal(coord: CoordinatorDaemon, actor: str) -> dict[str, Any]:
    events = [e for e in coord.coordinator.store.audit_events("rpc_refused") if e["actor"] == actor]
    assert events, f"no rpc_refused event for {actor}"
    return events[-1]


# -- deny-list -----------------------------------------------------------------------------------------------------
def test_deny_list_file_is_parsed_strictly() -> None:
    fp = "AB:" * 31 + "AB"
    deny = parse_deny_list(
        {"sites": ["site-c"], "serials": ["0x1F", "1f:2e", "ABC"], "fingerprints": [fp, "sha256:" + "cd" * 32]},
        "deny.yaml",
    )
    assert deny.sites == {"site-c"}
    assert deny.serials == {0x1F, 0x1F2E, 0xABC}
    assert deny.fingerprints == {"ab" * 32, "cd" * 32}
    assert parse_deny_list(None, "deny.yaml") == DenyList()
    assert parse_deny_list({"sites": None}, "deny.yaml") == DenyList()
    bad: list[tuple[object, str]] = [
        (["site-c"], "top level must be a mapping"),
        ({"site": ["site-c"]}, "site: unknown key"),
        ({"sites": "site-c"}, "sites: expected a list"),
        ({"sites": ["Site C"]}, "sites[0]"),
        ({"serials": [31]}, "serials[0]: expected a quoted hex string"),
        ({"serials": ["xyz"]}, "serials[0]: 'xyz' is not a hex serial"),
        ({"fingerprints": ["abcd"]}, "fingerprints[0]: a SHA-256 fingerprint has 64 hex digits"),
    ]
    for data, text in bad:
        with pytest.raises(ConfigError, match=None) as info:
            parse_deny_list(data, "deny.yaml")
        assert text in str(info.value), (text, str(info.value))
        assert str(info.value).startswith("deny.yaml: ")


async def test_broken_deny_list_at_start_up_stops_the_coordinator(pki: Pki, tmp_path: Path) -> None:
    config = coordinator_config(pki, tmp_path / "state")
    for text in (None, "sites: [site-c\n"):
        path = tmp_path / "deny.yaml"
        if text is not None:
            path.write_text(text)
        daemon = CoordinatorDaemon(replace(config, federation=replace(config.federation, deny_list=path)))
        with pytest.raises(ConfigError, match=r"federation\.deny_list: "):
            await daemon.start()
        assert daemon.address == ""


async def test_revoked_site_is_dropped_mid_round_and_refused_everywhere(
    pki: Pki, tmp_path: Path, coordinator_factory: CoordinatorFactory
) -> None:
    deny = tmp_path / "deny.yaml"
    deny.write_text("sites: []\n")
    job = job_config(rounds=1, min_sites=2, min_available_sites=3, evaluate_every=0, round_timeout_s=60)
    config = coordinator_config(pki, tmp_path / "state", job=job)
    config = replace(config, federation=replace(config.federation, deny_list=deny, deny_list_poll_s=0.05))
    coord = await coordinator_factory(config)
    runner, store, registry = runner_of(coord), coord.coordinator.store, coord.coordinator.registry
    release = asyncio.Event()
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(release.set)
        a, b, c = [await hand_site(stack, coord.address, pki, s) for s in (A, B, C)]
        task = await c.next_train()
        for s in (a, b):
            assert await s.next_train() == task
        base = await download(c, task)
        zeros = {k: torch.zeros_like(v) for k, v in base.items()}
        good = update_messages(task, zeros, chunk_bytes=512)
        # c is half-way through an upload when the operator revokes it.
        upload = asyncio.ensure_future(c.stub.UploadUpdate(sent(good, stall_after=3, release=release), timeout=30))
        await poll_until(lambda: spooled_parts(coord) != [], what="c's upload in flight")
        write_deny_list(deny, "# hospital c's key was stolen\nsites: [site-c]\n")

        # Its work stream ends with PERMISSION_DENIED, its in-flight upload is cut, its session is gone ...
        await refused(c.stream.read(), CODE.PERMISSION_DENIED, "certificate revoked: site 'site-c'")
        await refused(upload, CODE.PERMISSION_DENIED, "certificate revoked")
        assert C not in {s.site for s in registry.sessions()}
        # ... and in the open round it is a dropout; nothing of its upload remains.
        rnd = runner.current_round
        assert rnd is not None
        await poll_until(lambda: rnd.state.lost == {C}, what="c counted as a dropout")
        assert rnd.state.open
        assert store.uploads(runner.job_id, 1, 0) == []
        assert spooled_parts(coord) == []
        [revoked] = store.audit_events("site_revoked")
        assert revoked["actor"] == C
        assert "deny-list" in revoked["detail"]["reason"]
        assert store.audit_events("deny_list_loaded")[-1]["detail"]["sites"] == [C]

        # Every later call from c is refused before it reaches the domain, and audited.
        async with channel(coord.address, pki.site(C), pki.coordinator.ca) as ch:
            stub = pb_grpc.FederationStub(ch)
            await refused(stub.Join(join_request(), timeout=10), CODE.PERMISSION_DENIED, "certificate revoked")
            assert last_refusal(coord, C)["detail"]["method"] == "Join"
            ask = pb.ModelRequest(job_id=task.job_id, model_version=task.model_version)
            await refused(anext(aiter(stub.DownloadModel(ask))), CODE.PERMISSION_DENIED, "certificate revoked")
            assert last_refusal(coord, C)["detail"]["method"] == "DownloadModel"
            # The refusal comes before any message is read; a client still writing when it arrives would see
            # INTERNAL "Internal error from Core" instead (grpc/grpc#36066), so this one sends nothing and waits.
            upload_again = stub.UploadUpdate(sent(good, stall_after=0, release=release), timeout=10)
            await refused(upload_again, CODE.PERMISSION_DENIED, "certificate revoked")
        refusals = [e for e in store.audit_events("rpc_refused") if e["actor"] == C]
        assert {e["detail"]["code"] for e in refusals} == {"PERMISSION_DENIED"}
        assert C not in {s.site for s in registry.sessions()}

        # A broken file keeps the previous list: c stays revoked.
        errors_before = len(store.audit_events("deny_list_error"))
        write_deny_list(deny, "sites: [Site C]\n")
        await poll_until(lambda: len(store.audit_events("deny_list_error")) > errors_before, what="reload error")
        assert "sites[0]" in store.audit_events("deny_list_error")[-1]["detail"]["error"]
        assert coord.coordinator.revocations.current.sites == {C}

        # The round goes on without c: a and b upload, and it completes as 2 of 3.
        for s in (a, b):
            reply = await s.stub.UploadUpdate(sent(good, release=release), timeout=10)
            assert reply.accepted

        def round_record() -> str:
            return next((r.state for r in store.rounds(runner.job_id) if r.round == 1 and r.finished), "")

        await poll_until(lambda: round_record() != "", what="round 1 closed")
        [row] = store.rounds(runner.job_id)
        assert (row.state, row.reported, row.cohort) == ("completed", [A, B], [A, B, C]), row.detail
        assert sorted(u["site"] for u in store.uploads(runner.job_id, 1, 0)) == [A, B]
        await runner.stop("test over")  # (the final evaluation would wait for these hand-driven sites)

        # Lifting the revocation lets c join again.
        write_deny_list(deny, "sites: []\n")
        await poll_until(lambda: not coord.coordinator.revocations.current.sites, what="revocation lifted")
        async with channel(coord.address, pki.site(C), pki.coordinator.ca) as ch:
            assert (await pb_grpc.FederationStub(ch).Join(join_request(), timeout=10)).site_id == C


async def test_revocation_by_serial_and_fingerprint(
    pki: Pki, tmp_path: Path, coordinator_factory: CoordinatorFactory
) -> None:
    deny = tmp_path / "deny.yaml"
    deny.write_text("{}\n")
    config = coordinator_config(pki, tmp_path / "state")
    config = replace(config, federation=replace(config.federation, deny_list=deny, deny_list_poll_s=0.05))
    coord = await coordinator_factory(config)
    registry, store = coord.coordinator.registry, coord.coordinator.store

    def cert(path: Path) -> x509.Certificate:
        return x509.load_pem_x509_certificate(path.read_bytes())

    serial_a = f"{cert(pki.site(A).cert).serial_number:x}"  # as `cohort certs show` prints it
    fp_b = fingerprint(cert(pki.site(B).cert))  # colon-separated upper case, as openssl and `certs show` print it
    fp_admin = fingerprint(cert(pki.admin.cert))
    async with contextlib.AsyncExitStack() as stack:
        a, b, c = [await hand_site(stack, coord.address, pki, s) for s in (A, B, C)]
        assert len(registry.connected()) == 3
        write_deny_list(deny, f"serials: ['{serial_a}']\nfingerprints: ['{fp_b}', 'sha256:{fp_admin}']\n")
        await refused(a.stream.read(), CODE.PERMISSION_DENIED, f"certificate serial {serial_a} of participant")
        await refused(b.stream.read(), CODE.PERMISSION_DENIED, "certificate sha256")
        assert [s.site for s in registry.connected()] == [C]  # c's certificate is not on the list
        assert sorted(e["actor"] for e in store.audit_events("site_revoked")) == [A, B]
        heartbeat = await asyncio.wait_for(c.stream.read(), timeout=10)
        assert isinstance(heartbeat, pb.WorkItem)
        async with channel(coord.address, pki.admin, pki.coordinator.ca) as ch:
            await refused(
                pb_grpc.AdminStub(ch).GetStatus(pb.StatusRequest(), timeout=10),
                CODE.PERMISSION_DENIED,
                "of admin 'admin' is on the deny-list",
            )
        assert last_refusal(coord, "admin")["detail"]["method"] == "GetStatus"


async def test_revoked_participant_daemon_stops_with_the_reason(
    pki: Pki,
    tmp_path: Path,
    site_data: dict[str, Path],
    coordinator_factory: CoordinatorFactory,
    participant_factory: ParticipantFactory,
) -> None:
    coord = await coordinator_factory(coordinator_config(pki, tmp_path / "state"))
    daemon = await participant_factory(participant_config(pki.site(A), coord.address, site_data[A]))
    await poll_until(lambda: [s.site for s in coord.coordinator.registry.connected()] == [A], what="join")
    coord.coordinator.revocations.replace(DenyList(sites=frozenset({A})))
    await poll_until(lambda: daemon.error is not None, what="the daemon gives up")
    assert "PERMISSION_DENIED" in (daemon.error or "")
    assert "certificate revoked" in (daemon.error or "")  # not retried: retrying cannot fix a revocation
    assert coord.coordinator.registry.sessions() == []


def test_config_keys_load_and_are_checked(tmp_path: Path) -> None:
    path = tmp_path / "coordinator.yaml"
    path.write_text(
        "federation:\n  sites: [site-a]\n  deny_list: revoked.yaml\n  deny_list_poll_s: 0.5\n"
        "server:\n  tls: {ca: ca.crt, cert: tls.crt, key: tls.key}\n  upload_idle_timeout_s: 10\n"
        "  upload_deadline_s: 60\n  max_upload_chunks: 100\n  join_rate_per_min: 12\n  join_burst: 2\n"
    )
    config = load(CoordinatorConfig, path)
    assert config.federation.deny_list == Path("revoked.yaml")
    assert config.federation.deny_list_poll_s == 0.5
    server = config.server
    assert (server.upload_idle_timeout_s, server.upload_deadline_s, server.max_upload_chunks) == (10, 60, 100)
    assert (server.join_rate_per_min, server.join_burst, server.join_global_burst) == (12, 2, 0)
    bad = {
        "server.upload_idle_timeout_s=100": "upload_idle_timeout_s and upload_deadline_s",
        "server.max_upload_chunks=0": "server.max_upload_chunks",
        "server.join_burst=0": "server.join_burst",
        "server.join_rate_per_min=0": "server.join_rate_per_min",
        "federation.deny_list_poll_s=0": "federation.deny_list_poll_s",
        "federation.deny_list=7": "federation.deny_list: expected a file path",
    }
    for override, text in bad.items():
        with pytest.raises(ConfigError) as info:
            load(CoordinatorConfig, path, overrides=[override])
        assert text in str(info.value), (override, str(info.value))


# -- slow-loris ----------------------------------------------------------------------------------------------------
async def test_stalled_and_trickling_uploads_are_cut(
    pki: Pki, tmp_path: Path, coordinator_factory: CoordinatorFactory
) -> None:
    job = job_config(rounds=1, min_sites=2, min_available_sites=2, evaluate_every=0, round_timeout_s=60)
    config = with_limits(
        coordinator_config(pki, tmp_path / "state", job=job), upload_idle_timeout_s=1.0, upload_deadline_s=2.0
    )
    coord = await coordinator_factory(config)
    runner, store = runner_of(coord), coord.coordinator.store
    release = asyncio.Event()
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(release.set)
        a, b = [await hand_site(stack, coord.address, pki, s) for s in (A, B)]
        task = await a.next_train()
        zeros = {k: torch.zeros_like(v) for k, v in (await download(a, task)).items()}
        good = update_messages(task, zeros, chunk_bytes=64)  # 67 data chunks
        cases = [
            ("no header", sent(good, stall_after=0, release=release), "upload stalled: no message for 1 s"),
            ("stall mid-way", sent(good, stall_after=5, release=release), "upload stalled"),
            ("trickle", sent(good, gap_s=0.2, release=release), "upload not complete within 2 s"),
        ]
        for what, messages, text in cases:
            error = await refused(a.stub.UploadUpdate(messages, timeout=30), CODE.DEADLINE_EXCEEDED, text)
            assert "server.upload_" in (error.details() or ""), what
            assert "discarded" in (error.details() or ""), what
            assert store.uploads(runner.job_id, 1, 0) == [], what
            assert spooled_parts(coord) == [], what
            assert_round_untouched(runner, what)
            refusal = last_refusal(coord, A)["detail"]
            assert (refusal["method"], refusal["code"]) == ("UploadUpdate", "DEADLINE_EXCEEDED"), what
        # The stalled attempts left nothing behind: the same site's real upload goes through.
        reply = await a.stub.UploadUpdate(sent(update_messages(task, zeros), release=release), timeout=10)
        assert reply.accepted
        assert not reply.duplicate
        assert b.name == B


# -- too many / too large chunks, replays --------------------------------------------------------------------------
async def test_too_many_and_too_large_chunks_are_refused(
    pki: Pki, tmp_path: Path, coordinator_factory: CoordinatorFactory
) -> None:
    job = job_config(rounds=1, min_sites=2, min_available_sites=2, evaluate_every=0, round_timeout_s=60)
    limit = 64 << 10
    config = coordinator_config(pki, tmp_path / "state", job=job)
    config = with_limits(config, max_upload_chunks=8, max_chunk_bytes=limit)
    coord = await coordinator_factory(config)
    runner, store = runner_of(coord), coord.coordinator.store
    release = asyncio.Event()
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(release.set)
        a, _ = [await hand_site(stack, coord.address, pki, s) for s in (A, B)]
        task = await a.next_train()
        zeros = {k: torch.zeros_like(v) for k, v in (await download(a, task)).items()}
        header = update_messages(task, zeros)[0]
        cases: list[tuple[list[pb.UpdateChunk], grpc.StatusCode, str]] = [
            (update_messages(task, zeros, chunk_bytes=16)[:10], CODE.RESOURCE_EXHAUSTED, "more than 8 chunks"),
            (
                [header, pb.UpdateChunk(data=b"\0" * (limit + 1))],
                CODE.RESOURCE_EXHAUSTED,
                f"chunk of {limit + 1} bytes exceeds the limit of {limit} bytes (server.max_chunk_bytes)",
            ),
            ([header, pb.UpdateChunk(data=b"")], CODE.INVALID_ARGUMENT, "empty data chunk"),
        ]
        for msgs, code, text in cases:
            # Each stream ends with the message the server refuses and then stays open: a client write racing the
            # refusal would turn the client's status into INTERNAL "Internal error from Core" (grpc/grpc#36066).
            stream = sent(msgs, stall_after=len(msgs), release=release)
            await refused(a.stub.UploadUpdate(stream, timeout=10), code, text)
            assert store.uploads(runner.job_id, 1, 0) == []
            assert spooled_parts(coord) == []
            assert_round_untouched(runner, text)
            assert last_refusal(coord, A)["detail"]["code"] == code.name
        # Past gRPC's own message limit (max_chunk_bytes + 64 KiB) the transport refuses the message itself.
        huge = [header, pb.UpdateChunk(data=b"\0" * (3 * limit))]
        await refused(a.stub.UploadUpdate(sent(huge, release=release), timeout=10), CODE.RESOURCE_EXHAUSTED, "")
        await poll_until(lambda: store.audit_events("upload_cancelled") != [], what="the broken transfer audited")
        assert store.audit_events("upload_cancelled")[0]["detail"]["messages"] == 1  # the header got through
        assert store.uploads(runner.job_id, 1, 0) == []
        assert spooled_parts(coord) == []
        reply = await a.stub.UploadUpdate(sent(update_messages(task, zeros, chunk_bytes=1024), release=release))
        assert reply.accepted


async def test_replayed_upload_for_a_closed_round_is_refused(
    pki: Pki, tmp_path: Path, coordinator_factory: CoordinatorFactory
) -> None:
    job = job_config(rounds=3, min_sites=2, min_available_sites=2, evaluate_every=0, round_timeout_s=60)
    coord = await coordinator_factory(coordinator_config(pki, tmp_path / "state", job=job))
    runner, store = runner_of(coord), coord.coordinator.store
    release = asyncio.Event()
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(release.set)
        a, b = [await hand_site(stack, coord.address, pki, s) for s in (A, B)]
        task1 = await a.next_train()
        assert await b.next_train() == task1
        zeros = {k: torch.zeros_like(v) for k, v in (await download(a, task1)).items()}
        round1 = update_messages(task1, zeros)
        for s in (a, b):
            assert (await s.stub.UploadUpdate(sent(round1, release=release), timeout=10)).accepted
        task2 = await a.next_train()
        assert task2.round == 2

        # The round-1 upload replayed (by the site or anyone who recorded it) once round 2 is open ...
        replays = [
            (round1, "update is for round 1 attempt 0, but round 2 attempt 0 is open"),
            (update_messages(task1, zeros, round=2, attempt=1), "round 2 attempt 1, but round 2 attempt 0 is open"),
        ]
        for msgs, text in replays:
            await refused(a.stub.UploadUpdate(sent(msgs, release=release), timeout=10), CODE.FAILED_PRECONDITION, text)
            assert last_refusal(coord, A)["detail"]["code"] == "FAILED_PRECONDITION"
            assert sorted(u["site"] for u in store.uploads(runner.job_id, 1, 0)) == [A, B]
            assert store.uploads(runner.job_id, 2, 0) == []
            assert_round_untouched(runner, text, number=2)
        # ... and once the job is over.
        await runner.stop("test over")
        await poll_until(lambda: runner.state != "running", what="job stop")
        await refused(
            a.stub.UploadUpdate(sent(round1, release=release), timeout=10), CODE.FAILED_PRECONDITION, "is not running"
        )
        assert len(store.uploads(runner.job_id, 1, 0)) == 2


# -- join flood ----------------------------------------------------------------------------------------------------
async def test_join_flood_is_rate_limited_and_audited_once(
    pki: Pki, tmp_path: Path, coordinator_factory: CoordinatorFactory
) -> None:
    config = with_limits(
        coordinator_config(pki, tmp_path / "state"),
        join_rate_per_min=1.0,
        join_burst=3,
        join_global_rate_per_min=1.0,
        join_global_burst=5,
    )
    coord = await coordinator_factory(config)
    store, registry = coord.coordinator.store, coord.coordinator.registry

    async def joins(site: str, n: int) -> list[grpc.aio.AioRpcError | pb.JoinReply]:
        out: list[grpc.aio.AioRpcError | pb.JoinReply] = []
        async with channel(coord.address, pki.site(site), pki.coordinator.ca) as ch:
            stub = pb_grpc.FederationStub(ch)
            for _ in range(n):
                try:
                    out.append(await stub.Join(join_request(), timeout=10))
                except grpc.aio.AioRpcError as exc:
                    out.append(exc)
        return out

    flood = await joins(A, 10)
    assert all(isinstance(r, pb.JoinReply) for r in flood[:3])
    for r in flood[3:]:
        assert isinstance(r, grpc.aio.AioRpcError)
        assert r.code() == CODE.RESOURCE_EXHAUSTED
        assert "too many Join calls from 'site-a'" in (r.details() or "")
        assert "retry in" in (r.details() or "")
        trailing = dict(r.trailing_metadata() or ())
        assert int(trailing[RETRY_AFTER_KEY]) > 0
    # One audit event for the whole flood, and none of the refused calls reached the domain.
    [limited] = store.audit_events("join_rate_limited")
    assert limited["actor"] == A
    assert limited["detail"]["held_back"] == 0
    assert [e["actor"] for e in store.audit_events("join")] == [A] * 3
    assert store.audit_events("rpc_refused") == []
    assert [s.site for s in registry.sessions()] == [A]

    # The limit is per site: b still gets in, until the global bucket (5) runs dry for everyone.
    assert all(isinstance(r, pb.JoinReply) for r in await joins(B, 2))
    [rc] = await joins(C, 1)
    assert isinstance(rc, grpc.aio.AioRpcError)
    assert rc.code() == CODE.RESOURCE_EXHAUSTED
    assert "from all sites (server.join_global_rate_per_min)" in (rc.details() or "")
    assert [s.site for s in registry.sessions()] == [A, B]
    assert [e["actor"] for e in store.audit_events("join_rate_limited")] == [A, C]


async def test_participant_reconnects_through_the_join_limit(
    pki: Pki,
    tmp_path: Path,
    site_data: dict[str, Path],
    coordinator_factory: CoordinatorFactory,
    participant_factory: ParticipantFactory,
) -> None:
    # One token, refilled every 3 s: a raw Join takes it, so the daemon's first Join is refused.
    config = with_limits(coordinator_config(pki, tmp_path / "state"), join_rate_per_min=20.0, join_burst=1)
    coord = await coordinator_factory(config)
    async with channel(coord.address, pki.site(A), pki.coordinator.ca) as ch:
        await pb_grpc.FederationStub(ch).Join(join_request(), timeout=10)
    daemon = await participant_factory(participant_config(pki.site(A), coord.address, site_data[A]))
    await poll_until(lambda: [s.site for s in coord.coordinator.registry.connected()] == [A], what="reconnect")
    assert daemon.error is None
    assert coord.coordinator.store.audit_events("join_rate_limited")[0]["actor"] == A


def test_default_join_limits_fit_the_participant_backoff() -> None:
    """With the shipped defaults, a participant's reconnect loop (participant/daemon.py) never trips the limit
    when sessions last 2 s or more, and when they break at once it still gets in at the limit's pace."""
    server, reconnect = ServerConfig(), ReconnectConfig()

    def simulate(session_s: float, minutes: float) -> tuple[int, int, float]:
        now = 0.0
        limiter = JoinLimiter(
            server.join_rate_per_min, server.join_burst, server.join_global_rate_per_min, 100, clock=lambda: now
        )
        backoff = Backoff(reconnect.initial_backoff_s, reconnect.max_backoff_s, random.Random(1))
        ok = refused_n = 0
        last_ok, longest_gap = 0.0, 0.0
        while now < minutes * 60:
            try:
                limiter.take(A)
            except RateLimited:
                refused_n += 1
            else:
                ok += 1
                longest_gap, last_ok = max(longest_gap, now - last_ok), now
                now += session_s
                backoff.reset()  # the daemon resets its backoff on the first work item
            now += backoff.next_delay()
        return ok, refused_n, longest_gap

    ok, refused_n, _ = simulate(2.0, 30)
    assert refused_n == 0
    assert ok > 600
    ok, refused_n, gap = simulate(0.0, 30)
    assert refused_n > 0
    assert ok >= 30 * server.join_rate_per_min * 0.9  # about the sustained rate
    assert gap <= reconnect.max_backoff_s + 60 / server.join_rate_per_min


def test_audit_throttle_counts_what_it_holds_back() -> None:
    now = 0.0
    throttle = AuditThrottle(window_s=60, clock=lambda: now)
    assert throttle.admit(("join_rate_limited", A)) == 0
    assert [throttle.admit(("join_rate_limited", A)) for _ in range(5)] == [None] * 5
    assert throttle.admit(("join_rate_limited", B)) == 0  # per caller
    now = 61.0
    assert throttle.admit(("join_rate_limited", A)) == 5
    assert throttle.admit(("join_rate_limited", A)) is None


def test_participant_reads_the_retry_hint_of_a_rate_limited_join() -> None:
    def error(code: grpc.StatusCode, trailing: tuple[tuple[str, str], ...]) -> grpc.aio.AioRpcError:
        return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailing), "refused")

    limited = grpc.StatusCode.RESOURCE_EXHAUSTED
    assert retry_after_s(error(limited, ((RETRY_AFTER_KEY, "2500"),))) == 2.5
    assert retry_after_s(error(limited, ((RETRY_AFTER_KEY, "not a number"),))) == 0.0
    assert retry_after_s(error(limited, ((RETRY_AFTER_KEY, str(10**9)),))) == 300.0  # a hint is capped
    assert retry_after_s(error(limited, ())) == 0.0
    assert retry_after_s(error(grpc.StatusCode.UNAVAILABLE, ((RETRY_AFTER_KEY, "2500"),))) == 0.0
