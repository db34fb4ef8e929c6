"""Metrics that matter under class imbalance (fraud at 0.2-2 %), computed federated from summable histograms.

Accuracy says nothing when 99 % of the records are one class. What a fraud team asks is: how much of the fraud do we
catch at a false-alarm rate the operations team can handle (recall at 1 % false-positive rate), and how precise is
the ranking over all thresholds (AUC-PR, as average precision). Both need the scores of every record, which must not
leave a site; but both are functions of the **score histogram per class**, and histograms add up. So each site
reports, for its evaluation split, how many negatives and how many positives fell into each of :data:`SCORE_BINS`
fixed bins of the model's score; the coordinator sums the sites' histograms (a plain sum, so it can also come out of
secure aggregation) and derives the metrics with :func:`imbalance_metrics`, a pure function.

The score is the log-odds of the positive class, ``logit_1 - logit_0``, in bins of width 0.05 over [-12, 12]
(scores beyond are counted in the end bins). Records in one bin are tied: the metrics are exactly those of the
scores rounded to their bins (tests compare with scikit-learn on such scores); the rounding costs little, since a
bin is 5 % in odds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from common.errors import InvalidArgument
from common.secagg.lanes import MAX_SAMPLES, Lane

SCORE_LOW, SCORE_HIGH, SCORE_BINS = -12.0, 12.0, 480
MAX_FPR = 0.01
MAX_COUNT = 1 << 53  # counts stay exact in float64 arithmetic


@dataclass(frozen=True)
class ScoreHistogram:
    """Records per score bin: ``negatives[j]`` and ``positives[j]`` for bin j (ascending score)."""

    negatives: tuple[int, ...]
    positives: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.negatives) != SCORE_BINS or len(self.positives) != SCORE_BINS:
            raise InvalidArgument(f"a score histogram has {SCORE_BINS} bins per class")
        if any(c < 0 or c > MAX_COUNT for c in (*self.negatives, *self.positives)):
            raise InvalidArgument("score histogram counts must be between 0 and 2**53")

    @classmethod
    def empty(cls) -> ScoreHistogram:
        return cls((0,) * SCORE_BINS, (0,) * SCORE_BINS)

    def flat(self) -> list[int]:
        """The wire form: the negatives' bins, then the positives'."""
        return [*self.negatives, *self.positives]

    @classmethod
    def from_flat(cls, values: Sequence[int]) -> ScoreHistogram:
        if len(values) != 2 * SCORE_BINS:
            raise InvalidArgument(f"a score histogram has {2 * SCORE_BINS} counts, got {len(values)}")
        return cls(tuple(int(v) for v in values[:SCORE_BINS]), tuple(int(v) for v in values[SCORE_BINS:]))

    def __add__(self, other: ScoreHistogram) -> ScoreHistogram:
        return ScoreHistogram(
            tuple(a + b for a, b in zip(self.negatives, other.negatives, strict=True)),
            tuple(a + b for a, b in zip(self.positives, other.positives, strict=True)),
        )


def score_bins(scores: NDArray[np.floating]) -> NDArray[np.int64]:
    """The bin of each score (log-odds of the positive class); scores outside the range go to the end bins."""
    s = np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=SCORE_LOW, posinf=SCORE_HIGH, neginf=SCORE_LOW)
    position = np.floor((s - SCORE_LOW) / (SCORE_HIGH - SCORE_LOW) * SCORE_BINS)
    return np.clip(position, 0, SCORE_BINS - 1).astype(np.int64)


def bin_centres() -> NDArray[np.float64]:
    width = (SCORE_HIGH - SCORE_LOW) / SCORE_BINS
    return np.asarray(SCORE_LOW + width * (np.arange(SCORE_BINS) + 0.5), dtype=np.float64)


def score_histogram(scores: NDArray[np.floating], labels: NDArray[np.integer]) -> ScoreHistogram:
    """The histogram of one site's split: ``labels`` 1 is the positive class, 0 the negative."""
    y = np.asarray(labels)
    if len(y) != len(scores):
        raise InvalidArgument("scores and labels differ in length")
    bins = score_bins(scores)
    neg = np.bincount(bins[y == 0], minlength=SCORE_BINS)
    pos = np.bincount(bins[y == 1], minlength=SCORE_BINS)
    return ScoreHistogram(tuple(int(c) for c in neg), tuple(int(c) for c in pos))


def imbalance_metrics(histogram: ScoreHistogram, max_fpr: float = MAX_FPR) -> dict[str, float]:
    """AUC-PR (average precision), recall at ``max_fpr`` false-positive rate and AUC-ROC of a (summed) histogram.

    Thresholds are the bin edges, from the highest down: at bin k everything in bins >= k is flagged.
    ``positives`` and ``negatives`` are the counts the metrics rest on. Without positives or negatives only the
    counts are returned (the metrics are undefined).
    """
    neg = np.asarray(histogram.negatives[::-1], dtype=np.float64)  # highest score first
    pos = np.asarray(histogram.positives[::-1], dtype=np.float64)
    p, n = float(pos.sum()), float(neg.sum())
    out = {"positives": p, "negatives": n}
    if p == 0 or n == 0:
        return out
    tp, fp = np.cumsum(pos), np.cumsum(neg)
    flagged = tp + fp
    precision = np.divide(tp, flagged, out=np.ones_like(tp), where=flagged > 0)
    recall = tp / p
    fpr = fp / n
    out["auc_pr"] = float(np.sum(pos / p * precision))  # sum over thresholds of (R_k - R_{k-1}) * P_k
    within = fpr <= max_fpr
    out[f"recall_at_{_percent(max_fpr)}pct_fpr"] = float(recall[within].max()) if within.any() else 0.0
    roc_x = np.concatenate([[0.0], fpr])
    roc_y = np.concatenate([[0.0], recall])
    out["auc_roc"] = float(np.sum((roc_x[1:] - roc_x[:-1]) * (roc_y[1:] + roc_y[:-1]) / 2))
    return out


def _percent(rate: float) -> str:
    value = rate * 100
    return str(int(value)) if math.isclose(value, round(value)) else f"{value:g}".replace(".", "_")


RECALL_KEY = f"recall_at_{_percent(MAX_FPR)}pct_fpr"


# Under secure aggregation the histograms are summed as lanes (common/secagg/lanes.py): one exact count lane per
# bin and class, so the coordinator learns the federation's histogram and never one site's.
SCORE_LANES = tuple(Lane(f"scores_neg_{j}", 1.0, MAX_SAMPLES) for j in range(SCORE_BINS)) + tuple(
    Lane(f"scores_pos_{j}", 1.0, MAX_SAMPLES) for j in range(SCORE_BINS)
)


def score_lane_values(histogram: ScoreHistogram | None) -> dict[str, float]:
    """A site's histogram as lane values (all zero when it has none: the sum then fails the count check)."""
    h = histogram if histogram is not None else ScoreHistogram.empty()
    return {lane.name: float(c) for lane, c in zip(SCORE_LANES, h.flat(), strict=True)}


def scores_of_lanes(totals: Mapping[str, float]) -> ScoreHistogram | None:
    """The summed histogram from a secure sum's lane totals; None when the sum had no score lanes."""
    if SCORE_LANES[0].name not in totals:
        return None
    return ScoreHistogram.from_flat([max(0, round(totals[lane.name])) for lane in SCORE_LANES])
