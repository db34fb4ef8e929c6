"""Strategy building blocks without a network: server optimizers against a plain reference of the paper's rules,
robust aggregation rules against numpy on spooled update files, selection policies' distributions, learning-rate
schedules, and the job combinations that are refused."""

from __future__ import annotations

import collections
import dataclasses
import math
import random
from pathlib import Path

import numpy as np
import pytest

from cohort_cli.admin_client import format_status
from common.errors import ConfigError, InvalidArgument
from common.proto.cohort.v1 import cohort_pb2 as pb
from common.settings import TrainParamsConfig
from coordinator.config import JobConfig, PrivacyConfig, SecureAggregationConfig
from coordinator.jobspec import to_proto
from coordinator.strategy import robust
from coordinator.strategy.config import StrategyConfig
from coordinator.strategy.selection import Participation, select
from coordinator.strategy.server_opt import OptimizerState, server_step


def reference(name: str, cfg: StrategyConfig, deltas: list[list[float]]) -> list[list[float]]:
    """Each round's change to the model, element by element in plain Python (Reddi et al. 2021, Algorithm 2; Hsu et
    al. 2019 for server momentum)."""
    eta, b1, b2, tau = cfg.learning_rate, cfg.beta1, cfg.beta2, cfg.tau
    m = [0.0] * len(deltas[0])
    v = [tau * tau] * len(deltas[0])
    out = []
    for d in deltas:
        step = []
        for i, x in enumerate(d):
            if name == "fedavg":
                step.append(eta * x)
                continue
            if name == "fedavgm":
                m[i] = cfg.server_momentum * m[i] + x
                step.append(eta * m[i])
                continue
            m[i] = b1 * m[i] + (1 - b1) * x
            if name == "fedadagrad":
                v[i] = v[i] + x * x
            elif name == "fedyogi":
                v[i] = v[i] - (1 - b2) * x * x * (1.0 if v[i] - x * x > 0 else -1.0 if v[i] - x * x < 0 else 0.0)
            else:
                v[i] = b2 * v[i] + (1 - b2) * x * x
            step.append(eta * m[i] / (math.sqrt(v[i]) + tau))
        out.append(step)
    return out


@pytest.mark.parametrize("name", ["fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad"])
def test_server_optimizers_follow_the_papers_update_rules(name: str) -> None:
    cfg = StrategyConfig(name=name, server_lr=0.3, tau=1e-2)  # type: ignore[arg-type]
    rng = np.random.default_rng(1)
    deltas = [list(rng.normal(0, 0.05, 40)) for _ in range(6)]
    want = reference(name, cfg, deltas)
    state = OptimizerState()
    for d, expected in zip(deltas, want, strict=True):
        got, state = server_step(cfg, np.array(d), state)
        # The moments are kept as float32 between rounds, so the reference and the optimizer part by float32 rounding.
        assert np.allclose(got, expected, rtol=1e-5, atol=1e-6), name
    assert state.step == len(deltas)
    assert sorted(state.moments) == {"fedavg": [], "fedavgm": ["m"]}.get(name, ["m", "v"])


def test_plain_fedavg_passes_the_mean_through_unchanged() -> None:
    delta = np.random.default_rng(0).normal(size=17)
    got, state = server_step(StrategyConfig(), delta, OptimizerState())
    assert got is delta or np.array_equal(got, delta)
    assert state.moments == {}


def write_updates(tmp_path: Path, rows: np.ndarray) -> robust.Updates:
    files, weights = {}, {}
    for i, row in enumerate(rows):
        site = f"site-{i:02d}"
        path = tmp_path / f"{site}.update"
        path.write_bytes(row.astype("<f4").tobytes())
        files[site], weights[site] = path, float(i + 1)
    return robust.Updates(files, weights, rows.shape[1])


@pytest.mark.parametrize("budget", [1 << 12, 1 << 26])  # many small coordinate blocks, or one
def test_median_and_trimmed_mean_match_numpy_whatever_the_block_size(tmp_path: Path, budget: int) -> None:
    rows = np.random.default_rng(2).normal(size=(7, 3001)).astype(np.float32)
    updates = write_updates(tmp_path, rows)
    median = robust.aggregate(StrategyConfig(aggregation="median"), updates, budget)
    assert np.allclose(median.delta, np.median(rows.astype(np.float64), axis=0))
    trimmed = robust.aggregate(StrategyConfig(aggregation="trimmed_mean", trim_fraction=0.3), updates, budget)
    ordered = np.sort(rows.astype(np.float64), axis=0)
    assert np.allclose(trimmed.delta, ordered[2:5].mean(axis=0))  # floor(0.3 * 7) = 2 cut from each end
    assert trimmed.report["trimmed_per_side"] == 2


def test_krum_picks_an_honest_update_and_multi_krum_averages_the_honest_ones(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    honest = rng.normal(0, 0.1, size=(6, 500)) + 1.0
    attackers = -10 * honest[:2]  # sign-flipped and scaled
    updates = write_updates(tmp_path, np.vstack([attackers, honest]).astype(np.float32))
    one = robust.aggregate(StrategyConfig(aggregation="krum", byzantine_sites=2), updates, 1 << 13)
    assert one.report["krum_selected"] not in (["site-00"], ["site-01"])
    assert len(one.report["krum_selected"]) == 1  # type: ignore[arg-type]
    many = robust.aggregate(StrategyConfig(aggregation="multi_krum", byzantine_sites=2), updates, 1 << 13)
    kept = many.report["krum_selected"]
    assert kept == [f"site-{i:02d}" for i in range(2, 8)]  # n - f = 6: exactly the honest sites
    weights = np.arange(3, 9, dtype=np.float64)
    want = (weights[:, None] * honest.astype(np.float32).astype(np.float64)).sum(axis=0) / weights.sum()
    assert np.allclose(many.delta, want)


def test_krum_refuses_too_few_updates(tmp_path: Path) -> None:
    updates = write_updates(tmp_path, np.ones((4, 10), dtype=np.float32))
    with pytest.raises(InvalidArgument, match="at least 5 updates"):
        robust.aggregate(StrategyConfig(aggregation="krum", byzantine_sites=1), updates)


def test_norm_bound_scales_only_the_updates_above_it(tmp_path: Path) -> None:
    rows = np.zeros((3, 4), dtype=np.float32)
    rows[0, 0], rows[1, 1], rows[2, 2] = 0.5, 3.0, 40.0
    updates = write_updates(tmp_path, rows)
    result = robust.aggregate(StrategyConfig(norm_bound=2.0), updates)
    assert result.report["clipped_sites"] == ["site-01", "site-02"]
    assert np.allclose(result.delta, np.array([1 * 0.5, 2 * 2.0, 3 * 2.0, 0.0]) / 6)


def test_round_robin_covers_every_site_evenly() -> None:
    cfg = StrategyConfig(selection="round_robin")
    sites = [f"s{i}" for i in range(10)]
    seen = Participation()
    for number in range(1, 8):
        cohort = select(cfg, sites, 3, f"job/{number}/0", seen)
        assert len(set(cohort)) == 3
        seen.record(cohort, cohort, 10)
    counts = collections.Counter(seen.selected)
    assert sum(counts.values()) == 21
    assert max(counts.values()) - min(counts[s] for s in sites) <= 1  # 21 selections over 10 sites: 2 or 3 each


def test_availability_prefers_sites_that_deliver_and_still_tries_the_others() -> None:
    cfg = StrategyConfig(selection="availability", availability_window=5)
    sites = [f"s{i}" for i in range(8)]
    slow = {"s0", "s1"}
    seen = Participation()
    picks: collections.Counter[str] = collections.Counter()
    for number in range(1, 401):
        cohort = select(cfg, sites, 4, f"job/{number}/0", seen)
        picks.update(cohort)
        seen.record(cohort, [s for s in cohort if s not in slow], cfg.availability_window)
    slow_rate = sum(picks[s] for s in slow) / (2 * 400)
    fast_rate = sum(picks[s] for s in sites if s not in slow) / (6 * 400)
    # A slow site's weight falls to ~1/7, a fast one's rises to ~6/7: the slow ones are picked far less, not never.
    assert slow_rate < 0.5 * fast_rate
    assert min(picks[s] for s in slow) > 0
    restored = Participation.from_json(seen.to_json())
    assert select(cfg, sites, 4, "job/401/0", restored) == select(cfg, sites, 4, "job/401/0", seen)


def test_random_selection_is_the_seeded_uniform_sample() -> None:
    sites = [f"s{i}" for i in range(6)]
    want = sorted(random.Random("j/3/1").sample(sites, 4))
    assert select(StrategyConfig(), sites, 4, "j/3/1", Participation()) == want


def test_learning_rate_schedules() -> None:
    step = TrainParamsConfig(learning_rate=0.4, lr_schedule="step", lr_step_rounds=3, lr_gamma=0.5)
    assert [step.rate(n, 10) for n in (1, 3, 4, 7)] == [0.4, 0.4, 0.2, 0.1]
    cosine = TrainParamsConfig(learning_rate=0.4, lr_schedule="cosine", lr_min=0.0)
    assert cosine.rate(1, 5) == pytest.approx(0.4)
    assert cosine.rate(3, 5) == pytest.approx(0.2)
    assert cosine.rate(5, 5) == pytest.approx(0.0)
    assert TrainParamsConfig(learning_rate=0.3).rate(9, 10) == 0.3


def job(**changes: object) -> JobConfig:
    return dataclasses.replace(JobConfig(task="breast_cancer", min_sites=5), **changes)  # type: ignore[arg-type]


def test_combinations_that_cannot_work_are_refused_with_what_to_change() -> None:
    secure = SecureAggregationConfig(enabled=True)
    with pytest.raises(ConfigError, match=r"job\.strategy\.aggregation: median needs each site's own update"):
        job(strategy=StrategyConfig(aggregation="median"), secure_aggregation=secure).check("job")
    with pytest.raises(ConfigError, match="site-level differential privacy"):
        job(strategy=StrategyConfig(aggregation="krum"), privacy=PrivacyConfig(unit="site")).check("job")
    with pytest.raises(ConfigError, match=r"needs at least 7 updates per round \(2f \+ 3\); raise job.min_sites"):
        job(strategy=StrategyConfig(aggregation="krum", byzantine_sites=2)).check("job")
    with pytest.raises(ConfigError, match=r"job\.strategy\.buffer_size: with secure aggregation each buffer is one"):
        job(strategy=StrategyConfig(mode="async", buffer_size=1), secure_aggregation=secure).check("job")
    with pytest.raises(ConfigError, match=r"buffer_size: 4 is below job.min_sites \(5\)"):
        job(strategy=StrategyConfig(mode="async", buffer_size=4), secure_aggregation=secure).check("job")
    with pytest.raises(ConfigError, match=r"buffer_size: 3 is below job.min_sites \(5\)"):
        job(strategy=StrategyConfig(mode="async", buffer_size=3)).check("job")
    # What does work: norm bounding and server optimizers with secure aggregation.
    job(strategy=StrategyConfig(name="fedadam", norm_bound=1.0), secure_aggregation=secure).check("job")
    job(strategy=StrategyConfig(mode="async"), secure_aggregation=secure).check("job")  # FedBuff, one sum per buffer
    with pytest.raises(ConfigError, match=r"strategy\.tau"):
        StrategyConfig(tau=0).check("strategy")


def test_status_names_the_strategy() -> None:
    spec = to_proto(
        job(
            strategy=StrategyConfig(
                name="fedyogi", aggregation="multi_krum", byzantine_sites=1, selection="round_robin"
            ),
            params=TrainParamsConfig(lr_schedule="cosine"),
        )
    )
    reply = pb.StatusReply(federation="f", jobs=[pb.JobStatus(job_id="j", spec=spec, state="running")])
    text = format_status(reply)
    assert "strategy: fedyogi (server lr 0.1), aggregation multi_krum, f=1, selection round_robin" in text
    assert "local lr cosine schedule" in text
    assert "strategy: fedavg (server lr 1), aggregation mean, selection random" in format_status(
        pb.StatusReply(jobs=[pb.JobStatus(job_id="k", spec=to_proto(job()))])
    )
