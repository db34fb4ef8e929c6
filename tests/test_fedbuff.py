"""Asynchronous rounds (FedBuff) through real daemons over mutual TLS: with one site five times slower than the others,
the job makes its model versions in less wall time than synchronous FedAvg, at comparable accuracy; stale updates are
weighted down and recorded with their staleness. The same with secure aggregation (each buffer one SecAgg+ instance,
coordinator/round/buffered.py), and a coordinator crash while a buffer's instance is in flight."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from support import (
    SITES,
    CoordinatorFactory,
    ParticipantFactory,
    Pki,
    coordinator_config,
    job_config,
    participant_config,
    poll_until,
    runner_of,
)
from test_coordinator_crash import SECURE, federate, make_run

from common.settings import TrainParamsConfig
from coordinator.config import JobConfig, SecureAggregationConfig
from coordinator.daemon import CoordinatorDaemon
from coordinator.state.resume import RESTART_DETAIL
from coordinator.strategy.config import StrategyConfig
from participant.daemon import ParticipantDaemon
from participant.site import LocalUpdate

pytestmark = pytest.mark.slow

FAST_S, SLOW_S = 0.15, 0.75  # added to each local training: one site is 5x slower


def slow_down(daemon: ParticipantDaemon, seconds: float) -> None:
    site = daemon.site
    assert site is not None
    train = site.train

    def slower(*args: Any, **kwargs: Any) -> LocalUpdate:
        time.sleep(seconds)  # a worker thread: the site's event loop keeps its heartbeats going
        return train(*args, **kwargs)

    site.train = slower  # type: ignore[method-assign]


async def timed_job(
    job: JobConfig,
    pki: Pki,
    site_data: dict[str, Path],
    state: Path,
    coordinator_factory: CoordinatorFactory,
    participant_factory: ParticipantFactory,
) -> tuple[CoordinatorDaemon, float]:
    coord = await coordinator_factory(coordinator_config(pki, state, job=job))
    for site in SITES:
        daemon = await participant_factory(participant_config(pki.site(site), coord.address, site_data[site]))
        slow_down(daemon, SLOW_S if site == "site-e" else FAST_S)
    runner = runner_of(coord)
    await poll_until(lambda: runner.current_round is not None, timeout=60, what="the first round")
    started = time.monotonic()
    await poll_until(lambda: runner.state != "running", timeout=240, what="the job to finish")
    assert runner.state == "finished", runner.detail
    return coord, time.monotonic() - started


async def test_fedbuff_beats_synchronous_rounds_with_a_slow_site(
    pki: Pki,
    site_data: dict[str, Path],
    tmp_path: Path,
    coordinator_factory: CoordinatorFactory,
    participant_factory: ParticipantFactory,
) -> None:
    base: dict[str, Any] = {
        "rounds": 12,
        "min_sites": 3,
        "evaluate_every": 0,
        "params": TrainParamsConfig(local_epochs=1, batch_size=16, learning_rate=0.05, seed=3),
    }
    sync_job = job_config(**base)
    sync, sync_s = await timed_job(
        sync_job, pki, site_data, tmp_path / "sync", coordinator_factory, participant_factory
    )
    sync_acc = float(sync.coordinator.store.jobs()[-1]["test_accuracy"])
    await sync.close("next run")

    strategy = StrategyConfig(mode="async", buffer_size=3, max_staleness=4)
    async_job = job_config(**base, strategy=strategy)
    fedbuff, async_s = await timed_job(
        async_job, pki, site_data, tmp_path / "async", coordinator_factory, participant_factory
    )
    store = fedbuff.coordinator.store
    row = store.jobs()[-1]
    async_acc = float(row["test_accuracy"])
    print(f"12 versions: sync {sync_s:.2f} s acc {sync_acc:.4f}; FedBuff {async_s:.2f} s acc {async_acc:.4f}")
    assert async_s < sync_s
    assert async_acc >= sync_acc - 0.03

    rounds = [r for r in store.rounds(row["job_id"]) if r.state == "completed"]
    assert [r.round for r in rounds] == list(range(1, 13))
    stale = []
    for r in rounds:
        ups = store.uploads(row["job_id"], r.round, r.attempt)
        assert len(ups) >= 3  # a buffer of 3
        stale += [int(u["metrics"]["staleness"]) for u in ups]
        assert all(0 <= s <= strategy.max_staleness for s in stale)
    assert max(stale) >= 1  # the slow site's updates arrive a version or more late and still count


async def test_fedbuff_with_secure_aggregation_beats_synchronous_secure_rounds_with_a_slow_site(
    pki: Pki,
    site_data: dict[str, Path],
    tmp_path: Path,
    coordinator_factory: CoordinatorFactory,
    participant_factory: ParticipantFactory,
) -> None:
    """Each buffer of 3 ready sites is one secure-aggregation instance (coordinator/round/buffered.py): the
    coordinator sees sums only, and still the slow site does not hold every version back."""
    versions = 12
    secagg = SecureAggregationConfig(enabled=True, clip=1.0, weight_cap=1000, stage_timeout_s=30)
    base: dict[str, Any] = {
        "rounds": versions,
        "min_sites": 3,
        "evaluate_every": 0,
        "secure_aggregation": secagg,
        "params": TrainParamsConfig(local_epochs=1, batch_size=16, learning_rate=0.05, seed=3),
    }
    sync, sync_s = await timed_job(
        job_config(**base), pki, site_data, tmp_path / "sync", coordinator_factory, participant_factory
    )
    sync_acc = float(sync.coordinator.store.jobs()[-1]["test_accuracy"])
    await sync.close("next run")

    strategy = StrategyConfig(mode="async", buffer_size=3, max_staleness=4)
    fedbuff, async_s = await timed_job(
        job_config(**base, strategy=strategy),
        pki,
        site_data,
        tmp_path / "async",
        coordinator_factory,
        participant_factory,
    )
    store = fedbuff.coordinator.store
    row = store.jobs()[-1]
    async_acc = float(row["test_accuracy"])
    print(
        f"{versions} versions with secure aggregation: sync {sync_s:.2f} s acc {sync_acc:.4f}; "
        f"FedBuff {async_s:.2f} s acc {async_acc:.4f}"
    )
    assert async_s < sync_s
    assert async_acc >= sync_acc - 0.03

    rounds = [r for r in store.rounds(row["job_id"]) if r.state == "completed"]
    assert [r.round for r in rounds] == list(range(1, versions + 1))
    stale = []
    for r in rounds:
        ups = store.uploads(row["job_id"], r.round, r.attempt)
        assert len(ups) == 3  # one instance over the buffer of 3
        assert all(set(u["metrics"]) <= {"staleness"} for u in ups)  # masked: no loss, no counts in the clear
        stale += [int(u["metrics"]["staleness"]) for u in ups]
    assert all(0 <= s <= strategy.max_staleness for s in stale)
    assert max(stale) >= 1  # the slow site's updates arrive a version or more late and still count


async def test_a_secure_buffer_in_flight_at_a_crash_is_abandoned_and_its_sites_train_again(
    tmp_path: Path, pki: Pki, site_data: dict[str, Path]
) -> None:
    """The coordinator dies while version 2's buffer is being unmasked. Its instance cannot continue (its keys and
    masked sum died with the process), so the attempt is recorded as failed; every site trains again on the newest
    model, and the retried attempt is a new instance over the first 3 sites ready again."""
    job = {
        "strategy": {"mode": "async", "buffer_size": 3, "max_staleness": 2},
        "min_sites": 3,
        "evaluate_every": 0,
        **SECURE,
    }
    run = make_run(tmp_path / "run", pki, job)
    await federate(run, pki, site_data, crashes=("coordinator.unmasking@2",))
    row = run.job()
    assert row["state"] == "finished", row["detail"]
    assert "job_resumed" in run.audit_kinds()
    rounds = [(r["round"], r["attempt"], r["state"], r["detail"]) for r in run.rounds()]
    assert any(n == 2 and state == "failed" and detail == RESTART_DETAIL for n, _, state, detail in rounds), rounds
    completed = [r for r in run.rounds() if r["state"] == "completed"]
    assert [r["round"] for r in completed] == [1, 2]
    assert completed[1]["attempt"] >= 1
    for r in completed:
        ups = [u for u in run.uploads() if (u["round"], u["attempt"]) == (r["round"], r["attempt"])]
        assert len(ups) == 3  # one instance over a buffer of 3
        assert all(set(json.loads(u["metrics"])) <= {"staleness"} for u in ups)  # masked: nothing else in the clear
    # Every site trained once before the crash at least, and the sites of the abandoned instance again after it.
    assert sum(run.trainings.values()) >= 3 + 3 + 3
