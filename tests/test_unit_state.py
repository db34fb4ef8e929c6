"""Unit tests of the coordinator's state pieces without a network: the session registry, resume planning over a
real model store and the in-memory store, and the participant-call handlers over a real Federation object."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support import SITES, Pki, coordinator_config, job_config

from common.certs import Role
from common.errors import FailedPrecondition, PermissionDenied
from common.proto.cohort.v1 import cohort_pb2 as pb
from common.serde import encode, state_dict_float32
from common.tasks.base import load_task
from common.tls import CertRef
from coordinator.federation import Federation
from coordinator.handlers import participant as handlers
from coordinator.state.memory_store import MemoryStore
from coordinator.state.model_store import ModelStore
from coordinator.state.registry import Declaration, Registry
from coordinator.state.resume import plan_resume, spool_dir

DECL = Declaration("breast_cancer", "sha256:code", "sha256:schema", "test")


# -- the session registry -----------------------------------------------------------------------------------------


def test_registry_tells_listeners_when_a_site_connects_and_goes() -> None:
    clock = [100.0]
    registry = Registry(clock=lambda: clock[0])
    events: list[tuple[str, bool]] = []
    registry.subscribe(lambda site, connected: events.append((site, connected)))
    session = registry.join("site-a", DECL)
    assert events == []  # joined, not yet connected: no work stream
    assert registry.attach("site-a", "wrong id") is None
    assert registry.attach("site-a", session.session_id) is session
    assert events == [("site-a", True)]
    assert registry.send("site-a", pb.WorkItem(heartbeat=pb.Heartbeat()))
    assert not registry.send("site-b", pb.WorkItem(heartbeat=pb.Heartbeat()))
    # A second Join replaces the session: the old stream ends; its detach tells no one (it is not current).
    replacement = registry.join("site-a", DECL)
    assert session.queue.get_nowait() is not None
    assert session.queue.get_nowait() is None
    registry.detach(session)
    assert events == [("site-a", True)]
    registry.attach("site-a", replacement.session_id)
    # Liveness: a heartbeating session silent for longer than the ttl is reported; drop() tells at once.
    assert registry.heartbeat("site-a", replacement.session_id)
    clock[0] += 10
    assert [s.site for s in registry.silent(5.0)] == ["site-a"]
    assert registry.drop("site-a") is replacement
    assert events[-1] == ("site-a", False)
    assert registry.connected() == []


# -- resume planning --------------------------------------------------------------------------------------------


def _model(seed: int) -> dict[str, torch.Tensor]:
    return state_dict_float32(load_task("breast_cancer").build_model(seed=seed))


def test_resume_plans_the_cut_off_evaluation_and_the_reopened_round(tmp_path: Path) -> None:
    store, models = MemoryStore(), ModelStore(tmp_path / "models")
    spec = job_config(evaluate_every=1)
    task = load_task("breast_cancer")
    initial = models.save(state_dict_float32(task.build_model(seed=spec.params.seed)), {"round": "0"})
    first = models.save(_model(11), {"round": "1"})
    store.create_job("j", "job", {}, initial.version)
    store.start_round("j", 1, 0, list(SITES[:2]), initial.version)
    store.finish_round("j", 1, 0, state="completed", reported=list(SITES[:2]), model_version=first.version)
    # The coordinator died during round 1's evaluation (no result recorded, no later round): it runs again.
    store.record_evaluation("j", 1, "val", "site-a", first.version, 7, 0.5, 0.75)
    point = plan_resume(
        "j", spec, task, store=store, models=models, spool_root=tmp_path / "spool", initial_version=initial.version
    )
    plan = point.plan
    assert (plan.number, plan.attempt, plan.completed, plan.evaluate) == (2, 0, 1, (1, 0))
    assert plan.stored_evaluations == {(1, "val", first.version): {"site-a": (7, 0.5, 0.75)}}
    assert point.model.version == first.version

    # Round 2 was open with one accepted upload whose spool file survived, and one whose file is damaged.
    store.set_round_eval("j", 1, 0, 0.5, 0.75, 7)
    store.start_round("j", 2, 0, list(SITES[:3]), first.version)
    folder = spool_dir(tmp_path / "spool", "j", 2, 0)
    folder.mkdir(parents=True)
    good = encode({k: torch.zeros_like(v) for k, v in _model(11).items()})
    (folder / "site-a.update").write_bytes(good.data)
    (folder / "site-b.update").write_bytes(good.data[:-4] + b"\x00\x00\x80\x7f")
    (folder / "site-c.update.part").write_bytes(b"half")
    for site in ("site-a", "site-b"):
        store.record_upload("j", 2, 0, site, sha256=good.sha256, num_samples=5, metrics={}, train_seconds=0.0)
    plan = plan_resume(
        "j", spec, task, store=store, models=models, spool_root=tmp_path / "spool", initial_version=initial.version
    ).plan
    assert plan.evaluate is None  # round 1's evaluation is recorded now
    assert plan.reopen_cohort == tuple(SITES[:3])
    assert [u["site"] for u in plan.uploads] == ["site-a"]  # site-b's file does not hash to its digest
    assert [u["site"] for u in store.uploads("j", 2, 0)] == ["site-a"]
    assert not (folder / "site-c.update.part").exists()
    assert [e["detail"]["site"] for e in store.audit_events("upload_lost")] == ["site-b"]
    assert plan.generation == 1


# -- handlers over a real Federation, without gRPC --------------------------------------------------------------


@pytest.fixture
def federation(pki: Pki, tmp_path: Path) -> Federation:
    return Federation(coordinator_config(pki, tmp_path / "state", sites=SITES[:2]))


def caller(name: str, role: Role = Role.PARTICIPANT) -> CertRef:
    return CertRef(role, name, 1, "00" * 32, "test")


async def test_join_checks_the_allow_list_once_and_audits_the_refusal(federation: Federation) -> None:
    request = pb.JoinRequest(task_name="breast_cancer", software_version="test")
    with pytest.raises(PermissionDenied, match="not on the allow-list of federation 'test'"):
        handlers.join(caller("site-z"), request, federation)
    assert [e["actor"] for e in federation.store.audit_events("join_refused")] == ["site-z"]
    reply = handlers.join(caller("site-a"), request, federation)
    assert (reply.site_id, reply.federation, reply.job_id) == ("site-a", "test", "")
    assert [s.site for s in federation.registry.sessions()] == ["site-a"]
    with pytest.raises(FailedPrecondition, match="call Join again"):
        handlers.heartbeat(caller("site-b"), pb.HeartbeatRequest(session_id=reply.session_id), federation)
    assert (
        handlers.heartbeat(caller("site-a"), pb.HeartbeatRequest(session_id=reply.session_id), federation) == pb.Ack()
    )
    with pytest.raises(FailedPrecondition, match="is not running"):
        handlers.download_model(caller("site-a"), pb.ModelRequest(job_id="nope"), federation)
    federation.close()
