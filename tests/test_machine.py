"""The job's state machine (coordinator/round/machine.py) driven event by event: no gRPC, no SQLite, no asyncio.

Each test feeds events with explicit times and checks the actions that come out; together they cover the rules the
end-to-end tests exercise through real daemons (selection, waiting, dropouts, deadlines, retries, over-selection,
evaluation, the budget stop, stopping, resuming after a restart, and the secure-aggregation stage order).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
import pytest
import torch
from test_secagg_protocol import federation

from common.errors import AlreadyExists, CohortError, FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from common.proto.cohort.v1 import cohort_pb2 as pb
from common.secagg.lanes import eval_lane_values, train_lane_values
from common.serde import Spec, encode
from common.settings import TrainParamsConfig
from coordinator.config import JobConfig, PrivacyConfig, SecureAggregationConfig
from coordinator.round.events import (
    AckDuplicate,
    Action,
    Aggregate,
    Aggregated,
    Audit,
    Broadcast,
    ClearSuspension,
    CommitRound,
    Declined,
    EvaluationReceived,
    FailRound,
    FinishJob,
    JobState,
    Phase,
    Progress,
    RecordEvaluation,
    RecordRoundStart,
    RecordUpload,
    SecAggReceived,
    Send,
    SetRoundEvaluation,
    SiteConnected,
    SiteDisconnected,
    Start,
    StopRequested,
    Suspend,
    Tick,
    UpdateJob,
    UploadAbandoned,
    UploadStarted,
    UploadVerified,
)
from coordinator.round.identity import JobIdentity
from coordinator.round.machine import JobMachine, JobSetup
from coordinator.round.privacy import JobPrivacy
from coordinator.state.registry import Declaration
from coordinator.state.resume import ResumePlan
from participant.secagg_session import SecAggSession, SiteKeys

SITES = ("s00", "s01", "s02", "s03")
SPECS = (Spec("w", pb.DTYPE_FLOAT32, (4,)),)
BASE = "sha256:" + "0" * 64
IDENTITY = JobIdentity("task", "sha256:code", "sha256:schema")
FITS = Declaration("task", "sha256:code", "sha256:schema", "test")
T0 = float(int(time.time()))  # real time: the secure rounds check the sites' certificates against it


def spec(**overrides: Any) -> JobConfig:
    base = JobConfig(
        task="task",
        rounds=2,
        min_sites=2,
        round_timeout_s=60,
        wait_for_sites_s=30,
        evaluate_every=1,
        max_round_retries=2,
        params=TrainParamsConfig(local_epochs=1, batch_size=8, learning_rate=0.1, seed=1),
    )
    return dataclasses.replace(base, **overrides)


def machine(
    job: JobConfig | None = None,
    *,
    resume: ResumePlan | None = None,
    sites: Iterable[str] = SITES,
    report_scores: bool = False,
) -> JobMachine:
    job = job or spec()
    sites = tuple(sites)
    privacy = JobPrivacy(
        job.privacy, len(sites), job.fraction, secure_aggregation=job.secure_aggregation, min_survivors=job.min_sites
    )
    privacy.model_numel = sum(s.numel for s in SPECS)
    setup = JobSetup("job-1", job, IDENTITY, SPECS, len(sites), tuple(federation().cas), "task", report_scores)
    return JobMachine(setup, BASE, privacy, resume=resume)


def of(actions: list[Action], kind: type) -> list[Any]:
    return [a for a in actions if isinstance(a, kind)]


def sent(actions: list[Action], kind: str) -> dict[str, pb.WorkItem]:
    return {a.site: a.item for a in of(actions, Send) if a.item.WhichOneof("kind") == kind}


def connect(m: JobMachine, *sites: str, now: float = T0, decl: Declaration = FITS) -> list[Action]:
    out: list[Action] = []
    for site in sites:
        out += m.handle(SiteConnected(site, decl, now))
    return out


def header(
    rnd: int, attempt: int, data: bytes = b"", *, samples: int = 10, loss: float = 0.5, **kw: Any
) -> pb.UpdateHeader:
    enc = (
        kw.pop("enc")
        if kw.get("enc")
        else encode({"w": torch.from_numpy(np.frombuffer(data or b"\0" * 16, dtype="<f4").copy())})
    )
    fields: dict[str, Any] = {
        "job_id": "job-1",
        "round": rnd,
        "attempt": attempt,
        "base_model_version": BASE,
        "num_samples": samples,
        "metrics": {"loss": loss},
        "manifest": enc.manifest(),
    }
    fields.update(kw)
    return pb.UpdateHeader(**fields)


def upload(m: JobMachine, site: str, h: pb.UpdateHeader, now: float = T0 + 1) -> list[Action]:
    """Admission then verification, as the runner does around the spool."""
    specs = tuple(Spec(t.name, t.dtype, tuple(t.shape)) for t in h.manifest.tensors)
    out = m.handle(UploadStarted(site, h, specs, now))
    if of(out, AckDuplicate):
        return out
    return out + m.handle(UploadVerified(site, h, now))


def aggregated(m: JobMachine, now: float, version: str = "sha256:" + "1" * 64) -> list[Action]:
    rnd = m.round
    assert rnd is not None
    return m.handle(Aggregated(rnd.number, rnd.attempt, version, 0.1, now))


def report(m: JobMachine, site: str, n: int, loss: float, acc: float, split: str = "val") -> list[Action]:
    ev = m.evaluation
    assert ev is not None
    r = pb.EvaluationReport(
        job_id="job-1", round=ev.number, model_version=ev.version, split=split, num_samples=n, loss=loss, accuracy=acc
    )
    return m.handle(EvaluationReceived(site, r, T0 + 5))


def phase_of(m: JobMachine) -> Phase:
    return m.phase


def snapshot(m: JobMachine) -> Any:
    rnd = m.round
    return (
        m.state,
        m.phase,
        m.number,
        m.attempt,
        None
        if rnd is None
        else (sorted(rnd.reported), sorted(rnd.in_flight), sorted(rnd.state.lost), rnd.state.phase, rnd.weight_sum),
    )


# -- waiting and starting ------------------------------------------------------------------------------------------


def test_a_round_starts_once_enough_eligible_sites_are_connected() -> None:
    m = machine(spec(min_available_sites=3))
    out = m.handle(Start(T0))
    assert of(out, Audit)[0].kind == "job_started"
    assert phase_of(m) is Phase.WAITING
    assert m.wake_at() == T0 + 30
    assert connect(m, "s00", "s01") == []
    # A site with other task code is connected but not eligible.
    assert connect(m, "s02", decl=dataclasses.replace(FITS, task_digest="sha256:other")) == []
    out = connect(m, "s03")
    [start] = of(out, RecordRoundStart)
    assert (start.number, start.attempt, start.cohort) == (1, 0, ("s00", "s01", "s03"))
    tasks = sent(out, "train")
    assert sorted(tasks) == ["s00", "s01", "s03"]
    task = tasks["s00"].train
    assert (task.round, task.attempt, task.model_version, task.deadline_unix) == (1, 0, BASE, T0 + 60)
    assert phase_of(m) is Phase.TRAINING
    assert m.wake_at() == T0 + 60


def test_too_few_sites_when_the_wait_ends_is_a_failed_attempt_and_retries_run_out() -> None:
    m = machine(spec(max_round_retries=1))
    m.handle(Start(T0))
    connect(m, "s00")
    connect(m, "s01", decl=dataclasses.replace(FITS, task_digest="sha256:other"))
    out = m.handle(Tick(T0 + 30))
    shortfall = "1 of 2 needed sites can run this job; s01: task code digest: site has sha256:other"
    assert of(out, Progress)[0].line.startswith(f"round 1: too few eligible sites after waiting: {shortfall}")
    assert of(out, Progress)[0].line.endswith("; retrying")
    assert (m.phase, m.attempt, m.wake_at()) == (Phase.WAITING, 1, T0 + 60)
    out = m.handle(Tick(T0 + 60))
    [finish] = of(out, FinishJob)
    assert finish.state is JobState.FAILED
    # The reason says why, though the job failed before any round record was written.
    assert finish.detail.startswith(f"round 1 could not start in 2 waits of job.wait_for_sites_s (30s): {shortfall}")
    assert finish.detail == m.detail
    [ended] = [b.item.job_finished for b in of(out, Broadcast)]
    assert (ended.job_id, ended.reason, ended.final_model_version) == ("job-1", finish.detail, "")


def test_a_short_wait_trains_with_whoever_is_there_once_min_sites_are() -> None:
    m = machine(spec(min_available_sites=4))
    m.handle(Start(T0))
    connect(m, "s00", "s01")
    out = m.handle(Tick(T0 + 30))
    assert of(out, RecordRoundStart)[0].cohort == ("s00", "s01")


def test_selection_is_reproducible_and_takes_the_fraction() -> None:
    cohorts = []
    for _ in range(2):
        m = machine(spec(fraction=0.5, min_sites=1, min_available_sites=4))
        m.handle(Start(T0))
        out = connect(m, *SITES)
        cohorts.append(of(out, RecordRoundStart)[0].cohort)
    assert cohorts[0] == cohorts[1]
    assert len(cohorts[0]) == 2


# -- uploads --------------------------------------------------------------------------------------------------


def started(job: JobConfig | None = None, sites: tuple[str, ...] = ("s00", "s01", "s02")) -> JobMachine:
    """A job whose first round started with ``sites`` (it waits for all of them)."""
    m = machine(dataclasses.replace(job or spec(), min_available_sites=len(sites)))
    m.handle(Start(T0))
    connect(m, *sites)
    assert phase_of(m) is Phase.TRAINING
    return m


def test_upload_refusals_name_the_reason_and_change_nothing() -> None:
    m = started()
    before = snapshot(m)
    cases: list[tuple[str, pb.UpdateHeader, type[CohortError], str]] = [
        ("s00", header(1, 0, job_id="other"), FailedPrecondition, "running job is 'job-1'"),
        ("s00", header(2, 0), FailedPrecondition, "round 1 attempt 0 is open"),
        ("s00", header(1, 1), FailedPrecondition, "round 1 attempt 0 is open"),
        ("s03", header(1, 0), PermissionDenied, "not in the cohort of round 1"),
        ("s00", header(1, 0, base_model_version="sha256:x"), FailedPrecondition, "another model version"),
        ("s00", header(1, 0, samples=0), InvalidArgument, "num_samples"),
        ("s00", header(1, 0, train_seconds=-1.0), InvalidArgument, "train_seconds"),
        ("s00", header(1, 0, metrics={"x": float("nan")}), InvalidArgument, "metrics"),
        ("s00", header(1, 0, enc=encode({"v": torch.zeros(4)})), InvalidArgument, "tensor 'v'"),
    ]
    for site, h, error, text in cases:
        with pytest.raises(error, match=None) as info:
            upload(m, site, h)
        assert text in str(info.value), (text, str(info.value))
        assert snapshot(m) == before


def test_duplicates_are_acknowledged_and_different_updates_refused() -> None:
    m = started()
    h = header(1, 0, np.ones(4, np.float32).tobytes())
    out = upload(m, "s00", h)
    [record] = of(out, RecordUpload)
    assert (record.site, record.num_samples, record.metrics) == ("s00", 10, {"loss": 0.5})
    assert of(upload(m, "s00", h), AckDuplicate) == [AckDuplicate(h.manifest.sha256)]
    with pytest.raises(AlreadyExists):
        upload(m, "s00", header(1, 0, np.zeros(4, np.float32).tobytes()))


def test_one_stream_per_site_at_a_time_and_an_abandoned_stream_frees_the_site() -> None:
    m = started()
    h = header(1, 0)
    specs = SPECS
    m.handle(UploadStarted("s00", h, specs, T0 + 1))
    with pytest.raises(FailedPrecondition, match="already in progress"):
        m.handle(UploadStarted("s00", h, specs, T0 + 1))
    m.handle(UploadAbandoned("s00", 1, 0))
    assert m.handle(UploadStarted("s00", h, specs, T0 + 2)) == []


def test_a_round_closes_when_everyone_reported_and_fedavg_weights_by_samples() -> None:
    m = started()
    upload(m, "s00", header(1, 0, samples=10, loss=1.0))
    upload(m, "s01", header(1, 0, samples=30, loss=2.0))
    out = upload(m, "s02", header(1, 0, samples=60, loss=0.0))
    [agg] = of(out, Aggregate)
    assert (agg.secure, agg.weights, agg.central_noise) == (False, {"s00": 10.0, "s01": 30.0, "s02": 60.0}, False)
    assert phase_of(m) is Phase.AGGREGATING
    with pytest.raises(AlreadyExists):
        upload(m, "s00", header(1, 0, np.ones(4, np.float32).tobytes()))
    out = aggregated(m, T0 + 3)
    [commit] = of(out, CommitRound)
    assert commit.train_loss == pytest.approx((10 * 1.0 + 30 * 2.0) / 100)
    assert (commit.reported, commit.train_samples) == (("s00", "s01", "s02"), 100)
    assert commit.detail == "3 of 3 sites reported"
    # evaluate_every = 1: the validation evaluation of round 1 follows, on the new model.
    tasks = sent(out, "evaluate")
    assert sorted(tasks) == ["s00", "s01", "s02"]
    assert tasks["s00"].evaluate.model_version == "sha256:" + "1" * 64
    assert phase_of(m) is Phase.EVALUATING


def test_evaluation_results_are_sample_weighted_and_then_the_next_round_starts() -> None:
    m = started()
    for s in ("s00", "s01", "s02"):
        upload(m, s, header(1, 0))
    aggregated(m, T0 + 3)
    with pytest.raises(PermissionDenied, match="not asked"):
        report(m, "s03", 1, 0.1, 1.0)
    report(m, "s00", 10, 1.0, 0.5)
    with pytest.raises(AlreadyExists):
        report(m, "s00", 10, 1.0, 0.5)
    report(m, "s01", 30, 0.0, 1.0)
    out = report(m, "s02", 0, 0.0, 0.0)
    [ev] = of(out, SetRoundEvaluation)
    assert (ev.number, ev.num_samples, ev.loss, ev.accuracy) == (1, 40, pytest.approx(0.25), pytest.approx(0.875))
    assert of(out, RecordRoundStart)[0].number == 2


def test_evaluate_every_zero_never_evaluates_and_the_last_round_ends_with_the_test_split() -> None:
    m = started(spec(evaluate_every=0, rounds=1))
    for s in ("s00", "s01", "s02"):
        upload(m, s, header(1, 0))
    out = aggregated(m, T0 + 3)
    assert of(out, SetRoundEvaluation) == []
    tasks = sent(out, "evaluate")
    assert {t.evaluate.split for t in tasks.values()} == {"test"}
    for s in ("s00", "s01"):
        out = report(m, s, 10, 0.5, 0.9, split="test")
    out += report(m, "s02", 10, 0.5, 0.6, split="test")
    [update] = [u for u in of(out, UpdateJob) if "test_accuracy" in u.fields]
    assert update.fields == {"test_loss": 0.5, "test_accuracy": pytest.approx(0.8), "test_samples": 30}
    [finish] = of(out, FinishJob)
    assert (finish.state, finish.detail) == (JobState.FINISHED, "completed 1 rounds")


def test_without_the_final_evaluation_the_last_commit_finishes_the_job() -> None:
    m = started(spec(evaluate_every=0, rounds=1, final_evaluation=False))
    for s in ("s00", "s01", "s02"):
        upload(m, s, header(1, 0))
    out = aggregated(m, T0 + 3)
    assert of(out, CommitRound)
    assert sent(out, "evaluate") == {}
    assert [u for u in of(out, UpdateJob) if "test_accuracy" in u.fields] == []
    [finish] = of(out, FinishJob)
    assert (finish.state, finish.detail) == (JobState.FINISHED, "completed 1 rounds")
    ended = of(out, Broadcast)[0].item.job_finished
    assert ended.job_id == m.job_id
    # It names the final model, the version round 1 committed (sites with keep_final_model download it).
    [commit] = of(out, CommitRound)
    assert ended.final_model_version == commit.model_version != ""


# -- dropouts, deadlines, over-selection ----------------------------------------------------------------------------


def test_dropouts_fail_the_attempt_when_too_few_can_report_and_the_retry_redraws() -> None:
    m = started(spec(min_sites=3))
    connect(m, "s03")  # too late for this round's cohort
    out = m.handle(SiteDisconnected("s00", T0 + 1))
    [fail] = of(out, FailRound)
    assert "too many sites dropped out" in fail.reason
    assert of(out, RecordRoundStart)[0].attempt == 1  # s01..s03 are still there: the retry starts at once


def test_a_lost_site_that_comes_back_gets_its_task_again() -> None:
    m = started()
    m.handle(SiteDisconnected("s02", T0 + 1))
    assert m.round is not None
    assert m.round.state.lost == {"s02"}
    out = connect(m, "s02", now=T0 + 2)
    assert sent(out, "train")["s02"].train.round == 1
    assert m.round.state.lost == set()


def test_the_deadline_closes_a_round_with_enough_uploads() -> None:
    m = started()
    upload(m, "s00", header(1, 0))
    upload(m, "s01", header(1, 0))
    assert m.handle(Tick(T0 + 59)) == []
    out = m.handle(Tick(T0 + 60))
    assert of(out, Aggregate)[0].weights.keys() == {"s00", "s01"}
    assert m.round is not None
    assert m.round.close_reason == "deadline passed with 2 of 3 sites"


def test_over_selection_closes_the_round_at_its_target() -> None:
    m = machine(spec(min_sites=2, fraction=0.5, over_selection=0.5, min_available_sites=4))
    m.handle(Start(T0))
    out = connect(m, *SITES)
    assert len(of(out, RecordRoundStart)[0].cohort) == 3  # k = 2 of 4, asked ceil(2 * 1.5)
    assert m.round is not None
    cohort = sorted(m.round.cohort)
    upload(m, cohort[0], header(1, 0))
    out = upload(m, cohort[1], header(1, 0))
    assert of(out, Aggregate)
    assert m.round.close_reason == "2 of 3 sites reported (target 2)"


def test_a_declining_site_is_a_dropout_at_once() -> None:
    m = started()
    with pytest.raises(FailedPrecondition, match="round 1 attempt 5 is not open"):
        m.handle(Declined("s00", pb.DeclineRequest(job_id="job-1", round=1, attempt=5), T0))
    out = m.handle(Declined("s00", pb.DeclineRequest(job_id="job-1", round=1, attempt=0, reason="budget"), T0))
    assert of(out, Audit)[0].kind == "site_declined"
    upload(m, "s01", header(1, 0))
    out = upload(m, "s02", header(1, 0))
    assert of(out, Aggregate)


def test_a_round_that_fails_on_declines_says_how_many_and_why() -> None:
    m = started(spec(min_sites=3))
    out = m.handle(Declined("s00", pb.DeclineRequest(job_id="job-1", round=1, attempt=0, reason="privacy budget"), T0))
    [fail] = of(out, FailRound)
    assert fail.reason == (
        "too many sites dropped out: at most 2 of 3 can report (1 of 3 lost: 1 site declined: privacy budget)"
    )


# -- privacy budget, stop, suspend -----------------------------------------------------------------------------


def test_the_budget_stop_ends_the_job_before_a_round_that_would_pass_it() -> None:
    privacy = PrivacyConfig(unit="site", target_epsilon=3.0, noise_multiplier=1.0, refuse_over_budget=False)
    m = machine(spec(privacy=privacy, rounds=50, evaluate_every=0, min_available_sites=3))
    m.handle(Start(T0))
    out = connect(m, "s00", "s01", "s02")
    rounds = 0
    while not of(out, FinishJob):
        rounds += 1
        for s in ("s00", "s01", "s02"):
            upload(m, s, header(m.number, 0, np.full(4, 0.01, np.float32).tobytes()))
        out = aggregated(m, T0 + rounds)
    [finish] = of(out, FinishJob)
    assert finish.state is JobState.BUDGET_EXHAUSTED
    assert f"exhausted after {rounds} rounds" in finish.detail
    assert m.privacy.epsilon() <= 3.0


@pytest.mark.parametrize("phase", ["waiting", "training", "aggregating", "evaluating"])
def test_stop_in_every_phase(phase: str) -> None:
    m = machine(spec(min_available_sites=3))
    m.handle(Start(T0))
    if phase != "waiting":
        connect(m, "s00", "s01", "s02")
    if phase in ("aggregating", "evaluating"):
        for s in ("s00", "s01", "s02"):
            upload(m, s, header(1, 0))
    if phase == "evaluating":
        aggregated(m, T0 + 2)
    out = m.handle(StopRequested("maintenance", T0 + 3))
    if phase == "training":
        assert of(out, FailRound)[0].reason == "maintenance"
    if phase == "aggregating":
        assert of(out, FinishJob) == []  # the round commits first
        out = aggregated(m, T0 + 4)
        assert of(out, CommitRound)
    [finish] = of(out, FinishJob)
    assert (finish.state, finish.detail) == (JobState.STOPPED, "maintenance")
    with pytest.raises(FailedPrecondition, match="already stopped"):
        m.handle(StopRequested("again", T0 + 5))


def test_suspend_leaves_the_job_resumable_and_still() -> None:
    m = started()
    out = m.handle(Suspend("shutdown"))
    assert of(out, UpdateJob)[0].fields == {"state": "interrupted", "detail": "shutdown"}
    assert of(out, FailRound) == []
    assert of(out, FinishJob) == []
    assert m.handle(Tick(T0 + 1000)) == []
    with pytest.raises(FailedPrecondition):
        upload(m, "s00", header(1, 0))


# -- resuming after a restart (the restart gaps) ---------------------------------------------------------------


def test_a_reopened_round_takes_retried_uploads_before_the_sites_reconnect() -> None:
    h = header(3, 1, np.ones(4, np.float32).tobytes())
    plan = ResumePlan(
        number=3,
        attempt=1,
        completed=2,
        reopen_cohort=("s00", "s01", "s02"),
        uploads=({"site": "s00", "sha256": h.manifest.sha256, "num_samples": 10, "metrics": {"loss": 0.5}},),
        notes=("round 3 attempt 1 reopened with 1 accepted uploads",),
    )
    m = machine(resume=plan)
    out = m.handle(Start(T0))
    assert of(out, RecordRoundStart) == []  # the round row exists
    assert phase_of(m) is Phase.TRAINING
    assert m.round is not None
    assert m.round.reopened
    # No site is connected yet, and none is counted lost: they get the task when they come back.
    assert m.round.state.lost == set()
    assert of(upload(m, "s00", h), AckDuplicate)  # a site retrying the upload it had finished
    out = upload(m, "s01", header(3, 1))  # s01's retried upload is taken although it has not reconnected
    assert of(out, RecordUpload)
    out = connect(m, "s02")
    assert sent(out, "train")["s02"].train.round == 3
    out = upload(m, "s02", header(3, 1))
    assert of(out, Aggregate)[0].weights == {"s00": 10.0, "s01": 10.0, "s02": 10.0}


def test_a_cut_off_evaluation_runs_again_before_the_next_round() -> None:
    plan = ResumePlan(number=3, attempt=0, completed=2, evaluate=(2, 1))
    m = machine(spec(rounds=5), resume=plan)
    m.handle(Start(T0))
    assert phase_of(m) is Phase.WAITING  # the federation reassembles first
    out = connect(m, "s00", "s01")
    tasks = sent(out, "evaluate")
    assert sorted(tasks) == ["s00", "s01"]
    assert tasks["s00"].evaluate.round == 2
    report(m, "s00", 10, 0.5, 0.5)
    out = report(m, "s01", 10, 0.5, 0.7)
    assert of(out, SetRoundEvaluation)[0].number == 2
    assert of(out, RecordRoundStart)[0].number == 3


def test_stored_evaluation_reports_of_the_same_model_count_again() -> None:
    """After a damaged checkpoint the re-run round can yield the same model; sites will not evaluate it twice."""
    version = "sha256:" + "1" * 64
    plan = ResumePlan(
        number=1,
        attempt=1,
        completed=0,
        stored_evaluations={(1, "val", version): {"s00": (10, 1.0, 0.4), "s01": (30, 0.0, 0.8)}},
    )
    m = machine(spec(min_available_sites=3), resume=plan)
    m.handle(Start(T0))
    connect(m, "s00", "s01", "s02")
    for s in ("s00", "s01", "s02"):
        upload(m, s, header(1, 1))
    out = aggregated(m, T0 + 2, version)
    assert sorted(sent(out, "evaluate")) == ["s02"]  # only the site that had not reported is asked
    out = report(m, "s02", 0, 0.0, 0.0)
    [ev] = of(out, SetRoundEvaluation)
    assert (ev.num_samples, ev.accuracy) == (40, pytest.approx(0.7))


# -- secure aggregation stages ----------------------------------------------------------------------------------


def secure_spec(**overrides: Any) -> JobConfig:
    return spec(secure_aggregation=SecureAggregationConfig(enabled=True, bits=24, stage_timeout_s=10), **overrides)


class Sites:
    """Real site-side SecAgg sessions (participant/secagg_session.py) answering the machine's steps."""

    def __init__(self, m: JobMachine, tasks: dict[str, pb.WorkItem]) -> None:
        fed = federation()
        self.m = m
        self.sessions = {
            s: SecAggSession.start(
                item.train if item.WhichOneof("kind") == "train" else item.evaluate,
                s,
                SiteKeys(fed.identity(s).key, fed.identity(s).cert_pem, tuple(fed.cas)),
            )
            for s, item in tasks.items()
        }

    def feed(self, site: str, msg: pb.SecAggMessage | None, now: float) -> list[Action]:
        return [] if msg is None else self.m.handle(SecAggReceived(site, msg, now))

    def answer(self, items: dict[str, pb.WorkItem], now: float, skip: Iterable[str] = ()) -> list[Action]:
        out: list[Action] = []
        for site, item in items.items():
            if site not in skip:
                out += self.feed(site, self.sessions[site].on_step(item.secagg), now)
        return out

    def upload(self, site: str, update: np.ndarray, now: float, samples: int = 10, loss: float = 0.5) -> list[Action]:
        session = self.sessions[site]
        lanes = train_lane_values(samples, loss, 0.75, 3)
        masked = session.masked_update(encode({"w": torch.from_numpy(update)}), samples, lanes)
        rnd = self.m.round
        assert rnd is not None
        assert rnd.secagg is not None
        rnd.secagg.server.receive_masked_chunks(site, [bytes(masked.data)])  # what the runner's fold does
        h = header(rnd.number, rnd.attempt, enc=masked, samples=0, metrics={})
        specs = tuple(Spec(t.name, t.dtype, tuple(t.shape)) for t in h.manifest.tensors)
        return self.m.handle(UploadStarted(site, h, specs, now)) + self.m.handle(UploadVerified(site, h, now))


def test_secure_stages_run_in_order_and_a_silent_site_is_left_behind_at_the_stage_deadline() -> None:
    m = machine(secure_spec(min_available_sites=3))
    m.handle(Start(T0))
    out = connect(m, "s00", "s01", "s02")
    sites = Sites(m, sent(out, "train"))
    # Stage 0: s02 never advertises; the others do. The stage waits until its deadline (a third of the time left).
    out = sites.feed("s00", sites.sessions["s00"].advertise(), T0 + 1)
    out += sites.feed("s01", sites.sessions["s01"].advertise(), T0 + 1)
    assert sent(out, "secagg") == {}
    with pytest.raises(FailedPrecondition, match="keys are shared"):
        m.handle(UploadStarted("s00", header(1, 0), SPECS, T0 + 2))
    assert m.wake_at() == T0 + 10
    out = m.handle(Tick(T0 + 10))
    ads = sent(out, "secagg")
    assert sorted(ads) == ["s00", "s01"]
    assert ads["s00"].secagg.HasField("advertisements")
    # Stage 1: both share keys; the shares go out at once and the masked inputs are taken.
    out = sites.answer(ads, T0 + 11)
    shares = sent(out, "secagg")
    assert sorted(shares) == ["s00", "s01"]
    assert shares["s00"].secagg.HasField("shares")
    assert m.round is not None
    assert m.round.state.cohort == {"s00", "s01"}
    sites.answer(shares, T0 + 12)
    sites.upload("s00", np.full(4, 0.25, np.float32), T0 + 13)
    out = sites.upload("s01", np.full(4, -0.5, np.float32), T0 + 13)
    # Stage 3 and 4: survivors to sign, then the signatures; the last unmask share starts the aggregation.
    survivors = sent(out, "secagg")
    assert phase_of(m) is Phase.UNMASKING
    assert list(survivors["s00"].secagg.survivors.sites) == ["s00", "s01"]
    signatures = sent(sites.answer(survivors, T0 + 14), "secagg")
    out = sites.answer(signatures, T0 + 15)
    [agg] = of(out, Aggregate)
    assert agg.secure
    assert phase_of(m) is Phase.AGGREGATING
    assert m.round.secagg is not None
    unmasked = m.round.secagg.finish()
    assert unmasked.survivors == 2
    assert unmasked.mean is not None
    np.testing.assert_allclose(unmasked.mean[:4], np.full(4, -0.125), atol=1e-3)
    # The sample counts and the loss arrive as totals only (the metadata lanes), exactly.
    assert unmasked.totals == {"samples": 20.0, "loss_sum": 10.0, "accuracy_sum": 15.0, "steps": 6.0}


def test_too_few_key_shares_fail_the_secure_attempt() -> None:
    m = machine(secure_spec(min_sites=3, min_available_sites=3))
    m.handle(Start(T0))
    out = connect(m, "s00", "s01", "s02")
    sites = Sites(m, sent(out, "train"))
    out = []
    for s in ("s00", "s01", "s02"):
        out += sites.feed(s, sites.sessions[s].advertise(), T0 + 1)
    ads = sent(out, "secagg")  # everyone advertised: the stage closed at once
    assert sorted(ads) == ["s00", "s01", "s02"]
    out = sites.answer(ads, T0 + 2, skip=("s02",))
    assert m.wake_at() is not None
    out += m.handle(Tick(m.wake_at() or 0))
    [fail] = of(out, FailRound)
    assert "shared" in fail.reason, fail.reason
    assert "keys" in fail.reason, fail.reason
    assert m.attempt == 1


def test_secagg_messages_outside_a_secure_round_are_refused() -> None:
    m = started()
    with pytest.raises(FailedPrecondition, match="no secure-aggregation round is open"):
        m.handle(SecAggReceived("s00", pb.SecAggMessage(job_id="job-1", round=1), T0))


def secure_round(m: JobMachine, sites: tuple[str, ...], now: float) -> tuple[Sites, dict[str, pb.WorkItem]]:
    """Start the job's first secure round with ``sites``; every site advertises. Returns the advertisements sent."""
    m.handle(Start(now))
    out = connect(m, *sites, now=now)
    helpers = Sites(m, sent(out, "train"))
    out = []
    for s in sites:
        out += helpers.feed(s, helpers.sessions[s].advertise(), now + 1)
    return helpers, sent(out, "secagg")


def test_a_site_that_aborts_is_a_dropout_and_is_suspended_after_max_aborts() -> None:
    """Issue 9: one site answering with abort_reason cannot fail a secure round; after max_site_aborts it is out."""
    m = machine(secure_spec(min_available_sites=4, max_round_retries=0, rounds=3, evaluate_every=0))
    sites, ads = secure_round(m, SITES, T0)
    hostile = "s03"
    out = sites.feed(hostile, sites.sessions[hostile].message(abort_reason="tampering, allegedly"), T0 + 2)
    [audit] = [a for a in of(out, Audit) if a.kind == "secagg_site_abort"]
    assert audit.actor == hostile
    assert of(out, FailRound) == []
    assert m.round is not None
    assert m.aborts[hostile] == 1
    shares = sent(sites.answer(ads, T0 + 3, skip=(hostile,)), "secagg")
    assert sorted(shares) == ["s00", "s01", "s02"]  # the round goes on without the aborting site
    with pytest.raises(FailedPrecondition, match="aborted this secure-aggregation round"):
        sites.feed(hostile, sites.sessions[hostile].message(abort_reason="again"), T0 + 3)


def test_suspension_keeps_a_site_out_of_cohorts_until_an_admin_clears_it() -> None:
    m = machine(secure_spec(min_sites=2, min_available_sites=3))
    m.handle(Start(T0))
    connect(m, "s00", "s01", "s02")
    for _ in range(3):
        m._count_abort("s02", "test")
    assert "s02" in m.suspended
    assert "s02" not in m.eligible()
    with pytest.raises(NotFound):
        m.handle(ClearSuspension("s01", "ops"))
    out = m.handle(ClearSuspension("s02", "ops"))
    assert [a.kind for a in of(out, Audit)] == ["site_unsuspended"]
    assert "s02" in m.eligible()
    assert m.aborts["s02"] == 0


def test_a_secure_evaluation_yields_totals_only() -> None:
    """Issue 9: under secure aggregation an evaluation is a secure sum: no per-site report is recorded."""
    m = machine(secure_spec(min_available_sites=3, rounds=1, evaluate_every=0))
    m.handle(Start(T0))
    out = connect(m, "s00", "s01", "s02")
    sites = Sites(m, sent(out, "train"))
    out = []
    for s in ("s00", "s01", "s02"):
        out += sites.feed(s, sites.sessions[s].advertise(), T0 + 1)
    shares = sent(sites.answer(sent(out, "secagg"), T0 + 2), "secagg")
    sites.answer(shares, T0 + 3)
    for s in ("s00", "s01"):
        sites.upload(s, np.zeros(4, np.float32), T0 + 4)
    out = sites.upload("s02", np.zeros(4, np.float32), T0 + 4)
    signatures = sent(sites.answer(sent(out, "secagg"), T0 + 5), "secagg")
    sites.answer(signatures, T0 + 6)
    out = aggregated(m, T0 + 7)
    tasks = sent(out, "evaluate")
    assert sorted(tasks) == ["s00", "s01", "s02"]
    task = tasks["s00"].evaluate
    assert task.HasField("secagg")
    assert task.split == "test"
    # A plain report is refused: this evaluation only takes masked inputs.
    with pytest.raises(FailedPrecondition, match="summed securely"):
        report(m, "s00", 10, 0.1, 0.9, split="test")
    evals = Sites(m, tasks)
    out = []
    for s in ("s00", "s01", "s02"):
        out += evals.feed(s, evals.sessions[s].advertise(), T0 + 8)
    shares = sent(evals.answer(sent(out, "secagg"), T0 + 9), "secagg")
    evals.answer(shares, T0 + 10)
    ev = m.evaluation
    assert ev is not None
    assert ev.secure is not None
    results = {"s00": (10, 1.0, 0.5), "s01": (30, 0.0, 1.0), "s02": (0, 0.0, 0.0)}
    out = []
    for s, (n, loss, acc) in results.items():
        masked = evals.sessions[s].masked_lanes(eval_lane_values(n, loss, acc))
        ev.secure.sa.server.receive_masked_chunks(s, [bytes(masked.data)])
        h = header(1, ev.instance, enc=masked, samples=0, metrics={}, split="test", base_model_version=ev.version)
        specs = (ev.secure.sa.masked_spec,)
        out += m.handle(UploadStarted(s, h, specs, T0 + 11)) + m.handle(UploadVerified(s, h, T0 + 11))
    signatures = sent(evals.answer(sent(out, "secagg"), T0 + 12), "secagg")
    out = evals.answer(signatures, T0 + 13)
    assert of(out, RecordEvaluation) == []
    [update] = [u for u in of(out, UpdateJob) if "test_accuracy" in u.fields]
    assert update.fields == {
        "test_loss": pytest.approx(0.25),
        "test_accuracy": pytest.approx(0.875),
        "test_samples": 40,
    }
    assert of(out, FinishJob)[0].state is JobState.FINISHED


def test_an_evaluation_waits_for_the_federation_after_a_restart() -> None:
    """A reopened round whose uploads were all in closes at once; its evaluation waits for sites to reconnect
    instead of running with none of them."""
    h = header(2, 0)
    uploads = tuple({"site": s, "sha256": h.manifest.sha256, "num_samples": 10, "metrics": {}} for s in SITES[:3])
    plan = ResumePlan(number=2, attempt=0, completed=1, reopen_cohort=SITES[:3], uploads=uploads)
    m = machine(spec(rounds=3), resume=plan)
    out = m.handle(Start(T0))
    assert of(out, Aggregate)
    out = aggregated(m, T0 + 1)
    assert phase_of(m) is Phase.WAITING
    assert sent(out, "evaluate") == {}
    out = connect(m, "s00", "s01", now=T0 + 2)
    assert sorted(sent(out, "evaluate")) == ["s00", "s01"]


# -- asynchronous rounds (FedBuff) ---------------------------------------------------------------------------------


def test_fedbuff_counts_a_stale_update_in_the_open_buffer_weighted_down_and_refuses_one_too_old() -> None:
    from coordinator.strategy.config import StrategyConfig

    job = spec(rounds=5, evaluate_every=0, strategy=StrategyConfig(mode="async", buffer_size=2, max_staleness=1))
    m = machine(job)
    m.handle(Start(T0))
    out = connect(m, *SITES)
    assert sorted(sent(out, "train")) == list(SITES)  # every idle site trains
    # Two fast sites fill the buffer of version 1: a new model, and only they get the next task.
    upload(m, "s00", header(1, 0, samples=10))
    out = upload(m, "s01", header(1, 0, samples=10))
    [agg] = of(out, Aggregate)
    assert agg.weights == {"s00": 10.0, "s01": 10.0}
    out = aggregated(m, T0 + 2, "sha256:" + "1" * 64)
    assert sorted(sent(out, "train")) == ["s00", "s01"]  # s02 and s03 are still training on version 1
    assert m.recent_version(BASE)
    # s02's update for round 1 arrives while round 2 is open: one version old, weighted by (1 + 1)^-0.5.
    stale = header(1, 0, samples=10)
    upload(m, "s02", stale, now=T0 + 3)
    rnd = m.round
    assert rnd is not None
    assert rnd.number == 2
    assert rnd.weights["s02"] == pytest.approx(10 / 2**0.5)
    assert m.upload_target(1, 0) == (2, 0)
    out = upload(m, "s00", header(2, 0, samples=10, base_model_version="sha256:" + "1" * 64), now=T0 + 3)
    assert of(out, Aggregate)
    aggregated(m, T0 + 4, "sha256:" + "2" * 64)
    # Round 3 is open: s03's task from round 1 is 2 versions old, past max_staleness 1.
    with pytest.raises(FailedPrecondition, match=r"2 model versions old .* strategy.max_staleness is 1"):
        upload(m, "s03", header(1, 0, samples=10), now=T0 + 5)
    # ...and it has been given the newest model instead.
    assert m.round is not None
    assert m.round.number == 3
    with pytest.raises(FailedPrecondition, match="holds no task for round 2"):
        upload(m, "s03", header(2, 0, samples=10, base_model_version="sha256:" + "1" * 64), now=T0 + 5)
