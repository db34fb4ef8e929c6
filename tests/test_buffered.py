"""FedBuff with secure aggregation (coordinator/round/buffered.py) driven through the job's state machine, event by
event, with real site-side SecAgg sessions: who forms a buffer's instance, the staleness weights the sites apply
before masking, that the unmasked sum is the staleness-weighted plaintext mean, and the refusals. No network."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_machine import BASE, SITES, T0, Sites, aggregated, connect, header, machine, of, secure_spec, sent

from common.errors import FailedPrecondition
from common.proto.cohort.v1 import cohort_pb2 as pb
from common.secagg.encoding import weight_of
from common.secagg.lanes import train_lane_values
from common.serde import Spec, encode
from coordinator.round.events import (
    Action,
    Aggregate,
    Audit,
    FailRound,
    RecordUpload,
    SecAggReceived,
    SiteDisconnected,
    Start,
    Tick,
    UploadStarted,
    UploadVerified,
)
from coordinator.round.machine import JobMachine
from coordinator.strategy.config import StrategyConfig
from participant.site_rules import staleness_refusal

V1 = "sha256:" + "1" * 64
CAP = 10_000  # SecureAggregationConfig.weight_cap's default


def buffered(**strategy: object) -> JobMachine:
    job = secure_spec(rounds=4, evaluate_every=0, strategy=StrategyConfig(mode="async", **strategy))  # type: ignore[arg-type]
    return machine(job)


def ready(m: JobMachine, site: str, number: int, version: str = BASE, now: float = T0 + 1) -> list[Action]:
    msg = pb.SecAggMessage(job_id="job-1", round=number, attempt=0, ready=version)
    return m.handle(SecAggReceived(site, msg, now))


def run_instance(m: JobMachine, tasks: dict[str, pb.WorkItem], updates: dict[str, np.ndarray], samples: int) -> Sites:
    """The instance's stages with real site sessions; every site masks its kept update. Ends at the Aggregate."""
    sites = Sites(m, tasks)
    out: list[Action] = []
    for s in tasks:
        out += sites.feed(s, sites.sessions[s].advertise(), T0 + 2)
    shares = sent(sites.answer(sent(out, "secagg"), T0 + 3), "secagg")
    sites.answer(shares, T0 + 4)
    out = []
    for s, update in updates.items():
        session = sites.sessions[s]
        masked = session.masked_update(
            encode({"w": torch.from_numpy(update)}), samples, train_lane_values(samples, 0.5, 0.5, 1)
        )
        rnd = m.round
        assert rnd is not None
        assert rnd.secagg is not None
        rnd.secagg.server.receive_masked_chunks(s, [bytes(masked.data)])  # what the runner's fold does
        h = header(rnd.number, rnd.attempt, enc=masked, samples=0, metrics={})
        h.base_model_version = tasks[s].train.model_version
        specs = tuple(Spec(t.name, t.dtype, tuple(t.shape)) for t in h.manifest.tensors)
        out += m.handle(UploadStarted(s, h, specs, T0 + 5)) + m.handle(UploadVerified(s, h, T0 + 5))
    stale = {r.site: r.metrics["staleness"] for r in of(out, RecordUpload)}
    assert stale == {s: m.round.number - (1 if tasks[s].train.model_version == BASE else 2) for s in updates}  # type: ignore[union-attr]
    out = sites.answer(sent(out, "secagg"), T0 + 6)
    out = sites.answer(sent(out, "secagg"), T0 + 7)
    [agg] = of(out, Aggregate)
    assert agg.secure
    return sites


def test_a_buffer_is_one_secure_instance_over_the_first_k_ready_sites_weighted_by_staleness() -> None:
    m = buffered(buffer_size=2, max_staleness=1)
    m.handle(Start(T0))
    tasks = sent(connect(m, *SITES), "train")
    # Every idle site trains a buffered task on the newest model: no SecAgg setup yet, nothing uploaded.
    assert sorted(tasks) == list(SITES)
    assert all(t.train.buffered and not t.train.HasField("secagg") for t in tasks.values())
    with pytest.raises(FailedPrecondition, match="updates stay at the sites"):
        m.handle(UploadStarted("s00", header(1, 0), (Spec("w", pb.DTYPE_FLOAT32, (4,)),), T0 + 1))
    assert ready(m, "s00", 1) == []  # one of K = 2: the buffer waits
    out = ready(m, "s01", 1)
    first = sent(out, "train")
    assert sorted(first) == ["s00", "s01"]  # the first K ready sites are the instance
    for item in first.values():
        t = item.train
        assert t.buffered
        assert list(t.secagg.cohort) == ["s00", "s01"]
        assert (t.round, t.attempt, t.model_version, t.staleness_weight) == (1, 0, BASE, 1.0)
    [audit] = [a for a in of(out, Audit) if a.kind == "buffer_instance"]
    assert audit.fields["staleness"] == {"s00": 0, "s01": 0}
    # A site that becomes ready while the instance runs waits for the next buffer.
    assert sent(ready(m, "s02", 1), "train") == {}
    with pytest.raises(FailedPrecondition, match="already holds an update"):
        ready(m, "s02", 1)
    with pytest.raises(FailedPrecondition, match="holds no buffered task for round 2"):
        ready(m, "s03", 2)
    run_instance(m, first, {"s00": np.full(4, 0.5, np.float32), "s01": np.full(4, -0.25, np.float32)}, 10)
    assert m.round is not None
    unmasked = m.round.secagg.finish()  # type: ignore[union-attr]
    assert unmasked.mean is not None
    np.testing.assert_allclose(unmasked.mean[:4], np.full(4, 0.125), atol=1e-3)

    # Version 2: the instance's sites train again; s02 still holds its round-1 update, s03 still trains round 1.
    out = aggregated(m, T0 + 8, V1)
    again = sent(out, "train")
    assert sorted(again) == ["s00", "s01"]
    assert again["s00"].train.model_version == V1
    assert m.round is not None
    assert m.round.secure is None  # one queued update is not a buffer
    # s00 is ready on version 2: with s02 (trained on version 1) it fills the buffer. s02's update is one version
    # old: its weight is (1 + 1)^-0.5, sent in the clear (the coordinator knows every version), applied at the site.
    second = sent(ready(m, "s00", 2, V1, T0 + 9), "train")
    assert sorted(second) == ["s00", "s02"]
    assert second["s02"].train.model_version == BASE
    assert second["s02"].train.staleness_weight == pytest.approx(2**-0.5)
    assert second["s00"].train.staleness_weight == 1.0
    x00, x02 = np.array([1.0, -1.0, 0.5, 0.0], np.float32), np.array([-0.5, 0.25, 0.5, 1.0], np.float32)
    run_instance(m, second, {"s00": x00, "s02": x02}, 40)
    secagg = m.round.secagg
    assert secagg is not None
    assert secagg.enc is not None
    unmasked = secagg.finish()
    # The unmasked mean is the staleness-weighted plaintext mean, to the encoding's quantisation.
    w00, w02 = weight_of(40, CAP), weight_of(40, CAP) * 2**-0.5
    expected = (w00 * x00 + w02 * x02) / (w00 + w02)
    assert unmasked.mean is not None
    bound = secagg.enc.mean_error_bound(2, unmasked.weight_total)
    assert bound < 0.01  # far below the gap to the unweighted mean (0.13 in the first coordinate)
    np.testing.assert_allclose(unmasked.mean[:4], expected, atol=bound)
    assert unmasked.weight_total == pytest.approx(w00 + w02, rel=1e-3)

    # Version 3: s03's round-1 task is now 2 versions old, past max_staleness 1: it is given the newest model instead,
    # and its old update is refused.
    out = aggregated(m, T0 + 10, "sha256:" + "2" * 64)
    assert sorted(sent(out, "train")) == ["s00", "s02", "s03"]
    with pytest.raises(FailedPrecondition, match="holds no buffered task for round 1"):
        ready(m, "s03", 1, BASE, T0 + 11)


def test_a_failed_instance_is_retried_with_the_queued_sites_and_its_own_sites_train_again() -> None:
    m = buffered(buffer_size=2, max_staleness=2)
    m.handle(Start(T0))
    connect(m, *SITES)
    ready(m, "s00", 1)
    first = sent(ready(m, "s01", 1), "train")
    ready(m, "s02", 1)
    ready(m, "s03", 1)  # queued behind the running instance
    # s01 never advertises: the key stage closes at its deadline with one site, too few for the instance.
    sites = Sites(m, first)
    sites.feed("s00", sites.sessions["s00"].advertise(), T0 + 2)
    out: list[Action] = []
    while not of(out, FailRound):
        wake = m.wake_at()
        assert wake is not None
        out += m.handle(Tick(wake))
    # The retry (attempt 1) forms its instance from the sites still queued; s00 and s01 train again on version 1.
    assert m.attempt == 1
    items = sent(out, "train")
    assert sorted(s for s, i in items.items() if i.train.HasField("secagg")) == ["s02", "s03"]
    assert sorted(s for s, i in items.items() if not i.train.HasField("secagg")) == ["s00", "s01"]
    assert all(i.train.attempt == 1 for i in items.values())


def test_a_site_that_leaves_takes_its_kept_update_with_it() -> None:
    m = buffered(buffer_size=2)
    m.handle(Start(T0))
    connect(m, *SITES)
    ready(m, "s00", 1)
    m.handle(SiteDisconnected("s00", T0 + 2))
    assert sent(ready(m, "s01", 1, now=T0 + 3), "train") == {}  # s00's update left with it: no buffer of 2 yet
    out = connect(m, "s00", now=T0 + 4)
    assert not sent(out, "train")["s00"].train.HasField("secagg")  # back: it trains again on the newest model
    assert m.buffer is not None
    assert list(m.buffer.ready) == ["s01"]
    # The same task again: a daemon that only lost its connection still holds that update and says so again
    # (participant/work.py), which fills the buffer.
    assert sorted(sent(ready(m, "s00", 1, now=T0 + 5), "train")) == ["s00", "s01"]


def test_a_site_takes_only_a_staleness_weight_some_job_could_ask_for() -> None:
    trained = pb.TrainTask(job_id="job-1", round=3, model_version=BASE, buffered=True)

    def instance(number: int, weight: float) -> pb.TrainTask:
        return pb.TrainTask(job_id="job-1", round=number, model_version=BASE, buffered=True, staleness_weight=weight)

    strategy = StrategyConfig(mode="async", staleness_exponent=0.5)
    assert staleness_refusal(trained, instance(3, 1.0)) is None
    assert staleness_refusal(trained, instance(5, strategy.staleness_weight(2))) is None
    assert staleness_refusal(trained, instance(5, 3.0**-10)) is None  # the largest exponent a job may set
    assert staleness_refusal(trained, instance(5, 3.0**-10 * 0.99)) == (
        f"staleness weight {3.0**-10 * 0.99:g} does not fit an update 2 versions old"
    )
    assert staleness_refusal(trained, instance(3, 0.0)) is not None  # a fresh update weighs 1
    assert staleness_refusal(trained, instance(3, 1.5)) is not None
    assert staleness_refusal(trained, instance(2, 1.0)) is not None  # an instance older than the training
