"""Exact sums of small named values (counts, metric sums, statistics) through secure aggregation.

A secure sum adds vectors of integers modulo 2**b. Besides the model update, a round needs a few numbers whose sum
the coordinator may learn but whose per-site values it must not: sample counts, the sample-weighted training loss
and accuracy, evaluation results. Each such value is a *lane*: fixed point (``round(value * scale)``), clamped to
``[-max_abs, max_abs]`` (``[0, max_abs]`` when unsigned), and written as L *limbs* of ``w`` bits each, least
significant first, in two's complement over ``w * L`` bits.

**No wrap-around, exactly.** With at most ``max_n`` sites a limb is below ``2**w`` at every site, so a limb's sum is
below ``max_n * 2**w <= 2**b`` when ``w = b - ceil(log2(max_n))``: the ring never wraps a limb. The coordinator reads
each limb's sum as a plain integer ``S_j`` and recombines ``T = sum_j S_j * 2**(w*j) mod 2**(w*L)``, then reads T as
a signed ``w*L``-bit number. L is chosen so that ``max_n * max_abs * scale < 2**(w*L - 1)``: the total of any
``n <= max_n`` sites fits, so T is the exact sum of the sites' fixed-point values. The only error is each site's
rounding to ``1 / scale`` (at most ``n / (2 * scale)`` in the total) and the clamp, both documented per lane.

The layout is public and chosen by the coordinator; it travels in the round's secure-aggregation setup so that every
site encodes the same way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from common.errors import InvalidArgument
from common.secagg.prg import U32Array, check_bits


@dataclass(frozen=True)
class Lane:
    """One named value: fixed point with ``scale`` units per unit, clamped to ``max_abs`` per site."""

    name: str
    scale: float
    max_abs: float
    signed: bool = False

    def __post_init__(self) -> None:
        if not (math.isfinite(self.scale) and self.scale > 0 and math.isfinite(self.max_abs) and self.max_abs > 0):
            raise InvalidArgument(f"lane {self.name!r}: scale and max_abs must be positive and finite")


@dataclass(frozen=True)
class LaneLayout:
    """Where each lane's limbs lie in the summed vector, for a ring of ``bits`` and sums over up to ``max_n`` sites."""

    lanes: tuple[Lane, ...]
    bits: int
    max_n: int
    # Each lane's limb count L, worked out once: a site encodes every lane of every secure instance, and the
    # statistics phase has hundreds of lanes (1,000 virtual sites encode them all in one process).
    _counts: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if self.max_n < 1:
            raise InvalidArgument("max_n must be at least 1")
        if self.limb_bits < 1:
            raise InvalidArgument(f"a {self.bits}-bit ring cannot sum limbs over {self.max_n} sites")
        names = [lane.name for lane in self.lanes]
        if len(set(names)) != len(names):
            raise InvalidArgument("lane names must be unique")
        object.__setattr__(self, "_counts", tuple(self.limbs(lane) for lane in self.lanes))

    @property
    def limb_bits(self) -> int:
        """w: a limb's bits, leaving room for the sum over max_n sites in a b-bit ring."""
        return self.bits - math.ceil(math.log2(self.max_n)) if self.max_n > 1 else self.bits

    def limbs(self, lane: Lane) -> int:
        """L: the limbs that hold the total of ``max_n`` sites' values of ``lane`` (plus a sign bit)."""
        total = self.max_n * math.ceil(lane.max_abs * lane.scale)
        return max(1, math.ceil((total.bit_length() + 1) / self.limb_bits))

    @property
    def size(self) -> int:
        """The number of ring elements all lanes take."""
        return sum(self._counts)

    def encode(self, values: Mapping[str, float]) -> U32Array:
        """One site's lanes as limbs (uint32, each below 2**w). Every lane must be given; values are clamped."""
        missing = [lane.name for lane in self.lanes if lane.name not in values]
        if missing:
            raise InvalidArgument(f"lane values missing: {missing}")
        out: list[int] = []
        w = self.limb_bits
        mask = (1 << w) - 1
        for lane, n in zip(self.lanes, self._counts, strict=True):
            v = float(values[lane.name])
            if not math.isfinite(v):
                raise InvalidArgument(f"lane {lane.name!r}: value must be finite")
            low = -lane.max_abs if lane.signed else 0.0
            x = round(min(max(v, low), lane.max_abs) * lane.scale)
            x %= 1 << (w * n)  # two's complement over w * n bits
            out += [(x >> (w * j)) & mask for j in range(n)]
        return np.asarray(out, dtype=np.uint32)

    def decode(self, sums: Sequence[int] | NDArray[np.integer]) -> dict[str, float]:
        """The lanes' totals from the limbs' sums (each an exact integer below 2**b)."""
        sums = [int(s) for s in sums]
        if len(sums) != self.size:
            raise InvalidArgument(f"expected {self.size} lane limbs, got {len(sums)}")
        w, pos, totals = self.limb_bits, 0, {}
        for lane, n in zip(self.lanes, self._counts, strict=True):
            modulus = 1 << (w * n)
            t = sum(s << (w * j) for j, s in enumerate(sums[pos : pos + n])) % modulus
            if t >= modulus // 2:
                t -= modulus
            totals[lane.name] = t / lane.scale
            pos += n
        return totals

    def to_dict(self) -> dict[str, object]:
        return {
            "bits": self.bits,
            "max_n": self.max_n,
            "lanes": [[lane.name, lane.scale, lane.max_abs, lane.signed] for lane in self.lanes],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> LaneLayout:
        try:
            lanes = tuple(Lane(str(n), float(s), float(m), bool(g)) for n, s, m, g in data["lanes"])  # type: ignore[attr-defined]
            return cls(lanes, int(data["bits"]), int(data["max_n"]))  # type: ignore[call-overload]
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidArgument(f"malformed lane layout: {exc}") from None


# The lanes a training round sums under secure aggregation: the sample count, the sample-weighted training loss and
# accuracy, and local steps. A site's loss is clamped to [0, 1e4] per sample and its count to 1e9; 2**-16 precision.
MAX_SAMPLES = 1_000_000_000
TRAIN_LANES = (
    Lane("samples", 1.0, MAX_SAMPLES),
    Lane("loss_sum", 2.0**16, 1e4 * MAX_SAMPLES),
    Lane("accuracy_sum", 2.0**16, MAX_SAMPLES),
    Lane("steps", 1.0, 2.0**40),
)
# What an evaluation sums: the number of evaluated records and the sample-weighted loss and accuracy.
EVAL_LANES = (
    Lane("samples", 1.0, MAX_SAMPLES),
    Lane("loss_sum", 2.0**16, 1e4 * MAX_SAMPLES),
    Lane("accuracy_sum", 2.0**16, MAX_SAMPLES),
)


def train_lane_values(num_samples: int, loss: float, accuracy: float, steps: float) -> dict[str, float]:
    n = float(num_samples)
    return {
        "samples": n,
        "loss_sum": (loss if math.isfinite(loss) else 0.0) * n,
        "accuracy_sum": (accuracy if math.isfinite(accuracy) else 0.0) * n,
        "steps": steps if math.isfinite(steps) else 0.0,
    }


def eval_lane_values(num_samples: int, loss: float, accuracy: float) -> dict[str, float]:
    n = float(num_samples)
    return {
        "samples": n,
        "loss_sum": (loss if math.isfinite(loss) else 0.0) * n,
        "accuracy_sum": (accuracy if math.isfinite(accuracy) else 0.0) * n,
    }
