"""Shamir t-of-n over GF(2**521 - 1): any t shares recover the secret, t - 1 shares are consistent with every secret."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.errors import InvalidArgument
from common.secagg import shamir

secrets_32 = st.binary(min_size=32, max_size=32)


@st.composite
def sharing(draw: st.DrawFn) -> tuple[bytes, int, dict[int, int], list[int]]:
    """A secret, a threshold t, shares at n distinct points, and the points in a random order."""
    n = draw(st.integers(1, 12))
    t = draw(st.integers(1, n))
    xs = draw(st.lists(st.integers(1, 10_000), min_size=n, max_size=n, unique=True))
    secret = draw(secrets_32)
    order = draw(st.permutations(xs))
    return secret, t, shamir.split(secret, t, xs), list(order)


@settings(max_examples=150, deadline=None)
@given(sharing())
def test_any_t_shares_recover_the_secret(case: tuple[bytes, int, dict[int, int], list[int]]) -> None:
    secret, t, shares, order = case
    subset = {x: shares[x] for x in order[:t]}
    assert shamir.combine(subset, t) == secret
    assert shamir.combine(shares, t) == secret  # more than t is fine too


@settings(max_examples=150, deadline=None)
@given(sharing(), secrets_32)
def test_t_minus_1_shares_fit_every_secret(case: tuple[bytes, int, dict[int, int], list[int]], other: bytes) -> None:
    _secret, t, shares, order = case
    if t < 2:
        return
    seen = {x: shares[x] for x in order[: t - 1]}
    with pytest.raises(InvalidArgument, match=f"need at least {t} shares"):
        shamir.combine(seen, t)
    # The t - 1 shares plus (0, other) define a degree t - 1 polynomial: a sharing of `other` that agrees with
    # every share seen. So the shares seen say nothing about which secret it was.
    points = {0: int.from_bytes(other, "big"), **seen}
    fresh_x = max(shares) + 1
    value = sum(y * _basis(points, x, fresh_x) for x, y in points.items()) % shamir.PRIME
    assert shamir.combine({**seen, fresh_x: value}, t) == other


def _basis(points: dict[int, int], xi: int, at: int) -> int:
    num, den = 1, 1
    for xj in points:
        if xj != xi:
            num = num * (at - xj) % shamir.PRIME
            den = den * (xi - xj) % shamir.PRIME
    return num * pow(den, -1, shamir.PRIME) % shamir.PRIME


def test_default_randomness_differs_between_splits() -> None:
    secret = bytes(range(32))
    a, b = shamir.split(secret, 3, [1, 2, 3]), shamir.split(secret, 3, [1, 2, 3])
    assert a != b
    assert shamir.combine(a, 3) == shamir.combine(b, 3) == secret


@given(st.integers(0, shamir.PRIME - 1))
def test_share_bytes_are_fixed_length(y: int) -> None:
    data = shamir.share_to_bytes(y)
    assert len(data) == shamir.SHARE_LEN == 66
    assert shamir.share_from_bytes(data) == y


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: shamir.split(b"short", 2, [1, 2]), "32 bytes"),
        (lambda: shamir.split(bytes(32), 3, [1, 2]), "threshold"),
        (lambda: shamir.split(bytes(32), 2, [1, 1]), "distinct"),
        (lambda: shamir.split(bytes(32), 2, [0, 1]), "evaluation point"),
        (lambda: shamir.share_from_bytes(b"\xff" * 66), "not a field element"),
        (lambda: shamir.share_from_bytes(bytes(65)), "66 bytes"),
        (lambda: shamir.combine({1: 5, 2: shamir.PRIME}, 2), "not a field element"),
    ],
)
def test_bad_arguments_raise(call: object, match: str) -> None:
    assert callable(call)
    with pytest.raises(InvalidArgument, match=match):
        call()


def test_inconsistent_shares_are_detected_when_out_of_range() -> None:
    shares = shamir.split(bytes(32), 2, [1, 2])
    shares[2] = (shares[2] + 12345) % shamir.PRIME
    with pytest.raises(InvalidArgument, match="do not belong to one secret"):
        shamir.combine(shares, 2)
