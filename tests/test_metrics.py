"""Imbalance metrics from summable score histograms: equal to scikit-learn's on the binned scores, additive over
sites, and checked before the coordinator counts a site's report."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from common.errors import InvalidArgument
from common.metrics import (
    RECALL_KEY,
    SCORE_BINS,
    ScoreHistogram,
    bin_centres,
    imbalance_metrics,
    score_bins,
    score_histogram,
)
from common.proto.cohort.v1 import cohort_pb2 as pb
from coordinator.round.intake import Intake
from coordinator.round.job_state import Evaluation
from coordinator.state.store import Store


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


class _Job(Intake):
    """The intake of a job with one open evaluation (what JobRunner mixes it into), over a real SQLite store."""

    def __init__(self, store: Store, ev: Evaluation) -> None:
        self.job_id, self.store, self._eval = "job", store, ev


def _report(site_hist: ScoreHistogram | None, n: int) -> pb.EvaluationReport:
    return pb.EvaluationReport(
        job_id="job",
        round=1,
        model_version="v",
        split="val",
        num_samples=n,
        loss=0.1,
        accuracy=0.9,
        score_histogram=site_hist.flat() if site_hist is not None else [],
    )


def test_the_coordinator_sums_the_reports_it_accepts(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite")
    ev = Evaluation(1, "val", "v", {"a", "b", "c"})
    job = _Job(store, ev)
    scores, y = _data(5, n=900, rate=0.05)
    a, b = score_histogram(scores[:500], y[:500]), score_histogram(scores[500:], y[500:])
    with pytest.raises(InvalidArgument, match="exactly once"):
        job.receive_evaluation("c", _report(a, 499))
    bad = _report(a, 500)
    del bad.score_histogram[3:]
    with pytest.raises(InvalidArgument, match="histogram"):
        job.receive_evaluation("c", bad)
    assert ev.reports == {}
    assert ev.scores is None  # a refused report changes nothing
    job.receive_evaluation("a", _report(a, 500))
    job.receive_evaluation("b", _report(b, 400))
    assert ev.score_metrics() == imbalance_metrics(score_histogram(scores, y))
    job.receive_evaluation("c", _report(None, 10))  # a site of a task without scores: only loss and accuracy count
    assert ev.aggregate()[0] == 910
    store.close()
