"""Liveness under load: a busy site is not a dead site.

A site that has a task in hand may miss its heartbeats (starved of CPU, swapped out, its event loop held up) while
its connection is alive. The coordinator drops such a site only when HTTP/2 keepalive says its connection is dead or
its task's deadline passes, never for a late heartbeat; an idle site that stops heartbeating is still dropped
within one interval (tests/test_timeouts.py).

The end-to-end test freezes a real ``cohort participant`` process with SIGSTOP (a failpoint with the ``stop`` action,
so it freezes at an exact point of the round: in training, or half-way through its upload) for longer than the
coordinator's heartbeat budget and the site's own silence window (2 intervals + 1 s, after which an idle site
reconnects), and resumes it with SIGCONT: the round completes with that site.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from support import (
    SITES,
    CoordinatorFactory,
    ParticipantFactory,
    Pki,
    SiteProcess,
    coordinator_config,
    job_config,
    participant_config,
    poll_until,
    runner_of,
)

from common.proto.cohort.v1 import cohort_pb2 as pb
from common.tasks.breast_cancer import BreastCancerTask
from coordinator.state.registry import Declaration, Registry

HEARTBEAT_S = 2.0
FREEZE_S = 2 * HEARTBEAT_S + 2.0  # past the coordinator's heartbeat budget and the site's own silence window
KEEPALIVE_S = 15.0  # the frozen site's connection stays up for longer than the freeze
VICTIM = SITES[2]


class WideTask(BreastCancerTask):
    """breast_cancer with a hidden layer wide enough that an update spans two upload chunks (1.5 MiB)."""

    name = "breast_cancer_wide_liveness"

    def make_model(self) -> torch.nn.Module:
        return torch.nn.Sequential(
            torch.nn.Linear(len(self.schema.features), 12_000),
            torch.nn.ReLU(),
            torch.nn.Linear(12_000, self.schema.num_classes),
        )


WIDE = WideTask()


# -- the registry's rule, without a network -------------------------------------------------------------------------


def test_silence_drops_an_idle_site_but_not_one_with_a_task_in_hand() -> None:
    now = [1000.0]
    registry = Registry(clock=lambda: now[0])
    decl = Declaration("t", "d", "s", "v")
    for site in ("idle", "busy", "done"):
        session = registry.join(site, decl)
        assert registry.attach(site, session.session_id) is session
        assert registry.heartbeat(site, session.session_id)
    task = pb.WorkItem(train=pb.TrainTask(job_id="j", round=1, deadline_unix=1030.0))
    assert registry.send("busy", task)
    assert registry.send("done", pb.WorkItem(evaluate=pb.EvaluateTask(job_id="j", deadline_unix=1003.0)))
    assert registry.send("idle", pb.WorkItem(heartbeat=pb.Heartbeat()))  # not work: no exemption
    now[0] += 10  # all three silent for 10 s, past a 5 s budget
    assert sorted(s.site for s in registry.silent(5.0)) == ["done", "idle"]  # done's task deadline has passed
    now[0] += 25  # busy's task deadline (1030) has passed too
    assert sorted(s.site for s in registry.silent(5.0)) == ["busy", "done", "idle"]


# -- end to end: a participant process frozen mid-round -------------------------------------------------------------


@pytest.fixture
async def victim(pki: Pki, site_data: dict[str, Path], tmp_path: Path) -> AsyncIterator[SiteProcess]:
    v = SiteProcess(tmp_path, pki, VICTIM, site_data[VICTIM])
    yield v
    await v.kill()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("failpoint", "task"),
    [("participant.training", "breast_cancer"), ("participant.upload", f"{__name__}:WIDE")],
    ids=["training", "uploading"],
)
async def test_site_frozen_past_the_heartbeat_budget_mid_round_still_counts(
    failpoint: str,
    task: str,
    pki: Pki,
    site_data: dict[str, Path],
    tmp_path: Path,
    coordinator_factory: CoordinatorFactory,
    participant_factory: ParticipantFactory,
    victim: SiteProcess,
) -> None:
    job = job_config(task=task, rounds=2, min_sites=2, min_available_sites=3, round_timeout_s=60, evaluate_every=0)
    config = coordinator_config(pki, tmp_path / "state", job=job, heartbeat_s=HEARTBEAT_S)
    config = replace(config, server=replace(config.server, keepalive_timeout_s=KEEPALIVE_S))
    coord = await coordinator_factory(config)
    runner = runner_of(coord)
    registry, store = coord.coordinator.registry, coord.coordinator.store
    for site in SITES[:2]:
        await participant_factory(participant_config(pki.site(site), coord.address, site_data[site], task))
    await victim.start(coord.address, task, f"{failpoint}@1:stop")

    await poll_until(victim.stopped, timeout=90, what=f"the victim to freeze at {failpoint}\n{victim.tail()}")
    frozen_at = time.monotonic()
    rnd = runner.current_round
    assert rnd is not None
    assert rnd.number == 1
    assert VICTIM in rnd.state.cohort
    assert VICTIM not in rnd.state.reported
    # Frozen for three seconds past the heartbeat budget: the coordinator keeps the site in the round all along.
    deadline = frozen_at + FREEZE_S

    def still_there_until_thawed() -> bool:
        sessions = {s.site: s for s in registry.connected()}
        assert VICTIM in sessions, f"the frozen site was dropped after {time.monotonic() - frozen_at:.1f}s"
        assert VICTIM not in rnd.state.lost
        assert rnd.state.open, "the round closed without the frozen site"
        return time.monotonic() >= deadline

    await poll_until(still_there_until_thawed, timeout=FREEZE_S + 5, interval=0.05, what="the freeze to last")
    silent_for = time.time() - next(s.heard for s in registry.connected() if s.site == VICTIM)
    assert silent_for > HEARTBEAT_S, f"the site was heard from {silent_for:.1f}s ago: the freeze did not silence it"
    victim.resume()

    await poll_until(lambda: runner.state != "running", timeout=60, what=f"the job to finish\n{victim.tail()}")
    assert runner.state == "finished", f"{runner.detail}\n{victim.tail()}"
    rounds = store.rounds(runner.job_id)
    assert [(r.round, r.attempt, r.state) for r in rounds] == [(1, 0, "completed"), (2, 0, "completed")]
    assert VICTIM in rounds[0].reported, rounds[0].detail
    assert sorted(rounds[1].reported) == sorted(SITES[:3])
    assert store.audit_events("site_timed_out") == []
