"""Federated feature standardization: per-site statistics as one summable vector, and the scaling derived from
their sum.

Every site must map the same measurement to the same model input (feature alignment), and outliers should be
handled the same way everywhere; but no site may see another's data. So each site computes statistics of its own
**training split** as one flat float64 vector of *lanes* whose element-wise sum over sites is the statistics of the
pooled training data. Secure aggregation can deliver that sum without revealing any one site's vector; the
coordinator then derives one :class:`FeatureScaling` and sends it with every train and evaluate task.

**Lanes.** For feature f, with the range ``[low_f, high_f]`` the task declares (``TabularTask.feature_ranges``) and
``bins`` histogram bins, the vector holds a block of ``5 + bins`` lanes (:meth:`StatisticsSpec.lane_names`):

* ``count``: records (the same for every feature today: sites' CSV files have no missing values);
* ``sum`` and ``sum_sq`` of the value clamped to the declared range (clamping bounds what one site can contribute,
  which makes the fixed-point encoding's overflow bound provable; a range wide enough never clamps);
* ``below`` and ``above``: how many values fell outside the range;
* ``hist[0..bins-1]``: counts in equal bins over the range (a value equal to ``high`` is in the last bin).

**Derived scaling** (:func:`derive_scaling`, a pure function of the summed vector): mean = sum / count, std =
sqrt(sum_sq / count - mean^2) (population std; 1.0 for a constant feature), and clipping bounds at configurable
quantiles of the pooled histogram, linearly interpolated within a bin (so accurate to about one bin width; a
quantile that falls below or above the range is the range's edge). Tasks then apply ``clip(x, lower, upper)``
followed by ``(x - mean) / std`` (:meth:`FeatureScaling.apply`). Mean and std are of the range-clamped values, not
of the quantile-clipped ones (that would need a second pass over the sites).

**Into the ring** (:func:`statistics_lanes`): the vector travels through secure aggregation as *lanes* of the
secure sum (common/secagg/lanes.py, the mechanism that also carries a round's counts and metrics): one lane per
element, exact integers for the counts and histogram bins, fixed point with :data:`STATISTICS_SCALE` units for the
sums and sums of squares, each bounded by the largest value one site can contribute (``max_rows``, ``max_rows * R``,
``max_rows * R^2`` with ``R`` the largest magnitude of a declared range bound) and split into limbs that cannot wrap
the ring. The sum's only error is each site's rounding of a fixed-point lane, at most ``n / (2 * STATISTICS_SCALE)``
per lane for ``n`` sites. Example: 30 features, 64 bins, b = 32, 64 sites, 10^6 rows per site, R = 5000: 2 limbs per
count lane, 3 per sum and sum of squares, 4,200 ring elements (17 KB at 32 bits). A site with more than ``max_rows``
training records cannot take part (:func:`statistics_lane_values` refuses it rather than clamp).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from common.errors import ConfigError, InvalidArgument
from common.proto.cohort.v1 import cohort_pb2 as pb
from common.secagg.lanes import Lane

F64Array = NDArray[np.float64]
F32Array = NDArray[np.float32]
HEADER_LANES = ("count", "sum", "sum_sq", "below", "above")
DEFAULT_BINS = 64
DEFAULT_LOWER_QUANTILE = 0.001
DEFAULT_UPPER_QUANTILE = 0.999


@dataclass(frozen=True)
class StatisticsSpec:
    """The lane layout: one declared ``(low, high)`` range per feature and the histogram's bin count."""

    ranges: tuple[tuple[float, float], ...]
    bins: int = DEFAULT_BINS

    def __post_init__(self) -> None:
        if not self.ranges:
            raise ConfigError("feature_ranges: at least one feature")
        if not 1 <= self.bins <= 4096:
            raise ConfigError("histogram_bins: must be between 1 and 4096")
        for i, (low, high) in enumerate(self.ranges):
            if not (math.isfinite(low) and math.isfinite(high) and low < high):
                raise ConfigError(f"feature_ranges[{i}]: need finite low < high, got ({low!r}, {high!r})")

    @property
    def features(self) -> int:
        return len(self.ranges)

    @property
    def block(self) -> int:
        """Lanes per feature."""
        return len(HEADER_LANES) + self.bins

    @property
    def length(self) -> int:
        return self.features * self.block

    def lane_names(self) -> list[str]:
        """``f<i>.count``, ``f<i>.sum`` ... ``f<i>.hist<j>``, in vector order."""
        names = []
        for f in range(self.features):
            names += [f"f{f}.{lane}" for lane in HEADER_LANES]
            names += [f"f{f}.hist{j}" for j in range(self.bins)]
        return names

    @property
    def magnitude(self) -> float:
        """The largest |bound| of any declared range: clamped values never exceed it."""
        return max(max(abs(low), abs(high)) for low, high in self.ranges)


def site_statistics(x_train: NDArray[np.floating], spec: StatisticsSpec) -> F64Array:
    """This site's statistics vector (see the module docstring) from its raw training features ``[n, features]``."""
    x = np.asarray(x_train, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != spec.features:
        raise InvalidArgument(f"expected features of shape [n, {spec.features}], got {x.shape}")
    if not np.isfinite(x).all():
        raise InvalidArgument("training features must be finite")
    out = np.zeros((spec.features, spec.block), dtype=np.float64)
    low = np.array([r[0] for r in spec.ranges])
    high = np.array([r[1] for r in spec.ranges])
    clamped = np.clip(x, low, high)
    out[:, 0] = len(x)
    out[:, 1] = clamped.sum(axis=0)
    out[:, 2] = (clamped * clamped).sum(axis=0)
    out[:, 3] = (x < low).sum(axis=0)
    out[:, 4] = (x > high).sum(axis=0)
    inside = (x >= low) & (x <= high)
    position = np.floor((clamped - low) / (high - low) * spec.bins).astype(np.int64)
    position = np.clip(position, 0, spec.bins - 1)
    for f in range(spec.features):
        out[f, len(HEADER_LANES) :] = np.bincount(position[inside[:, f], f], minlength=spec.bins)
    return out.reshape(-1)


@dataclass(frozen=True)
class FeatureScaling:
    """What every site applies to every split: ``(clip(x, lower, upper) - mean) / std``, per feature."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    lower: tuple[float, ...]
    upper: tuple[float, ...]

    def __post_init__(self) -> None:
        n = len(self.mean)
        if n == 0 or not len(self.std) == len(self.lower) == len(self.upper) == n:
            raise InvalidArgument("feature scaling: mean, std, lower and upper must have one entry per feature")
        if not all(math.isfinite(m) for m in self.mean):
            raise InvalidArgument("feature scaling: every mean must be finite")
        if not all(math.isfinite(s) and s > 0 for s in self.std):
            raise InvalidArgument("feature scaling: every std must be positive and finite")
        if any(math.isnan(v) for v in (*self.lower, *self.upper)) or any(
            lo > hi for lo, hi in zip(self.lower, self.upper, strict=True)
        ):
            raise InvalidArgument("feature scaling: need lower <= upper for every feature (infinite = no clip)")

    @property
    def features(self) -> int:
        return len(self.mean)

    def apply(self, x: NDArray[np.floating]) -> F32Array:
        """Clip to the bounds, then standardize; float32, like every model input."""
        clipped = np.clip(np.asarray(x, dtype=np.float64), np.array(self.lower), np.array(self.upper))
        out: F32Array = ((clipped - np.array(self.mean)) / np.array(self.std)).astype(np.float32)
        return out

    def to_proto(self) -> pb.FeatureScaling:
        return pb.FeatureScaling(mean=self.mean, std=self.std, lower=self.lower, upper=self.upper)

    @classmethod
    def from_proto(cls, message: pb.FeatureScaling) -> FeatureScaling | None:
        """None for an empty message (no statistics phase ran); InvalidArgument for an inconsistent one."""
        if not (message.mean or message.std or message.lower or message.upper):
            return None
        return cls(tuple(message.mean), tuple(message.std), tuple(message.lower), tuple(message.upper))

    @classmethod
    def of_constants(cls, offset: NDArray[np.floating], scale: NDArray[np.floating]) -> FeatureScaling:
        """The no-clip scaling ``(x - offset) / scale`` of a task's fixed constants."""
        n = len(offset)
        return cls(tuple(map(float, offset)), tuple(map(float, scale)), (-math.inf,) * n, (math.inf,) * n)


def _quantile(counts: F64Array, q: float, low: float, high: float) -> float:
    """The q-quantile of ``[below, hist..., above]``, interpolated linearly within the bin it falls in."""
    below, hist, above = counts[0], counts[1:-1], counts[-1]
    total = below + hist.sum() + above
    target = q * total
    if target <= below:
        return low
    cumulative = below
    width = (high - low) / len(hist)
    for j, c in enumerate(hist):
        if c > 0 and cumulative + c >= target:
            return float(low + width * (j + (target - cumulative) / c))
        cumulative += c
    return high


def derive_scaling(
    total: NDArray[np.floating],
    spec: StatisticsSpec,
    lower_quantile: float = DEFAULT_LOWER_QUANTILE,
    upper_quantile: float = DEFAULT_UPPER_QUANTILE,
) -> FeatureScaling:
    """Global mean, std and clipping bounds from the element-wise sum of the sites' statistics vectors.

    ``lower_quantile`` 0 / ``upper_quantile`` 1 mean no clipping on that side. Raises InvalidArgument when the
    vector does not fit the layout or holds fewer than two records of a feature.
    """
    if not 0 <= lower_quantile < 0.5 < upper_quantile <= 1:
        raise ConfigError("quantiles: need 0 <= lower < 0.5 < upper <= 1")
    v = np.asarray(total, dtype=np.float64)
    if v.shape != (spec.length,) or not np.isfinite(v).all():
        raise InvalidArgument(f"statistics: expected {spec.length} finite lanes, got shape {v.shape}")
    blocks = v.reshape(spec.features, spec.block)
    mean, std, lower, upper = [], [], [], []
    for f, (low, high) in enumerate(spec.ranges):
        count, s, s2 = blocks[f, 0], blocks[f, 1], blocks[f, 2]
        if count < 2:
            raise InvalidArgument(f"statistics: feature {f} has {count:g} records; need at least 2")
        m = s / count
        var = max(s2 / count - m * m, 0.0)
        sd = math.sqrt(var)
        # A (numerically) constant feature carries no information: centre it and leave its scale alone.
        if sd <= 1e-9 * max(1.0, abs(m)):
            sd = 1.0
        hist = np.concatenate([[blocks[f, 3]], blocks[f, len(HEADER_LANES) :], [blocks[f, 4]]])
        lo = -math.inf if lower_quantile == 0 else _quantile(hist, lower_quantile, low, high)
        hi = math.inf if upper_quantile == 1 else _quantile(hist, upper_quantile, low, high)
        mean.append(float(m))
        std.append(sd)
        lower.append(lo)
        upper.append(max(lo, hi))
    return FeatureScaling(tuple(mean), tuple(std), tuple(lower), tuple(upper))


STATISTICS_SCALE = 2.0**20  # fixed-point units per unit of a sum or sum of squares


def statistics_lanes(spec: StatisticsSpec, max_rows: int) -> tuple[Lane, ...]:
    """The secure-sum lanes of a statistics vector of ``spec`` (module docstring), for sites of at most ``max_rows``
    training records."""
    if max_rows < 1:
        raise ConfigError("max_rows: must be at least 1")
    r = spec.magnitude
    lanes = []
    for name in spec.lane_names():
        kind = name.split(".", 1)[1]
        if kind == "sum":
            lanes.append(Lane(name, STATISTICS_SCALE, max_rows * max(1.0, r), signed=True))
        elif kind == "sum_sq":
            lanes.append(Lane(name, STATISTICS_SCALE, max_rows * max(1.0, r * r)))
        else:  # counts: exact integers
            lanes.append(Lane(name, 1.0, float(max_rows)))
    return tuple(lanes)


def statistics_lane_values(vector: NDArray[np.floating], spec: StatisticsSpec, max_rows: int) -> dict[str, float]:
    """A site's statistics vector as lane values; refused when the site has more than ``max_rows`` records (its
    lanes would be clamped, and the sum silently wrong)."""
    v = np.asarray(vector, dtype=np.float64)
    if v.shape != (spec.length,):
        raise InvalidArgument(f"statistics: expected {spec.length} lanes, got shape {v.shape}")
    if spec.features and v[0] > max_rows:
        raise InvalidArgument(f"statistics: {v[0]:g} training records exceed the {max_rows} one site may sum")
    return dict(zip(spec.lane_names(), (float(x) for x in v), strict=True))


def statistics_of_totals(totals: Mapping[str, float], spec: StatisticsSpec) -> F64Array:
    """The summed statistics vector from a secure sum's lane totals."""
    try:
        return np.array([totals[name] for name in spec.lane_names()], dtype=np.float64)
    except KeyError as exc:
        raise InvalidArgument(f"statistics: lane {exc} missing from the sum") from None
