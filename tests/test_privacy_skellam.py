"""The Skellam mechanism: its RDP bound, convergence to the Gaussian, sampling, ring headroom and the distributed
noise law under dropouts."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import skellam

from common.errors import ConfigError
from common.privacy.accounting import Accountant, PrivacyEvent, epsilon_for
from common.privacy.clipping import clip_l2
from common.privacy.rdp import poisson_subsampled_rdp, skellam_rdp
from common.privacy.skellam import (
    SkellamParams,
    decode_private,
    privatize,
    skellam_noise,
    skellam_tail,
)
from common.secagg.prg import U32Array

DELTA = 1e-5


@pytest.mark.parametrize("variance", [2.0, 8.0, 40.0])
@pytest.mark.parametrize("alpha", [2.0, 5.0, 20.0])
def test_rdp_bound_dominates_exact_divergence(variance: float, alpha: float) -> None:
    # One coordinate, shift 1 (D1 = D2 = 1): exact Renyi divergence of Sk shifted vs not, by summing the pmf.
    k = np.arange(-2000, 2001)
    lp = skellam.logpmf(k - 1, variance / 2, variance / 2)
    lq = skellam.logpmf(k, variance / 2, variance / 2)
    mask = np.isfinite(lp) & np.isfinite(lq)
    z = alpha * lp[mask] + (1 - alpha) * lq[mask]
    exact = float(np.log(np.sum(np.exp(z - z.max()))) + z.max()) / (alpha - 1)
    bound = float(skellam_rdp([alpha], variance, 1.0, 1.0)[0])
    gaussian = alpha / (2 * variance)
    assert gaussian * 0.999 <= bound
    assert exact <= bound + 1e-12


def test_skellam_epsilon_approaches_gaussian_as_bits_grow() -> None:
    gaussian = epsilon_for(1.0, DELTA, 100, "full", 1.0, "rdp")
    gaps, inflations = [], []
    for bits in (16, 20, 24, 32):
        sk = SkellamParams.choose(l2_clip=1.0, noise_multiplier=1.0, dim=40_000, min_survivors=8, max_n=10, bits=bits)
        acc = Accountant("rdp", DELTA, events=[PrivacyEvent("skellam", 1.0, "full", count=100, skellam=sk)])
        gaps.append(abs(acc.epsilon() - gaussian))
        # noise std per coordinate in float units, over sigma * C: > 1 by the rounding term sqrt(d) / scale
        inflations.append(math.sqrt(sk.total_variance) / sk.scale)
    assert gaps == sorted(gaps, reverse=True)
    assert gaps[-1] < 1e-3 * gaussian
    assert inflations == sorted(inflations, reverse=True)
    assert inflations[0] > 1.05
    assert inflations[-1] < 1.0001


def test_generic_subsampling_bound_dominates_gaussian_exact() -> None:
    from dp_accounting.rdp.rdp_privacy_accountant import _compute_rdp_poisson_subsampled_gaussian

    orders = np.arange(2.0, 65.0)
    sigma, q = 1.5, 0.05

    def base(a: np.ndarray) -> np.ndarray:
        return a / (2 * sigma**2)

    bound = poisson_subsampled_rdp(orders, q, base)
    exact = _compute_rdp_poisson_subsampled_gaussian(q, sigma, orders)
    assert np.all(bound >= exact * (1 - 1e-9))
    assert np.all(bound[:10] < 3 * exact[:10])  # tight enough to be useful at small orders
    np.testing.assert_allclose(poisson_subsampled_rdp(orders, 1.0, base), base(orders))
    assert np.isinf(poisson_subsampled_rdp([1.5], q, base)).all()


def test_poisson_skellam_event_costs_at_least_the_gaussian() -> None:
    sk = SkellamParams.choose(l2_clip=1.0, noise_multiplier=1.0, dim=1000, min_survivors=8, max_n=10)
    acc = Accountant("rdp", DELTA, events=[PrivacyEvent("skellam", 1.0, "poisson", 0.1, 100, sk)])
    eps = acc.epsilon()
    assert epsilon_for(1.0, DELTA, 100, "poisson", 0.1, "rdp") <= eps < epsilon_for(1.0, DELTA, 100, "full", 1, "rdp")


def test_noise_moments_and_type() -> None:
    noise = skellam_noise(200_000, 50.0, np.random.default_rng(1))
    assert noise.dtype == np.int64
    assert abs(noise.mean()) < 0.1
    assert noise.var() == pytest.approx(50.0, rel=0.02)
    assert skellam_noise(10, 4.0).shape == (10,)  # default: OS-seeded generator


@pytest.mark.parametrize("variance", [3.0, 30.0, 1e4])
def test_tail_bound_dominates_exact_tail(variance: float) -> None:
    for k in (1.0, 3.0, 6.0, 9.0):
        t = math.ceil(k * math.sqrt(variance))
        exact = 2 * float(skellam.sf(t - 1, variance / 2, variance / 2))  # P(|X| >= t)
        assert exact <= skellam_tail(t, variance)
        if 1e-12 < exact < 0.1:  # and not vacuous (scipy's sf underflows further out)
            assert skellam_tail(t, variance) < 50 * exact


def test_params_fit_the_ring_and_the_target_variance() -> None:
    sk = SkellamParams.choose(l2_clip=2.0, noise_multiplier=0.8, dim=1000, min_survivors=5, max_n=9, bits=24)
    enc = sk.encoding()
    assert enc.max_n * (enc.levels + enc.headroom) < 2**23
    assert sk.padded_dim == 1024
    assert sk.total_variance >= (0.8 * 2.0 * sk.scale) ** 2
    assert sk.effective_noise_multiplier >= 0.8
    assert SkellamParams.from_dict(sk.to_dict()) == sk
    with pytest.raises(ConfigError, match="more bits"):
        SkellamParams.choose(l2_clip=1.0, noise_multiplier=50.0, dim=1 << 20, min_survivors=1, max_n=1000, bits=16)


def _noised_sum(sk: SkellamParams, updates: list[np.ndarray], seed: bytes, rng: np.random.Generator) -> U32Array:
    total = np.zeros(sk.padded_dim, dtype=np.int64)
    for u in updates:
        total += privatize(u, sk, seed, rng=rng)
    return (total & ((1 << sk.bits) - 1)).astype(np.uint32)


@pytest.mark.parametrize("survivors", [7, 8, 10])
def test_distributed_noise_at_least_sigma_c_under_dropouts(survivors: int) -> None:
    sigma, clip, n, min_survivors = 1.0, 0.5, 10, 7
    sk = SkellamParams.choose(
        l2_clip=clip, noise_multiplier=sigma, dim=1000, min_survivors=min_survivors, max_n=n, bits=24
    )
    rng = np.random.default_rng(3)
    # analytic: any survivor set of size >= min_survivors carries at least (sigma C)^2 per coordinate
    assert survivors * sk.per_site_mu / sk.scale**2 >= (sigma * clip) ** 2
    samples = np.concatenate(
        [
            decode_private(_noised_sum(sk, [np.zeros(1000)] * survivors, bytes([t]), rng), sk, survivors, bytes([t]))
            for t in range(8)
        ]
    )
    expected = survivors * sk.per_site_mu / sk.scale**2
    assert samples.var() == pytest.approx(expected, rel=0.05)
    assert samples.var() >= (sigma * clip) ** 2 * (1 - 4 * math.sqrt(2 / samples.size))


def test_distributed_sum_recovers_clipped_updates() -> None:
    sk = SkellamParams.choose(l2_clip=1.0, noise_multiplier=0.01, dim=300, min_survivors=3, max_n=4, bits=32)
    rng = np.random.default_rng(4)
    updates = [clip_l2(rng.normal(size=300), 1.0)[0] for _ in range(4)]
    updates[0] = clip_l2(np.full(300, 50.0), 1.0)[0]  # a huge update contributes norm C
    got = decode_private(_noised_sum(sk, updates, b"round-7", rng), sk, 4, b"round-7")
    std = math.sqrt(4 * sk.per_site_mu) / sk.scale
    assert np.max(np.abs(got - np.sum(updates, axis=0))) < 6 * std + 4 / sk.scale
