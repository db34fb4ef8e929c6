"""Imbalance metrics from summable score histograms: equal to scikit-learn's on the binned scores, additive over
sites, and checked before the coordinator counts a site's report."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve
from test_machine import T0, Sites, aggregated, connect, header, machine, of, secure_spec, sent, spec, upload

from common.errors import InvalidArgument
from common.metrics import (
    RECALL_KEY,
    SCORE_BINS,
    SCORE_LANES,
    ScoreHistogram,
    bin_centres,
    imbalance_metrics,
    score_bins,
    score_histogram,
    score_lane_values,
)
from common.proto.cohort.v1 import cohort_pb2 as pb
from common.secagg.lanes import EVAL_LANES, eval_lane_values
from coordinator.round.events import (
    Action,
    EvaluationReceived,
    Progress,
    RecordEvaluation,
    Start,
    UpdateJob,
    UploadStarted,
    UploadVerified,
)
from coordinator.round.machine import JobMachine
from coordinator.round.records import Evaluation


def _data(seed: int, n: int = 4000, rate: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < rate).astype(np.int64)
    y[:2] = (0, 1)  # both classes present
    scores = rng.normal(-4, 2, n) + y * rng.normal(5, 2, n)
    return scores, y


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_equal_scikit_learn_on_binned_scores(seed: int) -> None:
    scores, y = _data(seed)
    binned = bin_centres()[score_bins(scores)]
    m = imbalance_metrics(score_histogram(scores, y))
    assert m["auc_pr"] == pytest.approx(average_precision_score(y, binned), abs=1e-12)
    assert m["auc_roc"] == pytest.approx(roc_auc_score(y, binned), abs=1e-12)
    fpr, tpr, _ = roc_curve(y, binned)
    assert m[RECALL_KEY] == pytest.approx(tpr[fpr <= 0.01].max(), abs=1e-12)
    assert m["positives"] == y.sum()
    assert m["negatives"] == len(y) - y.sum()


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31), st.integers(2, 6))
def test_site_histograms_add_up_to_the_pooled_one(seed: int, sites: int) -> None:
    scores, y = _data(seed, n=1200, rate=0.05)
    parts = np.array_split(np.arange(len(y)), sites)
    total = ScoreHistogram.empty()
    for idx in parts:
        total = total + score_histogram(scores[idx], y[idx])
    assert total == score_histogram(scores, y)
    assert imbalance_metrics(total) == imbalance_metrics(score_histogram(scores, y))


def test_histograms_refuse_wrong_shapes_and_extremes_land_in_end_bins() -> None:
    with pytest.raises(InvalidArgument):
        ScoreHistogram.from_flat([0] * (2 * SCORE_BINS - 1))
    with pytest.raises(InvalidArgument):
        ScoreHistogram((0,) * SCORE_BINS, (-1,) + (0,) * (SCORE_BINS - 1))
    h = score_histogram(np.array([-1e9, np.inf, np.nan, 0.0]), np.array([0, 1, 0, 1]))
    assert h.negatives[0] == 2  # -1e9 and NaN
    assert h.positives[-1] == 1
    assert imbalance_metrics(ScoreHistogram.empty()) == {"positives": 0.0, "negatives": 0.0}
    perfect = score_histogram(np.array([-5.0, -4.0, 6.0]), np.array([0, 0, 1]))
    assert imbalance_metrics(perfect)["auc_pr"] == 1.0
    assert imbalance_metrics(perfect)[RECALL_KEY] == 1.0


def _report(ev: Evaluation, site_hist: ScoreHistogram | None, n: int) -> pb.EvaluationReport:
    return pb.EvaluationReport(
        job_id="job-1",
        round=ev.number,
        model_version=ev.version,
        split=ev.split,
        num_samples=n,
        loss=0.1,
        accuracy=0.9,
        score_histogram=site_hist.flat() if site_hist is not None else [],
    )


def _evaluating(*, secure: bool) -> tuple[JobMachine, list[Action]]:
    """A job of a task that reports scores, its only round aggregated: the test evaluation is open."""
    job = secure_spec(min_available_sites=3, rounds=1, evaluate_every=0) if secure else spec(rounds=1, evaluate_every=0)
    m = machine(dataclasses.replace(job, min_available_sites=3), report_scores=True)
    m.handle(Start(T0))
    out = connect(m, "s00", "s01", "s02")
    if not secure:
        for s in ("s00", "s01", "s02"):
            upload(m, s, header(1, 0))
        return m, aggregated(m, T0 + 3)
    sites = Sites(m, sent(out, "train"))
    out = []
    for s in ("s00", "s01", "s02"):
        out += sites.feed(s, sites.sessions[s].advertise(), T0 + 1)
    sites.answer(sent(sites.answer(sent(out, "secagg"), T0 + 2), "secagg"), T0 + 3)
    out = []
    for s in ("s00", "s01", "s02"):
        out += sites.upload(s, np.zeros(4, np.float32), T0 + 4)
    sites.answer(sent(sites.answer(sent(out, "secagg"), T0 + 5), "secagg"), T0 + 6)
    return m, aggregated(m, T0 + 7)


def test_the_coordinator_sums_the_reports_it_accepts() -> None:
    m, _ = _evaluating(secure=False)
    ev = m.evaluation
    assert ev is not None
    scores, y = _data(5, n=900, rate=0.05)
    a, b = score_histogram(scores[:500], y[:500]), score_histogram(scores[500:], y[500:])
    with pytest.raises(InvalidArgument, match="exactly once"):
        m.handle(EvaluationReceived("s02", _report(ev, a, 499), T0 + 5))
    bad = _report(ev, a, 500)
    del bad.score_histogram[3:]
    with pytest.raises(InvalidArgument, match="histogram"):
        m.handle(EvaluationReceived("s02", bad, T0 + 5))
    assert ev.reports == {}
    assert ev.scores is None  # a refused report changes nothing
    m.handle(EvaluationReceived("s00", _report(ev, a, 500), T0 + 5))
    m.handle(EvaluationReceived("s01", _report(ev, b, 400), T0 + 5))
    assert ev.score_metrics() == imbalance_metrics(score_histogram(scores, y))
    out = m.handle(EvaluationReceived("s02", _report(ev, a, 500), T0 + 5))
    [update] = [u for u in of(out, UpdateJob) if "test_metrics" in u.fields]
    assert update.fields["test_samples"] == 1400
    expected = imbalance_metrics(score_histogram(np.concatenate([scores, scores[:500]]), np.concatenate([y, y[:500]])))
    assert json.loads(update.fields["test_metrics"]) == pytest.approx(expected)
    assert "AUC-PR" in " ".join(p.line for p in of(out, Progress))


def test_metrics_need_every_evaluated_record_in_the_histograms() -> None:
    """A site without a histogram (e.g. a report restored after a restart): metrics of part of the records would
    mislead, so there are none; loss and accuracy still count."""
    m, _ = _evaluating(secure=False)
    ev = m.evaluation
    assert ev is not None
    scores, y = _data(6, n=600, rate=0.05)
    m.handle(EvaluationReceived("s00", _report(ev, score_histogram(scores, y), 600), T0 + 5))
    m.handle(EvaluationReceived("s01", _report(ev, None, 10), T0 + 5))
    out = m.handle(EvaluationReceived("s02", _report(ev, None, 0), T0 + 5))
    [update] = [u for u in of(out, UpdateJob) if "test_samples" in u.fields]
    assert update.fields["test_samples"] == 610
    assert "test_metrics" not in update.fields


def test_under_secure_aggregation_only_the_summed_histogram_is_seen() -> None:
    """The histograms travel as lanes of the secure evaluation: the coordinator's metrics are those of the pooled
    scores, and nothing per site is recorded or readable."""
    m, out = _evaluating(secure=True)
    tasks = sent(out, "evaluate")
    ev = m.evaluation
    assert ev is not None
    assert ev.secure is not None
    assert ev.secure.sa.lanes.lanes == EVAL_LANES + SCORE_LANES
    evals = Sites(m, tasks)
    out = []
    for s in ("s00", "s01", "s02"):
        out += evals.feed(s, evals.sessions[s].advertise(), T0 + 8)
    evals.answer(sent(evals.answer(sent(out, "secagg"), T0 + 9), "secagg"), T0 + 10)
    scores, y = _data(7, n=1500, rate=0.03)
    parts = {"s00": slice(0, 700), "s01": slice(700, 1200), "s02": slice(1200, 1500)}
    out = []
    for s, part in parts.items():
        h = score_histogram(scores[part], y[part])
        n = len(y[part])
        masked = evals.sessions[s].masked_lanes(eval_lane_values(n, 0.2, 0.9) | score_lane_values(h))
        ev.secure.sa.server.receive_masked_chunks(s, [bytes(masked.data)])
        hd = header(1, ev.instance, enc=masked, samples=0, metrics={}, split="test", base_model_version=ev.version)
        specs = (ev.secure.sa.masked_spec,)
        out += m.handle(UploadStarted(s, hd, specs, T0 + 11)) + m.handle(UploadVerified(s, hd, T0 + 11))
    out = evals.answer(sent(evals.answer(sent(out, "secagg"), T0 + 12), "secagg"), T0 + 13)
    assert of(out, RecordEvaluation) == []
    [update] = [u for u in of(out, UpdateJob) if "test_metrics" in u.fields]
    assert update.fields["test_samples"] == 1500
    assert json.loads(update.fields["test_metrics"]) == pytest.approx(imbalance_metrics(score_histogram(scores, y)))
