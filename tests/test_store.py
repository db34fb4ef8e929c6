"""One contract for the coordinator's store, held by both implementations: SQLite (the daemon's) and in-memory."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.state.audit import verify_rows
from coordinator.state.memory_store import MemoryStore
from coordinator.state.store import SqliteStore, Store


@pytest.fixture(params=["sqlite", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    s: Store = SqliteStore(tmp_path / "coordinator.db") if request.param == "sqlite" else MemoryStore()
    yield s
    s.close()


def test_jobs_are_created_updated_and_listed_in_order(store: Store) -> None:
    store.create_job("j1", "first", {"task": "t", "rounds": 2}, "sha256:a")
    store.create_job("j2", "second", {"task": "t"}, "sha256:b")
    store.update_job("j1", state="finished", detail="done", test_accuracy=0.5, site_aborts='{"aborts": {"s": 1}}')
    jobs = store.jobs()
    assert [j["job_id"] for j in jobs] == ["j1", "j2"]
    j1 = store.job("j1")
    assert j1 is not None
    assert (j1["state"], j1["detail"], j1["test_accuracy"], j1["spec"]) == (
        "finished",
        "done",
        0.5,
        {"task": "t", "rounds": 2},
    )
    assert j1["site_aborts"] == {"aborts": {"s": 1}}
    assert store.job("nope") is None
    with pytest.raises(ValueError, match="unknown job fields"):
        store.update_job("j1", name="renamed")


def test_a_completed_round_commits_model_and_privacy_state_with_it(store: Store) -> None:
    store.create_job("j", "job", {}, "sha256:0")
    store.start_round("j", 1, 0, ["a", "b"], "sha256:0")
    store.finish_round("j", 1, 0, state="failed", reported=["a"], detail="too few", timings={"train_s": 1.0})
    store.start_round("j", 1, 1, ["a", "b"], "sha256:0")
    store.finish_round(
        "j",
        1,
        1,
        state="completed",
        reported=["b", "a"],
        model_version="sha256:1",
        train_loss=0.25,
        train_samples=10,
        epsilon=1.5,
        privacy_state={"accountant": "x"},
    )
    store.set_round_eval("j", 1, 1, 0.5, 0.75, 8)
    rounds = store.rounds("j")
    assert [(r.round, r.attempt, r.state) for r in rounds] == [(1, 0, "failed"), (1, 1, "completed")]
    assert rounds[0].detail == "too few"
    assert rounds[0].timings == {"train_s": 1.0}
    done = rounds[1]
    assert (done.reported, done.model_version, done.train_loss, done.epsilon) == (["a", "b"], "sha256:1", 0.25, 1.5)
    assert (done.val_loss, done.val_accuracy, done.val_samples) == (0.5, 0.75, 8)
    job = store.job("j")
    assert job is not None
    assert (job["current_round"], job["model_version"], job["epsilon"]) == (1, "sha256:1", 1.5)
    assert job["privacy_state"] == {"accountant": "x"}
    store.discard_round("j", 1, 1, "damaged")
    store.start_round("j", 2, 0, ["a"], "sha256:1")
    store.abandon_round("j", 2, 0, "restart")
    assert [r.state for r in store.rounds("j")] == ["failed", "discarded", "failed"]


def test_uploads_and_evaluations(store: Store) -> None:
    store.record_upload("j", 1, 0, "b", sha256="x", num_samples=3, metrics={"loss": 1.0}, train_seconds=0.5)
    store.record_upload("j", 1, 0, "a", sha256="y", num_samples=4, metrics={}, train_seconds=0.0)
    with pytest.raises(Exception):  # noqa: B017, PT011 - a second upload of a site for one attempt is a bug
        store.record_upload("j", 1, 0, "a", sha256="z", num_samples=4, metrics={}, train_seconds=0.0)
    assert [(u["site"], u["num_samples"], u["metrics"]) for u in store.uploads("j", 1, 0)] == [
        ("a", 4, {}),
        ("b", 3, {"loss": 1.0}),
    ]
    store.forget_upload("j", 1, 0, "a")
    assert [u["site"] for u in store.uploads("j", 1, 0)] == ["b"]
    store.record_evaluation("j", 1, "val", "b", "sha256:1", 5, 0.1, 0.9)
    store.record_evaluation("j", 1, "val", "a", "sha256:1", 6, 0.2, 0.8)
    store.record_evaluation("j", 2, "test", "a", "sha256:2", 6, 0.3, 0.7)
    assert [e["site"] for e in store.evaluations("j", 1, "val")] == ["a", "b"]
    assert [(e["round"], e["split"]) for e in store.evaluation_rows("j")] == [(1, "val"), (1, "val"), (2, "test")]


def test_the_audit_log_is_hash_chained(store: Store) -> None:
    store.audit("join", "site-a", task="t")
    store.audit("job_started", "coordinator", job_id="j")
    events = store.audit_events()
    assert [e["kind"] for e in events] == ["join", "job_started"]
    assert events[0]["detail"] == {"task": "t"}
    assert [e["kind"] for e in store.audit_events("join")] == ["join"]
    raw = [dict(e) | {"detail": json.dumps(e["detail"], sort_keys=True)} for e in events]
    assert verify_rows(raw).ok
