"""Shamir t-of-n secret sharing of 32-byte secrets over the prime field GF(2**521 - 1).

SecAgg shares two 32-byte secrets per site and round: the X25519 mask-key private key ``s_sk`` and the self-mask seed
``b``. A 256-bit secret is an element of any field larger than 2**256; the Mersenne prime 2**521 - 1 is the smallest
convenient one (reduction is cheap and it is a well-known constant). Any ``t`` shares determine the degree ``t-1``
polynomial and so the secret; any ``t-1`` shares are uniformly distributed whatever the secret is, so they reveal
nothing about it (information-theoretically, not just computationally).

Evaluation points are small positive integers (a site's 1-based position in the round's cohort), never 0: the secret
is the polynomial's value at 0. Shares travel as fixed-length big-endian bytes (:data:`SHARE_LEN`), so their length
says nothing about their value.

Randomness comes from :mod:`secrets` (the OS CSPRNG); ``rng`` exists only so that tests can exercise the algebra with
a reproducible source, and product code never passes it.
"""

from __future__ import annotations

import math
import operator
import secrets
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from itertools import repeat

from common.errors import InvalidArgument

PRIME = 2**521 - 1
SECRET_LEN = 32
SHARE_LEN = (PRIME.bit_length() + 7) // 8  # 66 bytes

RandBelow = Callable[[int], int]


def _check_points(xs: Sequence[int]) -> None:
    if len(set(xs)) != len(xs):
        raise InvalidArgument(f"Shamir evaluation points must be distinct, got {sorted(xs)}")
    for x in xs:
        if isinstance(x, bool) or not isinstance(x, int) or not 0 < x < PRIME:
            raise InvalidArgument(f"Shamir evaluation point {x!r} must be an integer in 1..2**521-2")


def split(
    secret: bytes, t: int, xs: Sequence[int], rng: RandBelow | None = None, *, secret_len: int = SECRET_LEN
) -> dict[int, int]:
    """Share ``secret`` so that any ``t`` of the shares (one per point in ``xs``) recover it and ``t-1`` do not.

    Returns ``{x: f(x)}`` for a random polynomial ``f`` of degree ``t-1`` with ``f(0)`` = the secret as a big-endian
    integer. ``rng(n)`` must return a uniform integer in ``[0, n)``; the default is :func:`secrets.randbelow`.
    """
    if len(secret) != secret_len or secret_len * 8 >= PRIME.bit_length():
        raise InvalidArgument(f"Shamir secrets are {secret_len} bytes (at most 65), got {len(secret)}")
    if isinstance(t, bool) or not isinstance(t, int) or not 1 <= t <= len(xs):
        raise InvalidArgument(f"Shamir threshold t={t!r} must be between 1 and the number of shares {len(xs)}")
    _check_points(xs)
    draw = rng or secrets.randbelow
    coeffs = [int.from_bytes(secret, "big")] + [draw(PRIME) for _ in range(t - 1)]
    shares: dict[int, int] = {}
    top_first = coeffs[::-1]
    for x in xs:
        # Horner's rule, highest coefficient first, reduced once at the end: the points are small, so y grows by
        # only log2(x) bits a step and one reduction is cheaper than t.
        y = 0
        for c in top_first:
            y = y * x + c
        shares[x] = y % PRIME
    return shares


@lru_cache(maxsize=4096)
def _lagrange_at_zero(xs: tuple[int, ...]) -> tuple[int, ...]:
    """The Lagrange basis values l_i(0) = prod_{j != i} x_j / (x_j - x_i) for the points ``xs``.

    They depend only on which holders answered; under SecAgg+ each owner's holders are its own neighbours, so a
    round has up to n distinct sets, and the cache is sized for that. The points are small integers (positions in
    the cohort), so numerators and denominators are exact products of small integers (no reduction until the end),
    and the t denominators are inverted together with one modular inversion (Montgomery's trick): an inversion in
    this field costs as much as ~100 multiplications.
    """
    everything = math.prod(xs)
    nums = [everything // xi for xi in xs]
    dens = [
        math.prod(map(operator.sub, xs[:i], repeat(xi))) * math.prod(map(operator.sub, xs[i + 1 :], repeat(xi))) % PRIME
        for i, xi in enumerate(xs)
    ]
    prefix = [1]
    for den in dens:
        prefix.append(prefix[-1] * den % PRIME)
    inv = pow(prefix[-1], -1, PRIME)  # 1 / (d_0 * ... * d_{t-1})
    coeffs = [0] * len(xs)
    for i in range(len(xs) - 1, -1, -1):
        coeffs[i] = nums[i] % PRIME * inv * prefix[i] % PRIME  # inv * prefix[i] = 1 / d_i
        inv = inv * dens[i] % PRIME
    return tuple(coeffs)


def combine(shares: Mapping[int, int], t: int, *, secret_len: int = SECRET_LEN) -> bytes:
    """Recover the secret from at least ``t`` shares ``{x: y}``; fewer raise :class:`InvalidArgument`.

    Exactly ``t`` shares (those with the smallest ``x``) are interpolated. Extra shares are not cross-checked here:
    SecAgg checks each share against its owner's commitment before it gets here, which also names the culprit.
    A result that does not fit ``secret_len`` bytes means the shares were not of one secret and raises.
    """
    if isinstance(t, bool) or not isinstance(t, int) or t < 1:
        raise InvalidArgument(f"Shamir threshold t={t!r} must be a positive integer")
    if len(shares) < t:
        raise InvalidArgument(f"need at least {t} shares to recover the secret, got {len(shares)}")
    xs = tuple(sorted(shares)[:t])
    _check_points(xs)
    for x in xs:
        y = shares[x]
        if isinstance(y, bool) or not isinstance(y, int) or not 0 <= y < PRIME:
            raise InvalidArgument(f"share at x={x} is not a field element")
    value = sum(shares[x] * c for x, c in zip(xs, _lagrange_at_zero(xs), strict=True)) % PRIME
    if value.bit_length() > secret_len * 8:
        raise InvalidArgument("the shares do not belong to one secret (the interpolated value is out of range)")
    return value.to_bytes(secret_len, "big")


def share_to_bytes(y: int) -> bytes:
    """A share value as :data:`SHARE_LEN` big-endian bytes."""
    if not 0 <= y < PRIME:
        raise InvalidArgument("share is not a field element")
    return y.to_bytes(SHARE_LEN, "big")


def share_from_bytes(data: bytes) -> int:
    """Parse :func:`share_to_bytes` output; wrong length or a value >= p raises :class:`InvalidArgument`."""
    if len(data) != SHARE_LEN:
        raise InvalidArgument(f"a share is {SHARE_LEN} bytes, got {len(data)}")
    y = int.from_bytes(data, "big")
    if y >= PRIME:
        raise InvalidArgument("share is not a field element")
    return y
