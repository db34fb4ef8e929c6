"""Participant crash and reconnect: a site killed with SIGKILL in each phase of a round, then restarted.

The coordinator and two sites run in this process; the victim runs as a real ``cohort participant`` process over
mutual TLS with a failpoint armed (common/failpoints.py), so it dies exactly in the phase under test, in round
``KILL_ROUND``. Each test checks that the round the victim left completes with the others (before its deadline),
that nothing of a dead site's unfinished upload is counted or left in the spool, that the aggregate is exact
FedAvg over the sites the round counted, and that the victim, started again without the failpoint, rejoins and
reports in the next round. In one case the victim is back while its secure round is still open: it has lost that
round's keys, so it must bow out of the round at once rather than leave the coordinator waiting for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
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

import coordinator.round.runner
from common.proto.cohort.v1 import cohort_pb2 as pb
from common.secagg.encoding import EncodingParams, weight_of
from common.serde import encode
from common.tasks.base import TrainSettings, load_task, round_seed
from common.tasks.breast_cancer import BreastCancerTask
from coordinator.config import JobConfig, SecureAggregationConfig
from coordinator.daemon import CoordinatorDaemon
from coordinator.round.aggregation import UpdateSpool
from coordinator.state.store import RoundRow
from participant.site import LocalUpdate, Site

pytestmark = pytest.mark.slow

VICTIM = SITES[2]
OTHERS = SITES[:2]
KILL_ROUND = 2  # round 1 shows the victim working before the crash, round 3 shows it back
ROUNDS = 3
TIMEOUT_S = 20.0  # round deadline and secure-aggregation stage timeout: a dead site is not waited on for long
SECAGG = SecureAggregationConfig(enabled=True, clip=1.0, weight_cap=1000, stage_timeout_s=TIMEOUT_S)


WIDE_HIDDEN = 12_000  # 396,002 float32 parameters: an update of 1.5 MiB, two upload chunks of at most 1 MiB


class WideTask(BreastCancerTask):
    """breast_cancer with a hidden layer wide enough that an update spans two upload chunks.

    A site killed after its first chunk then leaves a stream that is really truncated; with the 4 KiB
    breast_cancer update, the first chunk would already be the whole update.
    """

    name = "breast_cancer_wide"

    def make_model(self) -> torch.nn.Module:
        return torch.nn.Sequential(
            torch.nn.Linear(len(self.schema.features), WIDE_HIDDEN),
            torch.nn.ReLU(),
            torch.nn.Linear(WIDE_HIDDEN, self.schema.num_classes),
        )


WIDE = WideTask()


@dataclass(frozen=True)
class Phase:
    failpoint: str
    secure: bool
    counted: bool  # the victim's (masked) input was accepted before it died, so the round counts it
    hold: bool  # keep the round open (one other site waits in training) until the victim's death is checked
    task: str = "breast_cancer"
    restart_in_round: bool = False  # start the victim again while the round it died in is still open

    @property
    def id(self) -> str:
        name = self.failpoint.removeprefix("participant.").removeprefix("secagg_")
        return ("secagg-" if self.secure else "plain-") + name + ("-restart_in_round" if self.restart_in_round else "")


PHASES = [
    Phase("participant.training", secure=False, counted=False, hold=True),
    Phase("participant.upload", secure=False, counted=False, hold=True, task=f"{__name__}:WIDE"),
    Phase("participant.secagg_advertised", secure=True, counted=False, hold=True),
    # It shared its keys, then died mid-way through its masked input: the others' pairwise masks with it are
    # removed with its mask key, rebuilt from their shares (a dropout recovered by secure aggregation).
    Phase("participant.upload", secure=True, counted=False, hold=True, task=f"{__name__}:WIDE"),
    # Back while its round is still open: it lost the round's keys, so it tells the coordinator it cannot go on
    # (instead of leaving the consistency check waiting for it), and its masked input still counts.
    Phase("participant.masked_sent", secure=True, counted=True, hold=True, restart_in_round=True),
    # The victim dies at stage 4, after every masked input arrived: nothing left to hold.
    Phase("participant.unmasking", secure=True, counted=True, hold=False),
]


@dataclass
class SpoolRecord:
    path: Path
    received: int = 0
    finished: bool = False
    discarded: bool = False


@pytest.fixture
def spools(monkeypatch: pytest.MonkeyPatch) -> list[SpoolRecord]:
    """Every upload spool the coordinator opens, and whether it was finished or discarded."""
    records: list[SpoolRecord] = []

    class RecordingSpool(UpdateSpool):
        def __init__(self, path: Path, *args: Any, **kwargs: Any) -> None:
            super().__init__(path, *args, **kwargs)
            self.record = SpoolRecord(path)
            records.append(self.record)

        def write(self, data: bytes) -> None:
            super().write(data)
            self.record.received = self.received

        def finish(self) -> Path:
            path = super().finish()
            self.record.finished = True
            return path

        def discard(self) -> None:
            super().discard()
            self.record.discarded = True

    monkeypatch.setattr(coordinator.round.runner, "UpdateSpool", RecordingSpool)
    return records


@pytest.fixture
async def victim(pki: Pki, site_data: dict[str, Path], tmp_path: Path) -> AsyncIterator[SiteProcess]:
    v = SiteProcess(tmp_path, pki, VICTIM, site_data[VICTIM])
    yield v
    await v.kill()


class Hold:
    """Makes a site wait in training in one round, so that round stays open while the test looks at it."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.release = threading.Event()

    def wrap(self, site: Site) -> None:
        real = site.train

        def train(tensors: dict[str, torch.Tensor], params: pb.TrainParams, *rest: Any) -> LocalUpdate:
            if params.seed == self.seed:
                self.release.wait(timeout=60)
            return real(tensors, params, *rest)

        site.train = train  # type: ignore[method-assign,assignment]


@contextlib.contextmanager
def released(hold: Hold) -> Iterator[None]:
    try:
        yield
    finally:
        hold.release.set()


def connected(coord: CoordinatorDaemon) -> set[str]:
    return {s.site for s in coord.coordinator.registry.connected()}


def victim_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob(f"{VICTIM}.*")) if directory.exists() else []


def expected_delta(
    sites: list[str], site_data: dict[str, Path], base: dict[str, torch.Tensor], seed: int, job: JobConfig
) -> tuple[np.ndarray, float]:
    """FedAvg of the given sites' updates, computed independently (clipped, capped weights under SecAgg)."""
    task = load_task(job.task)
    settings = TrainSettings(
        local_epochs=job.params.local_epochs,
        batch_size=job.params.batch_size,
        learning_rate=job.params.learning_rate,
        seed=seed,
    )
    secure = job.secure_aggregation.enabled
    total: np.ndarray | None = None
    weight_total = 0.0
    for site in sites:
        model = task.build_model(seed=0)
        model.load_state_dict(base)
        result = task.train(model, task.load_data(site_data[site]), settings)
        delta = {k: v.float() - base[k] for k, v in model.state_dict().items()}
        flat = np.frombuffer(encode(delta).data, dtype="<f4").astype(np.float64)
        if secure:
            w = weight_of(result.num_samples, job.secure_aggregation.weight_cap)
            flat = np.clip(flat, -job.secure_aggregation.clip, job.secure_aggregation.clip)
        else:
            w = float(result.num_samples)
        total = w * flat if total is None else total + w * flat
        weight_total += w
    assert total is not None
    return total / weight_total, weight_total


def check_aggregate(coord: CoordinatorDaemon, record: RoundRow, site_data: dict[str, Path], job: JobConfig) -> None:
    models = coord.coordinator.models
    base, final = models.load(record.base_version), models.load(record.model_version)
    seed = round_seed(job.params.seed, record.round)
    expected, weight_total = expected_delta(sorted(record.reported), site_data, base, seed, job)
    got = np.concatenate([(final[k].double() - base[k].double()).reshape(-1).numpy() for k in base])
    if job.secure_aggregation.enabled:
        enc = EncodingParams.choose(
            max_n=len(record.cohort), clip=job.secure_aggregation.clip, bits=job.secure_aggregation.bits
        )
        bound = enc.mean_error_bound(len(record.reported), weight_total) + 1e-6  # + float32 rounding of the model
    else:
        bound = 1e-6
    err = float(np.abs(got - expected).max())
    assert err <= bound, f"round {record.round}: max error {err} over {record.reported} exceeds {bound}"


@pytest.mark.parametrize("phase", PHASES, ids=[p.id for p in PHASES])
async def test_site_killed_mid_round_round_completes_and_site_rejoins(
    phase: Phase,
    pki: Pki,
    site_data: dict[str, Path],
    tmp_path: Path,
    coordinator_factory: CoordinatorFactory,
    participant_factory: ParticipantFactory,
    spools: list[SpoolRecord],
    victim: SiteProcess,
) -> None:
    # Every round waits for all three sites to be connected, but a round needs only two reports: the round the
    # victim dies in goes on without it, and the next one waits for it to come back.
    job = job_config(
        task=phase.task, rounds=ROUNDS, min_sites=2, min_available_sites=3, round_timeout_s=TIMEOUT_S, evaluate_every=0
    )
    if phase.secure:
        job = replace(job, secure_aggregation=SECAGG)
    coord = await coordinator_factory(coordinator_config(pki, tmp_path / "state", job=job))
    runner = runner_of(coord)
    store = coord.coordinator.store
    hold = Hold(round_seed(job.params.seed, KILL_ROUND))
    for site in OTHERS:
        daemon = await participant_factory(
            participant_config(pki.site(site), coord.address, site_data[site], phase.task)
        )
        if site == OTHERS[-1] and phase.hold:
            assert daemon.site is not None
            hold.wrap(daemon.site)

    with released(hold):
        await victim.start(coord.address, phase.task, f"{phase.failpoint}@{KILL_ROUND}")
        await victim.wait_killed(timeout=60)
        if phase.hold:
            # The round is still open (one site waits in training): the coordinator has noticed the dead site and
            # kept nothing of an unfinished upload.
            rnd = runner.current_round
            assert rnd is not None
            assert (rnd.number, rnd.attempt) == (KILL_ROUND, 0)
            await poll_until(
                lambda: VICTIM not in connected(coord) and VICTIM not in rnd.in_flight,
                timeout=10,
                what="the coordinator to notice the dead site",
            )
            accepted = [f"{VICTIM}.update"] if phase.counted else []
            await poll_until(
                lambda: victim_files(runner.spool_of(rnd.number, rnd.attempt)) == accepted,
                timeout=10,
                what=f"the spool of round {KILL_ROUND} to hold {accepted} of the dead site",
            )
            assert (VICTIM in rnd.state.reported) == phase.counted
        joins = len([e for e in store.audit_events("join") if e["actor"] == VICTIM])
        if phase.restart_in_round:
            await victim.start(coord.address, phase.task, None)
            await poll_until(lambda: VICTIM in connected(coord), timeout=30, what="the victim to rejoin mid-round")
            assert runner.current_round is rnd
        hold.release.set()
        await poll_until(
            lambda: any(r.round == KILL_ROUND and r.state != "training" for r in store.rounds(runner.job_id)),
            timeout=2 * TIMEOUT_S + 10,
            what=f"round {KILL_ROUND} to close",
        )

    rows = {(r.round, r.attempt): r for r in store.rounds(runner.job_id)}
    assert VICTIM in rows[(1, 0)].reported, "the victim did not take part before it was killed"
    kill_rows = [r for (n, _), r in rows.items() if n == KILL_ROUND]
    assert [(r.attempt, r.state) for r in kill_rows] == [(0, "completed")], [r.detail for r in kill_rows]
    record = kill_rows[0]
    # It closed as soon as everyone still alive had reported: no wait for the dead site until a deadline or a
    # secure-aggregation stage timeout.
    assert "deadline" not in record.detail, record.detail
    assert record.timings["train_s"] < TIMEOUT_S, record.timings
    assert sorted(record.cohort) == sorted([*OTHERS, VICTIM])
    counted = sorted([*OTHERS, VICTIM] if phase.counted else OTHERS)
    assert sorted(record.reported) == counted
    assert sorted(u["site"] for u in store.uploads(runner.job_id, KILL_ROUND, 0)) == counted
    # In a thread: training the reference models must not stall the event loop the daemons' heartbeats run on.
    await asyncio.to_thread(check_aggregate, coord, record, site_data, job)
    # An upload the victim began but never ended was spooled and thrown away, never finished.
    kill_dir = f"round-{KILL_ROUND}-0"
    victim_spools = [s for s in spools if s.path.name.startswith(VICTIM) and s.path.parent.name == kill_dir]
    if phase.failpoint == "participant.upload":
        assert victim_spools, "the coordinator never saw the victim's upload begin"
        assert all(s.discarded and not s.finished for s in victim_spools), victim_spools
    elif phase.counted:
        assert [s.finished for s in victim_spools] == [True]
    else:
        assert victim_spools == []
    assert not list(coord.coordinator.spool_root.glob(f"*/{kill_dir}/*.part"))  # (the next round may be uploading)

    if phase.restart_in_round and phase.secure:
        declined = [e for e in store.audit_events("site_declined") if e["actor"] == VICTIM]
        assert [e["detail"]["round"] for e in declined] == [KILL_ROUND], declined

    # Back without the failpoint: the site joins again over mutual TLS and reports in the next round.
    if not phase.restart_in_round:
        await victim.start(coord.address, phase.task, None)
    await poll_until(lambda: runner.state != "running", timeout=60, what="the job to finish")
    assert runner.state == "finished", f"{runner.detail}\n{victim.tail()}"
    assert VICTIM in connected(coord)
    assert len([e for e in store.audit_events("join") if e["actor"] == VICTIM]) > joins
    after = [r for r in store.rounds(runner.job_id) if r.round == KILL_ROUND + 1 and r.state == "completed"]
    assert [VICTIM in r.reported for r in after] == [True], victim.tail()
    await asyncio.to_thread(check_aggregate, coord, after[0], site_data, job)
    assert VICTIM in {u["site"] for u in store.uploads(runner.job_id, KILL_ROUND + 1, after[0].attempt)}
