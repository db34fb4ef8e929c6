"""Rotation, clipping, adaptive clipping, central Gaussian noise and the ``cohort privacy`` command."""

from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cohort_cli.privacy_cmd import register
from common.errors import ConfigError
from common.privacy import central, clipping, rotation
from common.privacy.clipping import AdaptiveClip, clip_l2


@settings(max_examples=50, deadline=None)
@given(d=st.integers(1, 700), seed=st.binary(min_size=1, max_size=32), scale=st.floats(1e-3, 1e3))
def test_rotation_is_orthonormal_and_invertible(d: int, seed: bytes, scale: float) -> None:
    x = np.random.default_rng(d).normal(size=d) * scale
    y = rotation.rotate(x, seed)
    assert len(y) == rotation.padded_length(d)
    assert len(y) >= d
    assert len(y) & (len(y) - 1) == 0
    assert np.linalg.norm(y) == pytest.approx(np.linalg.norm(x), rel=1e-12)
    np.testing.assert_allclose(rotation.unrotate(y, seed, d), x, atol=1e-9 * scale)


def test_rotation_matches_dense_hadamard() -> None:
    n = 16
    h = np.array([[1.0]])
    while len(h) < n:
        h = np.block([[h, h], [h, -h]])
    x = np.arange(n, dtype=np.float64)
    expected = h @ (rotation.signs(b"s", n) * x) / math.sqrt(n)
    np.testing.assert_allclose(rotation.rotate(x, b"s"), expected, atol=1e-12)


def test_rotation_flattens_a_spike_and_signs_are_public() -> None:
    x = np.zeros(4096)
    x[17] = 10.0
    y = rotation.rotate(x, b"job-1/round-3")
    assert np.max(np.abs(y)) < 10.0 / 32  # 10 / sqrt(4096) * a little
    np.testing.assert_array_equal(rotation.signs(b"a", 100), rotation.signs(b"a", 100))
    assert not np.array_equal(rotation.signs(b"a", 100), rotation.signs(b"b", 100))
    assert abs(rotation.signs(b"a", 10_000).mean()) < 0.05


def test_clip_to_norm_c() -> None:
    x = np.random.default_rng(0).normal(size=1000)
    x *= 100.0 * 0.7 / np.linalg.norm(x)  # norm 100 C
    clipped, norm = clip_l2(x, 0.7)
    assert norm == pytest.approx(70.0)
    assert np.linalg.norm(clipped) == pytest.approx(0.7, rel=1e-12)
    small = x / 1000
    np.testing.assert_array_equal(clip_l2(small, 0.7)[0], small)
    with pytest.raises(ConfigError):
        clip_l2(np.array([np.nan]), 1.0)


def test_adaptive_clip_moves_toward_the_quantile() -> None:
    ac = AdaptiveClip(clip=1.0, target_quantile=0.5, learning_rate=0.2)
    norms = [0.1] * 10  # all below C: the clip should shrink
    count = sum(AdaptiveClip.site_bit(nm, ac.clip) for nm in norms)
    assert count == 10
    assert ac.update(count, 10) == pytest.approx(math.exp(-0.2 * 0.5))
    ac2 = AdaptiveClip(clip=1.0)
    assert ac2.update(-10, 10) > 1.0  # none below: grows
    assert AdaptiveClip.site_bit(2.0, 1.0) == -1
    assert ac2.sum_noise_std == 2 * ac2.count_noise_std


def test_adaptive_clip_noise_multipliers_combine() -> None:
    z, sigma_b = 1.0, 5.0
    z_delta = clipping.update_noise_multiplier(z, sigma_b)
    assert z_delta == pytest.approx((1 - 1 / 100) ** -0.5)
    assert clipping.effective_noise_multiplier(z_delta, sigma_b) == pytest.approx(z)
    with pytest.raises(ConfigError):
        clipping.update_noise_multiplier(2.0, 0.5)


def test_central_noise_variance() -> None:
    sigma, clip = 1.3, 0.4
    total = np.full(200_000, 3.0)
    noised = central.add_gaussian_noise(total, sigma, clip, np.random.default_rng(5))
    assert (noised - total).var() == pytest.approx((sigma * clip) ** 2, rel=0.05)
    assert abs((noised - total).mean()) < 0.01
    a = central.add_gaussian_noise(np.zeros(8), 1.0, 1.0)
    b = central.add_gaussian_noise(np.zeros(8), 1.0, 1.0)
    assert not np.array_equal(a, b)  # OS-seeded, never fixed


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="cohort")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


def test_cli_plan_and_epsilon(capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(["privacy", "epsilon", "--noise-multiplier", "1", "--delta", "1e-5", "--rounds", "1"]) == 0
    assert "epsilon 4.377" in capsys.readouterr().out
    argv = ["privacy", "plan", "--epsilon", "2.101", "--delta", "1e-5", "--rounds", "1000"]
    assert _run([*argv, "--sampling", "poisson", "--rate", "0.01", "--method", "rdp"]) == 0
    out = capsys.readouterr().out
    assert "noise multiplier 1.00" in out
    assert "RDP" in out
    with pytest.raises(ConfigError, match="population"):
        _run([*argv, "--sampling", "fixed", "--rate", "0.1"])
    with pytest.raises(ConfigError, match="rate"):
        _run([*argv, "--sampling", "poisson"])
