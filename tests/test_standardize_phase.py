"""The coordinator's feature-statistics phase (job.standardize; coordinator/round/standardize.py), driven event by
event through the job's state machine with real site-side SecAgg sessions: the scaling comes from the secure sum's
totals only, equals the pooled statistics' scaling, is stored on the job row and sent with every task that follows;
a job that already holds a scaling skips the phase; a phase that cannot finish is retried, then fails the job."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support import SITES as SUPPORT_SITES
from support import (
    CoordinatorFactory,
    ParticipantFactory,
    Pki,
    coordinator_config,
    job_config,
    participant_config,
    poll_until,
    runner_of,
)
from test_machine import (
    IDENTITY,
    SPECS,
    T0,
    Sites,
    aggregated,
    connect,
    header,
    of,
    secure_spec,
    sent,
    spec,
    upload,
)
from test_secagg_protocol import federation

from common.errors import FailedPrecondition, InvalidArgument
from common.proto.cohort.v1 import cohort_pb2 as pb
from common.secagg.lanes import LaneLayout
from common.secagg_wire import STATS_INSTANCE_BASE, STATS_SPLIT, secagg_round_no, setup_from_proto
from common.serde import Spec
from common.site_comparison import federated_scaling
from common.tasks.base import load_task
from common.tasks.setup import TaskSetup
from common.tasks.standardize import (
    MAX_STATISTICS_ROWS,
    FeatureScaling,
    StatisticsSpec,
    derive_scaling,
    site_statistics,
    statistics_lane_values,
)
from coordinator.config import JobConfig, SecureAggregationConfig, StandardizeConfig
from coordinator.round.events import (
    Action,
    Audit,
    Failpoint,
    FinishJob,
    JobState,
    Phase,
    Progress,
    RecordRoundStart,
    Start,
    StopRequested,
    Tick,
    UpdateJob,
    UploadStarted,
    UploadVerified,
)
from coordinator.round.machine import JobMachine, JobSetup
from coordinator.round.privacy import JobPrivacy

STATS = StatisticsSpec(((0.0, 10.0), (-5.0, 5.0)), bins=8)
BASE = "sha256:" + "0" * 64


def standardizing(job: JobConfig, sites: int = 4, scaling: FeatureScaling | None = None) -> JobMachine:
    privacy = JobPrivacy(
        job.privacy, sites, job.fraction, secure_aggregation=job.secure_aggregation, min_survivors=job.min_sites
    )
    privacy.model_numel = sum(s.numel for s in SPECS)
    setup = JobSetup(
        "job-1", job, IDENTITY, SPECS, sites, tuple(federation().cas), "task", statistics=STATS, scaling=scaling
    )
    return JobMachine(setup, BASE, privacy)


def job(**overrides: object) -> JobConfig:
    return secure_spec(
        standardize=StandardizeConfig(enabled=True, lower_quantile=0.05, upper_quantile=0.95), **overrides
    )


def site_data(seed: int, n: int) -> np.ndarray:
    """Raw features of one site, shifted per site (feature shift), a few outside the declared ranges."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.normal(3 + seed, 2, n), rng.normal(-1 + 0.5 * seed, 1.5, n)], axis=1)


def run_phase(m: JobMachine, tasks: dict[str, pb.WorkItem], data: dict[str, np.ndarray], now: float) -> list[Action]:
    """The statistics instance the machine opened (``tasks``), answered by real SecAgg sessions; the last actions."""
    ev = m.evaluation
    assert ev is not None
    assert ev.secure is not None
    helpers = Sites(m, tasks)
    out: list[Action] = []
    for s in data:
        out += helpers.feed(s, helpers.sessions[s].advertise(), now + 1)
    shares = sent(helpers.answer(sent(out, "secagg"), now + 2), "secagg")
    helpers.answer(shares, now + 3)
    out = []
    for s, x in data.items():
        lanes = statistics_lane_values(site_statistics(x, STATS), STATS, MAX_STATISTICS_ROWS)
        masked = helpers.sessions[s].masked_lanes(lanes)
        ev.secure.sa.server.receive_masked_chunks(s, [bytes(masked.data)])  # what the runner's fold does
        h = header(0, ev.instance, enc=masked, samples=0, metrics={}, split=STATS_SPLIT, base_model_version=ev.version)
        specs = (ev.secure.sa.masked_spec,)
        out += m.handle(UploadStarted(s, h, specs, now + 4)) + m.handle(UploadVerified(s, h, now + 4))
    signatures = sent(helpers.answer(sent(out, "secagg"), now + 5), "secagg")
    return helpers.answer(signatures, now + 6)


def start(m: JobMachine, sites: tuple[str, ...]) -> list[Action]:
    return m.handle(Start(T0)) + connect(m, *sites)


def test_the_phase_runs_before_round_1_and_every_task_after_it_carries_the_pooled_scaling() -> None:
    m = standardizing(job(min_available_sites=3))
    out = start(m, ("s00", "s01", "s02"))
    # No round yet: every site is asked for its statistics, a lanes-only secure instance of round 0.
    assert of(out, RecordRoundStart) == []
    assert sent(out, "train") == {}
    tasks = sent(out, "evaluate")
    assert sorted(tasks) == ["s00", "s01", "s02"]
    task = tasks["s00"].evaluate
    assert (task.round, task.split, task.HasField("secagg"), task.HasField("feature_scaling")) == (
        0,
        "stats",
        True,
        False,
    )
    params, enc, layout = setup_from_proto(task.job_id, task.round, task.attempt, task.secagg, task.split)
    assert enc is None
    assert params.round_no == STATS_INSTANCE_BASE + task.attempt
    assert isinstance(layout, LaneLayout)
    assert [lane.name for lane in layout.lanes] == STATS.lane_names()
    assert m.phase is Phase.EVALUATING

    data = {s: site_data(i, 40 + 25 * i) for i, s in enumerate(("s00", "s01", "s02"))}
    out = run_phase(m, tasks, data, T0)
    # The coordinator derived the scaling from the totals: equal (to fixed-point precision) to the pooled one.
    pooled = derive_scaling(site_statistics(np.concatenate(list(data.values())), STATS), STATS, 0.05, 0.95)
    [stored] = [u for u in of(out, UpdateJob) if "feature_scaling" in u.fields]
    scaling = FeatureScaling.from_dict(json.loads(stored.fields["feature_scaling"]))
    assert scaling is not None
    for got, want in zip(dataclasses.astuple(scaling), dataclasses.astuple(pooled), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)
    [audit] = [a for a in of(out, Audit) if a.kind == "features_standardized"]
    records = sum(len(x) for x in data.values())
    assert audit.fields["records"] == records
    line = f"feature statistics: {records} training records from 3 sites"
    assert any(p.line.startswith(line) for p in of(out, Progress))
    assert "coordinator.standardized" in [f.name for f in of(out, Failpoint)]
    # The statistics are not an evaluation: nothing is recorded as one.
    assert not [u for u in of(out, UpdateJob) if "test_accuracy" in u.fields]
    # Round 1 starts at once, and its train tasks carry the scaling.
    [rnd] = of(out, RecordRoundStart)
    assert rnd.number == 1
    trains = sent(out, "train")
    assert sorted(trains) == ["s00", "s01", "s02"]
    assert FeatureScaling.from_proto(trains["s01"].train.feature_scaling) == scaling
    assert m.scaling == scaling


def test_a_job_that_holds_a_scaling_skips_the_phase_and_sends_it_with_train_and_evaluate_tasks() -> None:
    scaling = FeatureScaling((1.0, 2.0), (3.0, 4.0), (0.0, -math.inf), (9.0, math.inf))
    m = standardizing(dataclasses.replace(spec(), min_available_sites=2, rounds=1), scaling=scaling)
    out = m.handle(Start(T0)) + connect(m, "s00", "s01")
    assert of(out, RecordRoundStart)[0].number == 1
    trains = sent(out, "train")
    assert all(FeatureScaling.from_proto(t.train.feature_scaling) == scaling for t in trains.values())
    for s in ("s00", "s01"):
        upload(m, s, header(1, 0))
    out = aggregated(m, T0 + 2)
    evals = sent(out, "evaluate")
    assert sorted(evals) == ["s00", "s01"]
    assert all(FeatureScaling.from_proto(e.evaluate.feature_scaling) == scaling for e in evals.values())


def test_without_the_phase_no_task_carries_a_scaling() -> None:
    m = standardizing(dataclasses.replace(spec(), min_available_sites=2))
    m.standardization = None  # a job without job.standardize
    out = m.handle(Start(T0)) + connect(m, "s00", "s01")
    assert not any(t.train.HasField("feature_scaling") for t in sent(out, "train").values())


def test_a_phase_that_cannot_run_is_retried_then_fails_the_job_with_the_reason() -> None:
    m = standardizing(job(min_available_sites=3, max_round_retries=1))
    m.handle(Start(T0))
    connect(m, "s00")
    assert m.phase is Phase.WAITING
    # The wait ends with one site: nothing to sum securely; the phase waits for the federation again.
    out = m.handle(Tick(T0 + 30))
    assert [a.kind for a in of(out, Audit)] == ["statistics_failed"]
    assert m.phase is Phase.WAITING
    assert of(out, RecordRoundStart) == []
    out = m.handle(Tick(T0 + 60))
    [finish] = of(out, FinishJob)
    assert finish.state is JobState.FAILED
    assert "feature-statistics phase failed 2 times" in finish.detail
    assert "fewer than 2 eligible sites" in finish.detail


def test_stop_during_the_phase_stops_the_job() -> None:
    m = standardizing(job(min_available_sites=2))
    start(m, ("s00", "s01"))
    assert m.evaluation is not None
    assert m.evaluation.split == STATS_SPLIT
    out = m.handle(StopRequested("enough", T0 + 1))
    [finish] = of(out, FinishJob)
    assert finish.state is JobState.STOPPED


def test_a_statistics_upload_for_another_instance_is_refused() -> None:
    m = standardizing(job(min_available_sites=2))
    start(m, ("s00", "s01"))
    h = header(0, 7, samples=0, metrics={}, split=STATS_SPLIT)
    specs = tuple(Spec(t.name, t.dtype, tuple(t.shape)) for t in h.manifest.tensors)
    with pytest.raises(FailedPrecondition, match="is instance"):
        m.handle(UploadStarted("s00", h, specs, T0 + 1))


def test_statistics_instances_are_numbered_apart_from_rounds_and_evaluations() -> None:
    assert secagg_round_no(0, 3, STATS_SPLIT) == STATS_INSTANCE_BASE + 3
    top_round = secagg_round_no(2**32 - 1, 249, "test")
    assert top_round < STATS_INSTANCE_BASE
    with pytest.raises(InvalidArgument, match="round 0 only"):
        secagg_round_no(1, 0, STATS_SPLIT)


async def test_a_secure_federation_standardizes_with_the_pooled_statistics_and_trains_with_them(
    pki: Pki,
    site_data: dict[str, Path],
    tmp_path: Path,
    coordinator_factory: CoordinatorFactory,
    participant_factory: ParticipantFactory,
) -> None:
    """Real daemons over mutual TLS: breast_cancer's scaling comes from the secure sum of three sites' train-split
    statistics, equals the scaling of their pooled statistics, is stored on the job row and is what every site
    trains and evaluates with (not the task's constants)."""
    secagg = SecureAggregationConfig(enabled=True, clip=1.0, weight_cap=1000, stage_timeout_s=30)
    job = replace(
        job_config(rounds=1, min_sites=3, min_available_sites=3, evaluate_every=0),
        secure_aggregation=secagg,
        standardize=StandardizeConfig(enabled=True),
    )
    coord = await coordinator_factory(coordinator_config(pki, tmp_path / "state", job=job))
    runner = runner_of(coord)
    sites = SUPPORT_SITES[:3]
    used: dict[str, list[TaskSetup | None]] = {s: [] for s in sites}
    for site in sites:
        daemon = await participant_factory(participant_config(pki.site(site), coord.address, site_data[site]))
        local = daemon.site
        assert local is not None
        real_train = local.train

        def train(*args: Any, _real: Any = real_train, _site: str = site) -> Any:
            used[_site].append(args[4] if len(args) > 4 else None)
            return _real(*args)

        local.train = train  # type: ignore[method-assign,assignment]
    await poll_until(lambda: runner.state != "running", timeout=120, what="the job to finish")
    assert runner.state == "finished", runner.detail

    row = coord.coordinator.store.job(runner.job_id)
    assert row is not None
    stored = FeatureScaling.from_dict(row["feature_scaling"])
    assert stored is not None
    task = load_task("breast_cancer")
    pooled = federated_scaling(task, {s: task.load_data(site_data[s]) for s in sites})
    for got, want in zip(dataclasses.astuple(stored), dataclasses.astuple(pooled), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-4)
    # Not the task's constants (computed from the whole public data set, test records included).
    fallback = task.fallback_scaling(np.zeros((1, len(stored.mean)), np.float32))  # type: ignore[attr-defined]
    assert not np.allclose(stored.mean, fallback.mean)
    # Every site trained round 1 with exactly that scaling.
    for site in sites:
        assert [s.scaling if s is not None else None for s in used[site]] == [stored], site
    events = [e["kind"] for e in coord.coordinator.store.audit_events()]
    assert events.index("features_standardized") < events.index("round_completed")
    assert "statistics_failed" not in events
