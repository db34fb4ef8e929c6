"""An exact, order-independent running sum of float32 updates, folded chunk by chunk as they arrive (a prototype).

Today's :class:`coordinator.round.aggregation.RunningSum` is a float32 sum. Float addition is not associative, so
to make the new model a function of the accepted updates alone (not of their arrival order, nor of a restart in
between) it folds the spooled updates in site order when the round closes: one more pass over every upload, at the
end of the round, on its critical path. This module is the alternative issue 15 asks to evaluate: fold each chunk
the moment it arrives into **integers**, whose addition is exact, so any order gives the same bits; secure
aggregation already sums integers mod 2**b for the same reason.

**The grid.** A coordinate ``x`` of an upload with integer weight ``w`` (FedAvg: its sample count; DP-FedAvg: 1)
becomes the int64 ``rint(x * w * 2**F)``. The round's public :class:`Grid` fixes ``F`` before any upload arrives,
from facts known at round start: the cohort size ``n`` (uploads the sum may hold) and the largest weight ``W_max``
(the cohort's declared sample counts, with slack), leaving ``R`` bits for the values (``|x| < 2**R``, default 16):
``F = 62 - bits(n) - bits(W_max) - R``. Then every term is below ``2**(62 - bits(n))`` and the sum of n terms below
``2**62``: no overflow. ``x * w`` is exact in float64 (24 + 29 bits), the scaling by ``2**F`` too, so each term is a
deterministic function of (x, w) and the sum is exact. Resolution: ``2**-F`` per unit of weight; with 20 sites of
at most 1000 samples F = 31 (about 5e-10, below float32's own step for weights above ~0.004), with weights 1 F = 40.

**Checks in the same pass.** Folding a block computes its largest magnitude (NaN propagates, so one comparison
refuses NaN, Inf and out-of-range values before the block touches the sum) and its sum of squares in float64 (the
L2 norm the site-level DP check needs), so nothing is read twice.

**Undo.** A stream that breaks off, fails its digest or its norm bound must change no state. Integer folding can be
undone exactly: :meth:`UploadFold.undo` subtracts the same terms again, recomputed from the same bytes (read back
from the spool, which exists for crash recovery anyway). Only failed uploads pay that pass.

**Memory.** The sum is int64: two model sizes. :meth:`FixedPointSum.finish` writes the new float32 model into the
front half of that same memory, block by block (front to back, each block read before it is overwritten), and
hands the back half to the kernel (``madvise(MADV_DONTNEED)``), so the new model costs no third buffer.

``max_uploads`` bounds the uploads folded at any one time, committed or still arriving: the cohort size, since
each site has at most one upload in flight or accepted per round (a retry is folded after the broken attempt was
undone). Folds into one sum must not run concurrently (numpy's ``+=`` on a slice is a read-modify-write); a lock
serialises them, so callers may fold from worker threads.
"""

from __future__ import annotations

import math
import mmap
import threading
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from common.errors import InvalidArgument

BLOCK = 1 << 16  # elements folded at a time: float64 scratch of 512 KiB stays in cache
MAX_WEIGHT_BITS = 29  # x (24-bit mantissa) * w stays exact in float64's 53 bits


def _bits(n: int) -> int:
    return max(1, math.ceil(math.log2(n + 1)))


@dataclass(frozen=True)
class Grid:
    """The round's fixed-point grid, public and fixed before the first upload (see the module docstring)."""

    frac_bits: int  # F
    range_bits: int  # R: every |x| < 2**R
    max_uploads: int
    max_weight: int

    @classmethod
    def choose(cls, max_uploads: int, max_weight: int, range_bits: int = 16) -> Grid:
        if max_uploads < 1 or max_weight < 1:
            raise ValueError("max_uploads and max_weight must be at least 1")
        if _bits(max_weight) > MAX_WEIGHT_BITS:
            raise ValueError(f"weights above 2**{MAX_WEIGHT_BITS} do not fit the grid; scale them down")
        frac = 62 - _bits(max_uploads) - _bits(max_weight) - range_bits
        if frac < 16:
            raise ValueError(f"{max_uploads} uploads of weight up to {max_weight} leave only {frac} fraction bits")
        return cls(frac, range_bits, max_uploads, max_weight)

    @property
    def limit(self) -> float:
        return float(2**self.range_bits)


class FixedPointSum:
    """``sum_k rint(x_k * w_k * 2**F)`` per coordinate in int64, and the weight total ``sum_k w_k``."""

    def __init__(self, numel: int, grid: Grid) -> None:
        self.numel = numel
        self.grid = grid
        # Anonymous memory of our own (not numpy's allocator), so finish() can give the back half to the kernel.
        self._mem = mmap.mmap(-1, max(8, 8 * numel))
        self.acc: NDArray[np.int64] = np.frombuffer(self._mem, dtype=np.int64, count=numel)
        self._scratch = np.empty(BLOCK, dtype=np.float64)
        self._lock = threading.Lock()
        self.total_weight = 0
        self.count = 0
        self.finished = False

    def fold_block(self, offset: int, values: NDArray[np.float32], weight: int, sign: int = 1) -> tuple[float, float]:
        """Add (sign=1) or subtract (sign=-1) the terms of at most :data:`BLOCK` values at ``offset``; returns
        (max |x|, sum of x**2). A block with NaN, Inf or a value beyond the grid's range raises, adding nothing."""
        if len(values) > BLOCK:
            raise ValueError(f"fold at most {BLOCK} values at a time")
        if self.finished:
            raise RuntimeError("the sum was finished into a model; it takes no more folds")
        if not 1 <= weight <= self.grid.max_weight:
            raise InvalidArgument(f"weight {weight} is outside 1..{self.grid.max_weight} for this round's grid")
        if offset + len(values) > self.numel:
            raise InvalidArgument(f"update holds more than the model's {self.numel} values")
        if not len(values):
            return 0.0, 0.0
        with self._lock:
            scratch = self._scratch[: len(values)]
            np.copyto(scratch, values, casting="safe")
            top = float(np.max(np.abs(scratch)))
            if not top < self.grid.limit:  # NaN compares false: refused too
                raise InvalidArgument(
                    "update contains NaN or Inf values; nothing was aggregated"
                    if not math.isfinite(top)
                    else f"update value {top:.3g} is beyond the aggregation range of +-2**{self.grid.range_bits}"
                )
            squares = float(np.dot(scratch, scratch))
            scratch *= float(weight) * 2.0**self.grid.frac_bits
            np.rint(scratch, out=scratch)
            target = self.acc[offset : offset + len(values)]
            if sign > 0:
                target += scratch.astype(np.int64)
            else:
                target -= scratch.astype(np.int64)
        return top, squares

    def commit(self, weight: int) -> None:
        """Count one accepted upload of ``weight`` (after all its values were folded)."""
        if self.count >= self.grid.max_uploads:
            raise InvalidArgument(f"the round's grid holds at most {self.grid.max_uploads} uploads")
        self.total_weight += weight
        self.count += 1

    def uncommit(self, weight: int) -> None:
        self.total_weight -= weight
        self.count -= 1

    def mean(self) -> NDArray[np.float64]:
        """The weighted mean as float64 (a model-sized copy: for tests and small models)."""
        if self.total_weight <= 0:
            raise ValueError("no update was accepted")
        return self.acc.astype(np.float64) / (2.0**self.grid.frac_bits * self.total_weight)

    def finish(self, base: NDArray[np.float32], denominator: float | None = None) -> memoryview:
        """``float32(base + sum / (2**F * denominator))``, written over the sum's own memory: the new model's bytes.

        ``denominator`` defaults to the weight total (FedAvg); DP-FedAvg passes its fixed, public one. After this
        the sum is gone (the back half of its memory is returned to the kernel)."""
        denominator = float(self.total_weight) if denominator is None else denominator
        if denominator <= 0:
            raise ValueError("no update was accepted")
        if len(base) != self.numel:
            raise ValueError(f"base has {len(base)} values, the sum {self.numel}")
        scale = 1.0 / (2.0**self.grid.frac_bits * denominator)
        out = np.frombuffer(self._mem, dtype=np.float32, count=self.numel)
        with self._lock:
            self.finished = True
            for start in range(0, self.numel, BLOCK):
                stop = min(start + BLOCK, self.numel)
                block = self._scratch[: stop - start]
                np.copyto(block, self.acc[start:stop], casting="unsafe")  # read before out[] overwrites it
                block *= scale
                block += base[start:stop]
                out[start:stop] = block
            # The int64 view now holds float32 bytes in its front half; nobody may read it as a sum again.
            self.acc = np.empty(0, dtype=np.int64)
            keep = -(-4 * self.numel // mmap.PAGESIZE) * mmap.PAGESIZE
            if keep < len(self._mem):
                self._mem.madvise(mmap.MADV_DONTNEED, keep, len(self._mem) - keep)
        return memoryview(self._mem)[: 4 * self.numel]


class UploadFold:
    """One upload's contribution, folded as its chunks arrive; it can be undone exactly until it is committed.

    Chunks may split float32 values anywhere: up to three trailing bytes are carried into the next chunk."""

    def __init__(self, total: FixedPointSum, weight: int) -> None:
        self.total = total
        self.weight = weight
        self.folded = 0  # values folded so far
        self.max_abs = 0.0
        self.squares = 0.0
        self._carry = b""
        self.committed = False

    def add(self, data: bytes | bytearray | memoryview) -> None:
        buf = memoryview(data)
        if self._carry:
            need = 4 - len(self._carry)
            head, buf = self._carry + bytes(buf[:need]), buf[need:]
            if len(head) < 4:
                self._carry = head
                return
            self._fold(np.frombuffer(head, dtype="<f4"))
            self._carry = b""
        whole = len(buf) - len(buf) % 4
        if whole:
            self._fold(np.frombuffer(buf[:whole], dtype="<f4"))
        self._carry = bytes(buf[whole:])

    def _fold(self, values: NDArray[np.float32]) -> None:
        for start in range(0, len(values), BLOCK):
            part = values[start : start + BLOCK]
            top, squares = self.total.fold_block(self.folded, part, self.weight)
            self.folded += len(part)  # block by block: a refused block leaves exactly what undo() must take back
            self.max_abs = max(self.max_abs, top)
            self.squares += squares

    @property
    def l2_norm(self) -> float:
        return math.sqrt(self.squares)

    def commit(self) -> None:
        """The upload is whole and verified: count it."""
        if self._carry or self.folded != self.total.numel:
            raise InvalidArgument(f"update holds {self.folded} values, the model has {self.total.numel}")
        self.total.commit(self.weight)
        self.committed = True

    def undo(self, same_bytes: Iterable[bytes | bytearray | memoryview]) -> None:
        """Subtract exactly what was folded, recomputed from the same bytes (e.g. read back from the spool)."""
        left = self.folded
        offset = 0
        carry = b""
        for chunk in same_bytes:
            if left == 0:
                break
            raw = carry + bytes(chunk) if carry else memoryview(chunk)
            whole = min(len(raw) - len(raw) % 4, 4 * left)
            values = np.frombuffer(raw[:whole], dtype="<f4")
            for start in range(0, len(values), BLOCK):
                part = values[start : start + BLOCK]
                self.total.fold_block(offset, part, self.weight, -1)
                offset += len(part)
                left -= len(part)
            carry = bytes(raw[whole:]) if left else b""
        if left:
            raise RuntimeError(f"undo ran out of bytes with {left} values still folded")
        if self.committed:
            self.total.uncommit(self.weight)
            self.committed = False
        self.folded = 0
