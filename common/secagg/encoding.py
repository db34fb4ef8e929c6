"""From float updates to integers mod 2**b and back, and the bit-packed wire form of those integers.

Masking needs a finite ring, so each site turns its update into integers first:

1. clip every coordinate to [-c, c] (``clip``);
2. multiply by the site's weight ``w`` in [0, 1] (sample-count weighting, below) and by ``scale``;
3. round stochastically: ``v`` becomes ``floor(v) + 1`` with probability ``v - floor(v)``, else ``floor(v)``, so the
   rounding is unbiased (E[q] = v) and its error is below one unit. The coin flips come from AES-CTR under a fresh
   random key (a CSPRNG), so they are neither predictable nor reproducible by anyone else;
4. store the integer q mod 2**b in two's complement (``q & (2**b - 1)``).

**No wrap-around.** Let ``L = floor(c * scale)`` (we choose ``scale = L / c`` with L an integer, so ``c * scale = L``
exactly). Each site's integer satisfies ``|q| <= ceil(w * c * scale) <= L`` (rounding never leaves [floor, ceil]
and we clamp to [-L, L] as a guard against float rounding). A sum over n sites therefore satisfies
``|sum q| <= n * L``. Choosing ``L = floor((2**(b-1) - 1) / max_n) - headroom`` gives
``|sum q| <= max_n * L < 2**(b-1)`` for every n <= max_n, so the sum mod 2**b, read back as a centred value in
(-2**(b-1), 2**(b-1)), is the exact integer sum. ``headroom`` reserves integer range per site for noise a caller adds
after encoding (e.g. distributed DP noise clamped to ``|noise| <= headroom``); it is 0 unless asked for.

**Default b.** The smallest b in 16..32 that leaves at least 2**precision_bits levels per unit of weight·clip for one
site (``L >= 2**precision_bits``, default 16 bits: a step of c/65536), or 32 if none does. More bits cost upload bytes
(b/8 per coordinate) and buy precision.

**Quantisation bound.** Decoding divides the centred sum by ``scale``. Each site's rounding error is below one unit, so
``|decode(sum) - sum_k w_k * clip(x_k)| < n / scale = n * c / L`` per coordinate (the standard deviation is at most
``sqrt(n) / (2 * scale)``). Divided by the weight total ``W = sum_k w_k`` for a weighted mean, the bound is
``n / (scale * W)``. When W itself comes out of the sum (the weight lane, below) as W', the weighted mean
S'/W' is within ``2 * n / (scale * W')`` of the exact one: |S'/W' - S/W| <= |S' - S| / W' + |S| * |W - W'| / (W W')
and |S| <= c * W, |W - W'| < n / (scale * c). Float64 arithmetic adds only ~1e-16 relative error.

**Weights.** FedAvg weights site k by its sample count m_k. To keep each site's contribution bounded (which the ring
and DP both need), the weight is ``w_k = min(m_k, weight_cap) / weight_cap`` in [0, 1] with a public ``weight_cap``.
Sites above the cap count as the cap (bounded influence). The weight total W can be aggregated securely too: append
the constant ``c`` as an extra coordinate (:func:`with_weight_lane`); that lane decodes to ``c * W``.

**Packing.** Values are packed little-endian bit after bit: value i occupies bits [i*b, (i+1)*b) of the stream, so
``d`` values take exactly ``ceil(d*b/8)`` bytes, and any 8 consecutive values aligned to a multiple of 8 take exactly
b bytes (which is what lets the coordinator unpack a chunked stream as it arrives).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from common.errors import InvalidArgument
from common.secagg.prg import BLOCK, MAX_BITS, MIN_BITS, Lanes, U32Array, check_bits, check_vector, keystream

F64Array = NDArray[np.float64]
DEFAULT_PRECISION_BITS = 16


@dataclass(frozen=True)
class EncodingParams:
    """The public fixed-point parameters of a round. Build with :meth:`choose`; every site and the coordinator
    must use the same values (they go into the round's task)."""

    bits: int
    clip: float
    max_n: int
    levels: int  # L: one site's integers lie in [-L, L]
    headroom: int = 0

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise InvalidArgument(f"clip must be a positive finite number, got {self.clip!r}")
        if self.max_n < 1 or self.levels < 1 or self.headroom < 0:
            raise InvalidArgument("max_n and levels must be positive and headroom non-negative")
        if self.max_n * (self.levels + self.headroom) > 2 ** (self.bits - 1) - 1:
            raise InvalidArgument(
                f"{self.max_n} sites x {self.levels + self.headroom} levels would wrap a {self.bits}-bit ring"
            )

    @property
    def scale(self) -> float:
        """Integer units per unit of (weighted, clipped) update."""
        return self.levels / self.clip

    @classmethod
    def choose(
        cls,
        max_n: int,
        clip: float,
        bits: int | None = None,
        *,
        precision_bits: int = DEFAULT_PRECISION_BITS,
        headroom: int = 0,
    ) -> EncodingParams:
        """Parameters for sums over up to ``max_n`` sites that never wrap (see the module docstring).

        ``bits=None`` picks the smallest b in 16..32 that gives ``2**precision_bits`` levels, else 32.
        Raises :class:`InvalidArgument` when even the requested ring leaves no level per site.
        """
        if isinstance(max_n, bool) or not isinstance(max_n, int) or max_n < 1:
            raise InvalidArgument(f"max_n must be a positive integer, got {max_n!r}")
        candidates = range(MIN_BITS, MAX_BITS + 1) if bits is None else [check_bits(bits)]
        chosen = candidates[-1]
        for b in candidates:
            if _levels(b, max_n, headroom) >= 2**precision_bits:
                chosen = b
                break
        levels = _levels(chosen, max_n, headroom)
        if levels < 1:
            raise InvalidArgument(f"a {chosen}-bit ring cannot hold a sum over {max_n} sites; use more bits")
        return cls(bits=chosen, clip=float(clip), max_n=max_n, levels=levels, headroom=headroom)

    def error_bound(self, n: int) -> float:
        """Strict upper bound on |decoded sum - exact weighted sum| per coordinate for a sum over n sites."""
        return n / self.scale

    def mean_error_bound(self, n: int, weight_total: float) -> float:
        """Bound on the error of :func:`decode_mean`'s mean per coordinate, given its decoded weight total."""
        return 2 * n / (self.scale * weight_total)


def _levels(bits: int, max_n: int, headroom: int) -> int:
    return ((1 << (bits - 1)) - 1) // max_n - headroom


def weight_of(num_examples: int, weight_cap: int) -> float:
    """A site's FedAvg weight in [0, 1]: its sample count, capped at the public ``weight_cap``, over the cap."""
    if weight_cap < 1 or num_examples < 0:
        raise InvalidArgument("weight_cap must be positive and num_examples non-negative")
    return min(num_examples, weight_cap) / weight_cap


def encode(x: NDArray[np.floating], params: EncodingParams, weight: float = 1.0) -> U32Array:
    """Clip, weight, scale and stochastically round ``x`` (1-D floats) into integers mod 2**bits."""
    out = np.empty(len(x) if x.ndim == 1 else 0, dtype=np.uint32)
    encode_into(x, params, weight, out)
    return out


def encode_into(x: NDArray[np.floating], params: EncodingParams, weight: float, out: U32Array) -> None:
    """:func:`encode` written into ``out`` (uint32, same length as ``x``), one cache-sized block at a time.

    Memory is O(block) besides ``out``: ``x`` (float32 or float64) is widened to float64 a block at a time, so an
    update of d values costs no d-sized float64 temporaries. On a non-finite value it raises
    :class:`InvalidArgument` and ``out`` is left partly written (the caller discards it).
    """
    if x.ndim != 1 or not np.issubdtype(x.dtype, np.floating):
        raise InvalidArgument(f"encode takes a 1-D float array, got {x.dtype} {x.shape}")
    if not (0.0 <= weight <= 1.0):
        raise InvalidArgument(f"weight must be in [0, 1] (normalise by the public weight cap), got {weight!r}")
    check_vector(out, "encode output")
    if len(out) != len(x):
        raise InvalidArgument(f"encode output has {len(out)} values for {len(x)} inputs")
    m = min(len(x), BLOCK)
    coins, coin_lanes = keystream(secrets.token_bytes(32)), Lanes(max(m, 1))  # uniform 32-bit values, fresh key
    v, low = np.empty(m, np.float64), np.empty(m, np.float64)
    q, up = np.empty(m, np.int64), np.empty(m, np.bool_)
    factor, ring = weight * params.scale, np.int64((1 << params.bits) - 1)
    for start in range(0, len(x), BLOCK):
        part = x[start : start + BLOCK]
        n = len(part)
        vb, lb, qb, ub = v[:n], low[:n], q[:n], up[:n]
        vb[:] = part
        if not np.isfinite(vb).all():
            raise InvalidArgument("the update has NaN or infinite values; refusing to encode it")
        np.clip(vb, -params.clip, params.clip, out=vb)
        vb *= factor
        np.floor(vb, out=lb)
        vb -= lb  # now the fractional part, in [0, 1)
        vb *= 4294967296.0
        np.less(coin_lanes.fill(coins, n), vb, out=ub)  # round up with probability equal to the fractional part
        qb[:] = lb
        qb += ub
        np.clip(qb, -params.levels, params.levels, out=qb)
        qb &= ring
        out[start : start + n] = qb


def encode_with_weight_lane_into(x: NDArray[np.floating], params: EncodingParams, weight: float, out: U32Array) -> None:
    """``encode(with_weight_lane(x, params), params, weight)`` written into ``out`` (``len(x) + 1`` values) without
    building the widened copy: the update's values, then the weight lane."""
    if len(out) != len(x) + 1:
        raise InvalidArgument(f"encode output has {len(out)} values for {len(x)} inputs and the weight lane")
    encode_into(x, params, weight, out[: len(x)])
    encode_into(np.array([params.clip]), params, weight, out[len(x) :])


def centre(total: U32Array, bits: int) -> NDArray[np.int64]:
    """Read values mod 2**bits as two's complement integers in [-2**(bits-1), 2**(bits-1))."""
    check_bits(bits)
    s = total.astype(np.int64) & ((1 << bits) - 1)
    s[s >= 1 << (bits - 1)] -= 1 << bits
    return s


def decode_sum(total: U32Array, params: EncodingParams, n: int) -> F64Array:
    """Decode the sum mod 2**bits of ``n`` sites' encodings into the float sum of ``w_k * clip(x_k)``.

    ``n`` is only checked against ``max_n``: beyond it the sum may have wrapped and the result would be wrong.
    """
    if not 1 <= n <= params.max_n:
        raise InvalidArgument(f"cannot decode a sum over {n} sites with parameters for at most {params.max_n}")
    return centre(total, params.bits) / params.scale


def with_weight_lane(x: NDArray[np.floating], params: EncodingParams) -> NDArray[np.float64]:
    """``x`` with one more coordinate equal to ``clip``; after weighting it carries ``w * clip`` into the sum."""
    return np.concatenate([x.astype(np.float64), [params.clip]])


def split_weight_lane(decoded: F64Array, params: EncodingParams) -> tuple[F64Array, float]:
    """Split a decoded sum made with :func:`with_weight_lane` into (sum of w_k * x_k, weight total W)."""
    return decoded[:-1], float(decoded[-1]) / params.clip


def decode_mean(total: U32Array, params: EncodingParams, n: int) -> tuple[F64Array, float]:
    """The weighted mean (FedAvg) and the weight total from a sum of :func:`with_weight_lane` encodings."""
    weighted, weight_total = split_weight_lane(decode_sum(total, params, n), params)
    if weight_total <= params.error_bound(n) / params.clip:
        raise InvalidArgument("the sites' weights sum to (about) zero; there is no weighted mean")
    return weighted / weight_total, weight_total


def packed_len(d: int, bits: int) -> int:
    """Bytes of ``d`` packed ``bits``-bit values: exactly ceil(d * bits / 8)."""
    return (d * bits + 7) // 8


def _layout(bits: int) -> tuple[int, int]:
    """(values, 64-bit words) per repeating group: lcm(bits, 64) bits."""
    g = math.gcd(bits, 64)
    return 64 // g, bits // g


def pack(values: U32Array, bits: int) -> bytes:
    """Pack values < 2**bits into ceil(d*bits/8) bytes, little-endian bit order (vectorised per column)."""
    check_bits(bits)
    if values.dtype != np.uint32 or values.ndim != 1:
        raise InvalidArgument(f"pack takes a 1-D uint32 array, got {values.dtype} {values.shape}")
    d = len(values)
    if bits < 32 and d and int(values.max()) >> bits:
        raise InvalidArgument(f"a value does not fit in {bits} bits; reduce mod 2**{bits} before packing")
    if bits == 32:
        return values.astype("<u4", copy=False).tobytes()
    if bits == 16:
        return values.astype("<u2").tobytes()
    per_group, words_per_group = _layout(bits)
    out = bytearray(packed_len(d, bits))
    block_groups = BLOCK // per_group  # per_group divides 64 and BLOCK, so every block but the last is whole groups
    mat = np.zeros((block_groups, per_group), dtype=np.uint64)
    words = np.zeros((block_groups, words_per_group), dtype=np.uint64)
    flat, pos = mat.reshape(-1), 0
    for start in range(0, d, BLOCK):  # a block at a time, so the column passes below stay in cache
        part = values[start : start + BLOCK]
        groups = -(-len(part) // per_group)
        flat[: len(part)] = part
        flat[len(part) : groups * per_group] = 0
        cols, w = mat[:groups], words[:groups]
        w[:] = 0
        for j in range(per_group):
            word, shift = divmod(j * bits, 64)
            w[:, word] |= cols[:, j] << np.uint64(shift)
            if shift + bits > 64:
                w[:, word + 1] |= cols[:, j] >> np.uint64(64 - shift)
        size = packed_len(len(part), bits)
        out[pos : pos + size] = w.astype("<u8", copy=False).view(np.uint8).reshape(-1)[:size].data
        pos += size
    return bytes(out)


def check_padding(last_byte: int, d: int, bits: int) -> None:
    """The bits after the last value in the last byte of a packed vector must be zero."""
    tail = (d * bits) % 8
    if tail and last_byte >> tail:
        raise InvalidArgument("packed data has non-zero padding bits")


def unpack(data: bytes | bytearray | memoryview, d: int, bits: int) -> U32Array:
    """Inverse of :func:`pack`. Wrong length or non-zero padding bits raise :class:`InvalidArgument`."""
    check_bits(bits)
    if len(data) != packed_len(d, bits):
        raise InvalidArgument(f"{d} packed {bits}-bit values take {packed_len(d, bits)} bytes, got {len(data)}")
    raw = np.frombuffer(data, dtype=np.uint8)
    if len(raw):
        check_padding(int(raw[-1]), d, bits)
    if bits == 32:
        return np.frombuffer(data, dtype="<u4").astype(np.uint32)
    if bits == 16:
        return np.frombuffer(data, dtype="<u2").astype(np.uint32)
    per_group, words_per_group = _layout(bits)
    groups = -(-d // per_group)
    if len(raw) == groups * words_per_group * 8:  # whole groups: read the words in place
        words = raw.view("<u8").reshape(groups, words_per_group)
    else:
        buf = np.zeros(groups * words_per_group * 8, dtype=np.uint8)
        buf[: len(raw)] = raw
        words = buf.view("<u8").reshape(groups, words_per_group)
    out = np.empty((groups, per_group), dtype=np.uint32)
    low = np.uint64((1 << bits) - 1)
    for j in range(per_group):
        word, shift = divmod(j * bits, 64)
        col = words[:, word] >> shift
        if shift + bits > 64:
            col |= words[:, word + 1] << (64 - shift)
        out[:, j] = col & low
    return out.reshape(-1)[:d]


class Unpacker:
    """Unpack a packed vector that arrives in chunks of any size, yielding (start index, values) pieces.

    Every ``bits`` bytes hold exactly 8 values, so only the bytes of an unfinished 8-value group (< ``bits``) are
    carried between chunks, and each piece has at most ``block`` values: memory is O(block), whatever the chunk
    size, and never O(d). A stream longer than ``d`` values is refused before any of its values is produced.
    """

    def __init__(self, d: int, bits: int, block: int = 1 << 18) -> None:
        self.d, self.bits = d, check_bits(bits)
        self.done = 0  # values already produced
        self._units = max(1, block // 8)  # 8-value units per piece
        self._total, self._received = packed_len(d, bits), 0
        self._pending = bytearray()

    def _next_unit(self) -> tuple[int, int]:
        """(bytes, values) of the next whole unit: 8 values, or the final partial group."""
        remaining = self.d - self.done
        return (self.bits, 8) if remaining >= 8 else (packed_len(remaining, self.bits), remaining)

    def feed(self, chunk: bytes | bytearray | memoryview) -> Iterator[tuple[int, U32Array]]:
        """Take the next chunk; return an iterator over the values it completes (consume it before the next
        ``feed``). Bytes beyond the vector's length raise :class:`InvalidArgument` here, at once."""
        data = memoryview(chunk).cast("B")
        if self._received + len(data) > self._total:
            raise InvalidArgument(f"packed vector is longer than {self._total} bytes")
        self._received += len(data)
        return self._pieces(data)

    def _pieces(self, data: memoryview) -> Iterator[tuple[int, U32Array]]:
        pos = 0
        if self._pending:
            size, count = self._next_unit()
            pos = min(size - len(self._pending), len(data))
            self._pending += data[:pos]
            if len(self._pending) < size:
                return
            start, self.done = self.done, self.done + count
            yield start, unpack(bytes(self._pending), count, self.bits)
            self._pending.clear()
        while self.done < self.d:
            size, count = self._next_unit()
            if count == 8:
                units = min((len(data) - pos) // self.bits, (self.d - self.done) // 8, self._units)
                size, count = units * self.bits, units * 8
            if not count or len(data) - pos < size:
                break
            start, self.done = self.done, self.done + count
            yield start, unpack(data[pos : pos + size], count, self.bits)
            pos += size
        self._pending += data[pos:]

    def close(self) -> None:
        """Check that the stream held exactly d values."""
        if self.done != self.d or self._pending:
            raise InvalidArgument(
                f"packed vector ended early: {self.done} of {self.d} values (+{len(self._pending)} bytes)"
            )
