"""Exact sums of large fixed-point numbers in the small ring of secure aggregation: each number split into limbs.

``common.secagg.encoding`` fits one clipped update coordinate into one element of Z_2^b (b <= 32) by giving up
precision. Some sums must be exact and are far larger than 2^b: the feature statistics of a data set (a sum of
squares of a feature over a million records), counts, histograms. Here each real number becomes a wide integer,
and the integer travels as several ring elements ("limbs"), each summed by secure aggregation without wrapping.

**Fixed point.** A value ``v`` becomes the integer ``q = round(v * 2**frac_bits)`` (round to nearest: statistics need
no unbiased randomness; the error is at most ``2**-(frac_bits + 1)`` per site and value, so at most
``n * 2**-(frac_bits + 1)`` in a sum over n sites). Every value a site sends must satisfy ``|v| <= bound`` (the caller
derives ``bound`` from what it encodes: for feature statistics, rows times the square of the declared range).

**Width.** The sum over at most ``max_n`` sites satisfies ``|sum q| <= max_n * bound * 2**frac_bits``. Each ``q`` is
written in two's complement with ``T = limbs * limb_bits`` bits, where T is the smallest multiple of ``limb_bits`` with
``max_n * bound * 2**frac_bits < 2**(T-1)``; so the sum modulo 2^T, read back as a centred value, is exact.

**Limbs.** ``q mod 2**T`` is cut into ``limbs`` unsigned pieces of ``limb_bits`` bits, least significant first. Each
piece is below 2^limb_bits, and ``limb_bits = b - ceil(log2(max_n))``, so a sum of at most ``max_n`` pieces is below
``max_n * 2**limb_bits <= 2**b``: the ring never wraps a limb sum, and the coordinator recovers each limb sum exactly.
Recombining ``sum_j limb_sum_j * 2**(j * limb_bits)`` gives ``sum_i (q_i mod 2**T)``, whose value mod 2^T is the
exact sum of the q_i: carries between limbs are resolved after the sum, not before.

**Cost.** ``limbs`` ring elements per value. Example (feature statistics): b = 32, max_n = 64 sites (limb_bits = 26),
10^6 rows per site, a declared range of |x| <= 10^3 (bound 10^12 for the sum of squares), frac_bits = 20:
T must exceed 6 + 40 + 20 + 1 = 67 bits, so 3 limbs (78 bits) per value.

Secure aggregation's masks add uniformly random values mod 2^b to each element and cancel in the sum; nothing here
depends on them. Distributed DP noise is not added here (the bound above leaves no room for it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from common.errors import InvalidArgument
from common.secagg.prg import U32Array, check_bits

F64Array = NDArray[np.float64]
DEFAULT_FRAC_BITS = 20


@dataclass(frozen=True)
class LimbEncoding:
    """Public parameters: every site and the coordinator use the same values. Build with :meth:`choose`."""

    bits: int  # the ring Z_2^bits that secure aggregation sums in
    max_n: int  # most summands (sites) a sum may have
    bound: float  # |value| <= bound for every value one site encodes
    frac_bits: int  # fixed point: units of 2**-frac_bits
    limb_bits: int
    limbs: int

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if self.max_n < 1 or not (math.isfinite(self.bound) and self.bound > 0) or not 0 <= self.frac_bits <= 60:
            raise InvalidArgument("max_n must be >= 1, bound a positive finite number, frac_bits in 0..60")
        if not 1 <= self.limb_bits <= self.bits - math.ceil(math.log2(self.max_n)):
            raise InvalidArgument(f"limbs of {self.limb_bits} bits would wrap a sum over {self.max_n} sites")
        if self.max_n * self._units_bound() >= 2 ** (self.width - 1):
            raise InvalidArgument(f"{self.limbs} limbs of {self.limb_bits} bits cannot hold the sum; use more limbs")

    @classmethod
    def choose(cls, bits: int, max_n: int, bound: float, frac_bits: int = DEFAULT_FRAC_BITS) -> LimbEncoding:
        """The fewest limbs that hold a sum of ``max_n`` values of magnitude ``bound`` exactly (module docstring)."""
        check_bits(bits)
        if isinstance(max_n, bool) or not isinstance(max_n, int) or max_n < 1:
            raise InvalidArgument(f"max_n must be a positive integer, got {max_n!r}")
        limb_bits = bits - math.ceil(math.log2(max_n))
        if limb_bits < 1:
            raise InvalidArgument(f"a {bits}-bit ring cannot sum {max_n} limbs without wrapping")
        if not (math.isfinite(bound) and bound > 0):
            raise InvalidArgument(f"bound must be a positive finite number, got {bound!r}")
        units = math.ceil(math.ldexp(bound, frac_bits)) + 1
        needed = (max_n * units).bit_length() + 1  # the sign bit
        return cls(bits, max_n, float(bound), frac_bits, limb_bits, -(-needed // limb_bits))

    def _units_bound(self) -> int:
        return math.ceil(math.ldexp(self.bound, self.frac_bits)) + 1

    @property
    def width(self) -> int:
        """T: the two's-complement width of one value (limbs * limb_bits)."""
        return self.limbs * self.limb_bits

    def error_bound(self, n: int) -> float:
        """Largest |decoded sum - exact sum| per value for a sum over ``n`` sites (rounding only)."""
        return n * 2.0 ** -(self.frac_bits + 1)

    def encode(self, values: NDArray[np.floating]) -> U32Array:
        """``len(values) * limbs`` ring elements: each value's limbs, least significant first."""
        v = np.asarray(values, dtype=np.float64)
        if v.ndim != 1:
            raise InvalidArgument(f"encode takes a 1-D array, got shape {v.shape}")
        if not np.isfinite(v).all():
            raise InvalidArgument("a value to encode is NaN or infinite")
        if len(v) and float(np.abs(v).max()) > self.bound:
            raise InvalidArgument(f"a value exceeds the encoding's bound {self.bound:g}; the sum could wrap")
        modulus = 1 << self.width
        mask = (1 << self.limb_bits) - 1
        out = np.empty(len(v) * self.limbs, dtype=np.uint32)
        scaled = np.rint(np.ldexp(v, self.frac_bits))  # exact power-of-two scaling, then round to nearest
        for i, q in enumerate(scaled.tolist()):
            u = int(q) % modulus  # two's complement in T bits (Python ints: no overflow)
            for j in range(self.limbs):
                out[i * self.limbs + j] = (u >> (j * self.limb_bits)) & mask
        return out

    def decode(self, total: U32Array, n: int) -> F64Array:
        """The exact (up to rounding) sum of ``n`` sites' values from the ring sum of their encodings."""
        if not 1 <= n <= self.max_n:
            raise InvalidArgument(f"cannot decode a sum over {n} sites with parameters for at most {self.max_n}")
        limbs = np.asarray(total)
        if limbs.ndim != 1 or len(limbs) % self.limbs:
            raise InvalidArgument(f"expected a multiple of {self.limbs} limbs, got shape {limbs.shape}")
        ring = (1 << self.bits) - 1
        modulus, half = 1 << self.width, 1 << (self.width - 1)
        rows = (limbs.astype(np.uint64) & np.uint64(ring)).reshape(-1, self.limbs).tolist()
        out = np.empty(len(rows), dtype=np.float64)
        for i, row in enumerate(rows):
            u = sum(int(s) << (j * self.limb_bits) for j, s in enumerate(row)) % modulus
            out[i] = math.ldexp(float(u - modulus if u >= half else u), -self.frac_bits)
        return out

    def add(self, a: U32Array, b: U32Array) -> U32Array:
        """Ring sum of two encodings (what secure aggregation computes; for tests and in-process sums)."""
        total = (a.astype(np.uint64) + b.astype(np.uint64)) & np.uint64((1 << self.bits) - 1)
        return total.astype(np.uint32)
