"""The accountant against dp-accounting computed directly (independent oracles), plus planning and persistence."""

from __future__ import annotations

import dp_accounting
import pytest
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from common.errors import ConfigError
from common.privacy.accounting import Accountant, PrivacyEvent, epsilon_for, plan_noise_multiplier
from common.privacy.skellam import SkellamParams

DELTA = 1e-5
ADD_REMOVE = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
REPLACE_ONE = dp_accounting.NeighboringRelation.REPLACE_ONE


def _direct(method: str, event: dp_accounting.DpEvent, count: int, relation: object = ADD_REMOVE) -> float:
    acc: dp_accounting.PrivacyAccountant
    if method == "pld":
        acc = pld_privacy_accountant.PLDAccountant(neighboring_relation=relation)
    else:
        acc = rdp_privacy_accountant.RdpAccountant(neighboring_relation=relation)
    acc.compose(event, count)
    return float(acc.get_epsilon(DELTA))


@pytest.mark.parametrize(
    ("method", "expected"),
    [("pld", 1.828), ("rdp", 2.101)],
)
def test_issue_oracle_poisson(method: str, expected: float) -> None:
    eps = epsilon_for(1.0, DELTA, 1000, "poisson", 0.01, method)  # type: ignore[arg-type]
    assert eps == pytest.approx(expected, abs=0.01)
    assert eps == pytest.approx(
        _direct(method, dp_accounting.PoissonSampledDpEvent(0.01, dp_accounting.GaussianDpEvent(1.0)), 1000), abs=1e-6
    )


def test_issue_oracle_exact_gaussian() -> None:
    eps = epsilon_for(1.0, DELTA, 1, "full", 1.0, "pld")
    assert eps == pytest.approx(4.377, abs=0.01)
    assert eps == pytest.approx(_direct("pld", dp_accounting.GaussianDpEvent(1.0), 1), abs=0.01)


@pytest.mark.parametrize(("sigma", "rounds"), [(4.0, 100), (2.0, 10)])
def test_full_participation_pld_matches_library(sigma: float, rounds: int) -> None:
    ours = epsilon_for(sigma, DELTA, rounds, "full", 1.0, "pld")
    assert ours == pytest.approx(_direct("pld", dp_accounting.GaussianDpEvent(sigma), rounds), abs=0.01)


def test_full_participation_rdp_matches_library() -> None:
    ours = epsilon_for(3.0, DELTA, 100, "full", 1.0, "rdp")
    assert ours == pytest.approx(_direct("rdp", dp_accounting.GaussianDpEvent(3.0), 100), abs=0.01)


@pytest.mark.parametrize("method", ["pld", "rdp"])
def test_poisson_other_setting(method: str) -> None:
    ours = epsilon_for(1.3, DELTA, 200, "poisson", 0.05, method)  # type: ignore[arg-type]
    direct = _direct(method, dp_accounting.PoissonSampledDpEvent(0.05, dp_accounting.GaussianDpEvent(1.3)), 200)
    assert ours == pytest.approx(direct, abs=0.01)


def test_fixed_cohort_is_sampling_without_replacement_replace_one() -> None:
    # 10 of 100 sites a round; replace-one doubles the clipped sum's sensitivity, so the library sees sigma / 2.
    ours = epsilon_for(4.0, DELTA, 100, "fixed", 0.1, "rdp", population=100)
    wor = dp_accounting.SampledWithoutReplacementDpEvent(100, 10, dp_accounting.GaussianDpEvent(2.0))
    assert ours == pytest.approx(_direct("rdp", wor, 100, REPLACE_ONE), abs=0.01)
    poisson = epsilon_for(4.0, DELTA, 100, "poisson", 0.1, "rdp")
    assert ours > poisson  # not treated as (the cheaper) Poisson sampling


def test_fixed_cohort_refused_where_unsupported() -> None:
    event = PrivacyEvent.fixed_cohort(2.0, cohort=10, population=100)
    with pytest.raises(ConfigError, match="replace-one"):
        Accountant("pld", DELTA, "replace_one").compose(event)
    with pytest.raises(ConfigError, match="replace-one"):
        Accountant("rdp", DELTA).compose(event)
    with pytest.raises(ConfigError, match="add/remove"):
        Accountant("rdp", DELTA, "replace_one").compose(PrivacyEvent("gaussian", 1.0, "poisson", 0.1))
    with pytest.raises(ConfigError):
        PrivacyEvent("gaussian", 1.0, "fixed", 0.1)  # no population


def test_skellam_needs_rdp() -> None:
    sk = SkellamParams.choose(l2_clip=1.0, noise_multiplier=1.0, dim=10, min_survivors=3, max_n=5)
    with pytest.raises(ConfigError, match="Skellam"):
        Accountant("pld", DELTA).compose(PrivacyEvent("skellam", 1.0, "full", skellam=sk))


def test_replace_one_full_gaussian_doubles_sensitivity() -> None:
    acc = Accountant("rdp", DELTA, "replace_one", [PrivacyEvent("gaussian", 2.0, "full", count=50)])
    assert acc.epsilon() == pytest.approx(epsilon_for(1.0, DELTA, 50, "full", 1.0, "rdp"), abs=1e-9)


@pytest.mark.parametrize("method", ["pld", "rdp"])
def test_rounds_one_by_one_equal_batch(method: str) -> None:
    acc = Accountant(method, DELTA)  # type: ignore[arg-type]
    for _ in range(50):
        acc.compose(PrivacyEvent("gaussian", 1.0, "poisson", 0.02))
    assert acc.epsilon() == pytest.approx(epsilon_for(1.0, DELTA, 50, "poisson", 0.02, method), abs=1e-9)  # type: ignore[arg-type]
    assert Accountant(method, DELTA).epsilon() == 0.0  # type: ignore[arg-type]


def test_json_round_trip_rebuilds_epsilon() -> None:
    sk = SkellamParams.choose(l2_clip=0.5, noise_multiplier=1.2, dim=100, min_survivors=4, max_n=6, bits=24)
    acc = Accountant("rdp", DELTA)
    acc.compose(PrivacyEvent("gaussian", 1.0, "poisson", 0.05, count=3))
    acc.compose(PrivacyEvent("skellam", 1.2, "full", skellam=sk))
    acc.compose(PrivacyEvent("gaussian", 2.0, "full"))
    again = Accountant.from_json(acc.to_json())
    assert again.events == acc.events
    assert again.epsilon() == acc.epsilon()
    with pytest.raises(ConfigError):
        Accountant.from_json('{"method": "pld"}')


def test_plan_rdp_is_smallest_sigma() -> None:
    sigma = plan_noise_multiplier(2.101, DELTA, 1000, "poisson", 0.01, "rdp")
    assert sigma == pytest.approx(1.0, rel=2e-3)
    assert epsilon_for(sigma, DELTA, 1000, "poisson", 0.01, "rdp") <= 2.101
    assert epsilon_for(sigma * (1 - 2e-3), DELTA, 1000, "poisson", 0.01, "rdp") > 2.101


@pytest.mark.slow
def test_plan_pld_exact_gaussian_and_fixed() -> None:
    assert plan_noise_multiplier(4.377, DELTA, 1, "full", 1.0, "pld") == pytest.approx(1.0, rel=2e-3)
    sigma = plan_noise_multiplier(3.0, DELTA, 50, "fixed", 0.2, "rdp", population=50)
    assert epsilon_for(sigma, DELTA, 50, "fixed", 0.2, "rdp", 50) <= 3.0
    with pytest.raises(ConfigError):
        plan_noise_multiplier(1e-9, DELTA, 10, max_sigma=10)
