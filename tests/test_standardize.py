"""Federated feature standardization: the sites' statistics vectors, summed (in the clear, through the limb
encoding, and through a real SecAgg round), give the pooled statistics; the derived scaling is what every site then
applies; tasks fall back to their constants only when a job sends none."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_secagg_protocol import make_round

from common.datasets import load_source, split_sites
from common.errors import ConfigError, InvalidArgument
from common.proto.cohort.v1 import cohort_pb2 as pb
from common.secagg.lanes import Lane, LaneLayout
from common.secagg.local import run_local_round
from common.secagg.protocol import RoundParams
from common.site_comparison import federated_scaling
from common.tasks import breast_cancer
from common.tasks.setup import TaskSetup
from common.tasks.standardize import (
    HEADER_LANES,
    STATISTICS_SCALE,
    FeatureScaling,
    StatisticsSpec,
    derive_scaling,
    site_statistics,
    statistics_lane_values,
    statistics_lanes,
    statistics_of_totals,
)
from common.tasks.tabular import TabularTask, dataset_tensors
from participant.site import Site

SITES = ("s00", "s01", "s02", "s03", "s04")


@pytest.fixture(scope="module")
def sites() -> dict[str, np.ndarray]:
    """breast_cancer's training splits over five label-skewed sites (raw features)."""
    x, y, _ = load_source("breast_cancer")
    return {s: parts["train"][0] for s, parts in split_sites(x, y, SITES, alpha=0.5, seed=3).items()}


def _spec() -> StatisticsSpec:
    spec = breast_cancer.TASK.statistics_spec()
    assert spec is not None
    return spec


def _pooled_moments(x: np.ndarray, spec: StatisticsSpec) -> tuple[np.ndarray, np.ndarray]:
    low = np.array([r[0] for r in spec.ranges])
    high = np.array([r[1] for r in spec.ranges])
    clamped = np.clip(x.astype(np.float64), low, high)
    return clamped.mean(axis=0), clamped.std(axis=0)


def test_site_vectors_sum_to_the_pooled_vector(sites: dict[str, np.ndarray]) -> None:
    spec = _spec()
    total = sum(site_statistics(x, spec) for x in sites.values())
    pooled = site_statistics(np.concatenate(list(sites.values())), spec)
    np.testing.assert_allclose(total, pooled, rtol=1e-12, atol=1e-9)
    blocks = pooled.reshape(spec.features, spec.block)
    n = sum(len(x) for x in sites.values())
    assert (blocks[:, 0] == n).all()
    # Every record is in exactly one histogram bin or outside lane.
    assert (blocks[:, 3] + blocks[:, 4] + blocks[:, len(HEADER_LANES) :].sum(axis=1) == n).all()


def test_derived_scaling_equals_pooled_statistics(sites: dict[str, np.ndarray]) -> None:
    spec = _spec()
    total = np.sum([site_statistics(x, spec) for x in sites.values()], axis=0)
    scaling = derive_scaling(total, spec, lower_quantile=0.05, upper_quantile=0.95)
    pooled = np.concatenate(list(sites.values())).astype(np.float64)
    mean, std = _pooled_moments(pooled, spec)
    np.testing.assert_allclose(scaling.mean, mean, rtol=1e-9)
    np.testing.assert_allclose(scaling.std, std, rtol=1e-7)
    width = np.array([(hi - lo) / spec.bins for lo, hi in spec.ranges])
    # Quantiles from the histogram are within one bin of the pooled data's own.
    assert (np.abs(np.array(scaling.lower) - np.quantile(pooled, 0.05, axis=0)) <= width).all()
    assert (np.abs(np.array(scaling.upper) - np.quantile(pooled, 0.95, axis=0)) <= width).all()


def test_secure_sum_of_encoded_statistics_equals_pooled(sites: dict[str, np.ndarray]) -> None:
    """Each site writes its vector as lanes of Z_2^32 (common/secagg/lanes.py) and masks it (SecAgg+, pure protocol
    machines); the unmasked sum decodes to the pooled statistics within the lanes' documented rounding bound."""
    spec = _spec()
    rows = max(len(x) for x in sites.values())
    layout = LaneLayout(statistics_lanes(spec, rows), bits=32, max_n=len(SITES))
    vectors = {s: site_statistics(x, spec) for s, x in sites.items()}
    encoded = {s: layout.encode(statistics_lane_values(v, spec, rows)) for s, v in vectors.items()}
    params = RoundParams.create("stats", 1, SITES, dim=layout.size, bits=32, dropout_rate=0.1, corruption_rate=0.0)
    server, clients = make_round(params)
    total = run_local_round(server, clients, encoded)
    decoded = statistics_of_totals(layout.decode(total), spec)
    exact = sum(vectors.values())
    error = len(SITES) / (2 * STATISTICS_SCALE)  # each site's fixed-point rounding of a lane
    assert np.abs(decoded - exact).max() <= error
    scaling = derive_scaling(decoded, spec)
    pooled = np.concatenate(list(sites.values()))
    mean, std = _pooled_moments(pooled, spec)
    # To fixed-point precision: each lane of the sum is off by at most e, so the mean by e / N and the variance by
    # e / N * (1 + 2 |mean|) (through sum_sq / N and mean^2), the std by that over 2 std.
    e_mean = error / len(pooled)
    e_std = e_mean * (1 + 2 * np.abs(mean)) / (2 * std)
    assert (np.abs(np.array(scaling.mean) - mean) <= e_mean + 1e-12 * np.abs(mean)).all()
    assert (np.abs(np.array(scaling.std) - std) <= e_std + 1e-9 * std).all()


def test_lane_size_follows_the_documented_bounds() -> None:
    spec = StatisticsSpec(((-5000.0, 5000.0),) * 30, bins=64)
    layout = LaneLayout(statistics_lanes(spec, 10**6), bits=32, max_n=64)
    assert layout.limb_bits == 26
    assert spec.length == 30 * 69
    limbs = [layout.limbs(lane) for lane in layout.lanes[:5]]
    assert limbs == [2, 3, 3, 2, 2]  # count, sum, sum_sq, below, above: the module docstring's example
    assert layout.size == 4200
    small = StatisticsSpec(((0.0, 1.0),))
    with pytest.raises(InvalidArgument, match="exceed the 1000 one site may sum"):
        statistics_lane_values(site_statistics(np.zeros((1001, 1)), small), small, 1000)
    with pytest.raises(ConfigError, match="max_rows"):
        statistics_lanes(small, 0)
    with pytest.raises(InvalidArgument, match="missing"):
        statistics_of_totals({}, small)


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.lists(st.floats(-1e9, 1e9, allow_nan=False), min_size=3, max_size=3), min_size=1, max_size=9),
    bits=st.integers(16, 32),
    scale=st.sampled_from([1.0, 2.0**8, 2.0**20]),
)
def test_lane_sums_are_exact_up_to_rounding(values: list[list[float]], bits: int, scale: float) -> None:
    """Any values within the bound, any number of summands up to max_n: the ring sum of the lanes' limbs decodes to
    the exact sum within n / (2 * scale) (carries resolved after the sum, signs through two's complement)."""
    n = len(values)
    layout = LaneLayout(tuple(Lane(f"v{i}", scale, 1e9, signed=True) for i in range(3)), bits, 9)
    modulus = 1 << bits
    total = np.zeros(layout.size, np.int64)
    for v in values:
        total = (total + layout.encode({f"v{i}": x for i, x in enumerate(v)}).astype(np.int64)) % modulus
    exact = [math.fsum(v[i] for v in values) for i in range(3)]
    decoded = layout.decode(total)
    for i, e in enumerate(exact):
        # float64 holds the decoded integer to 53 bits: the rounding bound, plus one float64 ulp of the sum.
        assert abs(decoded[f"v{i}"] - e) <= n / (2 * scale) + abs(e) * 2.0**-52


def test_feature_scaling_travels_and_refuses_nonsense() -> None:
    scaling = FeatureScaling((1.0, -2.0), (0.5, 3.0), (-math.inf, -10.0), (4.0, math.inf))
    back = FeatureScaling.from_proto(scaling.to_proto())
    assert back == scaling
    assert FeatureScaling.from_proto(pb.FeatureScaling()) is None
    for bad in (
        pb.FeatureScaling(mean=[0.0], std=[0.0], lower=[0.0], upper=[1.0]),
        pb.FeatureScaling(mean=[0.0, 1.0], std=[1.0], lower=[0.0], upper=[1.0]),
        pb.FeatureScaling(mean=[math.nan], std=[1.0], lower=[0.0], upper=[1.0]),
        pb.FeatureScaling(mean=[0.0], std=[1.0], lower=[2.0], upper=[1.0]),
    ):
        with pytest.raises(InvalidArgument):
            FeatureScaling.from_proto(bad)
    np.testing.assert_allclose(scaling.apply(np.array([[10.0, -20.0]])), [[(4 - 1) / 0.5, (-10 + 2) / 3]])


def test_derive_scaling_refuses_what_it_cannot_use() -> None:
    spec = StatisticsSpec(((0.0, 1.0),), bins=4)
    with pytest.raises(InvalidArgument, match="at least 2"):
        derive_scaling(site_statistics(np.array([[0.5]]), spec), spec)
    with pytest.raises(InvalidArgument, match="lanes"):
        derive_scaling(np.zeros(3), spec)
    with pytest.raises(ConfigError, match="quantiles"):
        derive_scaling(site_statistics(np.array([[0.5], [0.7]]), spec), spec, 0.6, 0.9)
    constant = derive_scaling(site_statistics(np.full((5, 1), 0.25), spec), spec)
    assert constant.std == (1.0,)  # a constant feature is centred, not blown up


def test_tasks_use_the_federations_scaling_and_fall_back_to_constants(sites: dict[str, np.ndarray]) -> None:
    """breast_cancer declares ranges that hold every record, standardizes with the scaling a job sends (clip, then
    standardize), and uses its published constants only when none is sent."""
    task = breast_cancer.TASK
    x, y, _ = load_source("breast_cancer")
    spec = _spec()
    outside = site_statistics(x, spec).reshape(spec.features, spec.block)[:, 3:5]
    assert outside.sum() == 0
    data = task.site_data((x[:300], y[:300]), (x[300:350], y[300:350]), (x[350:], y[350:]))
    constants = np.array([c for _, c, _ in breast_cancer.FEATURES]), np.array([s for _, _, s in breast_cancer.FEATURES])
    fallback, _ = dataset_tensors(data.train)
    np.testing.assert_allclose(fallback.numpy(), (x[:300] - constants[0]) / constants[1], rtol=1e-5, atol=1e-5)
    scaling = derive_scaling(task.site_statistics(data), spec, 0.01, 0.99)
    scaled = task.with_scaling(data, scaling)
    got, labels = dataset_tensors(scaled.test)
    expected = (np.clip(x[350:], scaling.lower, scaling.upper) - scaling.mean) / scaling.std
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(labels, torch.from_numpy(y[350:]))


def test_a_site_applies_the_scaling_its_train_task_carries(sites: dict[str, np.ndarray]) -> None:
    task = breast_cancer.TASK
    x, y, _ = load_source("breast_cancer")
    site = Site(task, task.site_data((x[:200], y[:200]), (x[200:250], y[200:250]), (x[250:300], y[250:300])))
    loaded = {
        s: task.site_data((v, np.zeros(len(v), np.int64)), (v[:0], y[:0]), (v[:0], y[:0])) for s, v in sites.items()
    }
    scaling = federated_scaling(task, loaded)
    message = pb.TrainTask(feature_scaling=scaling.to_proto())
    _, data = site.prepared(TaskSetup.of(message))
    got, _ = dataset_tensors(data.val)
    np.testing.assert_allclose(got.numpy(), scaling.apply(x[200:250]), rtol=1e-6)
    _, plain = site.prepared(TaskSetup.of(pb.TrainTask()))
    assert plain is site.data  # no scaling sent: the task's own fallback, as loaded


def test_a_task_without_ranges_takes_no_part() -> None:
    class Plain(TabularTask):
        name = "plain"

    assert Plain().statistics_spec() is None
    with pytest.raises(ConfigError, match="feature_ranges"):
        Plain().site_statistics(
            breast_cancer.TASK.site_data(*([(np.zeros((2, 30), np.float32), np.zeros(2, np.int64))] * 3))
        )
