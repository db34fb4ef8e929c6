"""Streaming FedAvg: one running sum per round, whatever the number of sites.

An upload is first spooled to disk while its digest is computed chunk by chunk (:class:`UpdateSpool`); only an
upload that arrived whole, hashes to its manifest's digest and holds finite values is folded into the round's
:class:`RunningSum`, one ~1 MiB block at a time. So a broken or malicious stream never touches the sum (it changes
no state), the coordinator holds one float32 sum of the model's size plus a small scratch block (memory O(model), not
O(sites x model)), and the spooled file is the durable record of the accepted upload.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from common import files
from common.errors import InvalidArgument
from common.secagg.encoding import check_padding
from common.serde import CHUNK_BYTES, EncodedTensors, Spec, decode_views, encode_buffer, new_hasher

_BLOCK_ELEMS = 1 << 16  # scratch of 256 KiB: the fold never allocates per chunk


class RunningSum:
    """Sum of ``weight * update`` over accepted float32 updates.

    The sum is float32 like the updates, so the aggregator holds exactly one model-sized buffer. Rounding adds
    at most about ``n * 2**-24`` relative error for n sites, far below the noise of SGD (and the secure-aggregation
    path sums integers modulo 2**b, which is exact).
    """

    def __init__(self, specs: Sequence[Spec]) -> None:
        self.specs = tuple(specs)
        self.numel = sum(s.numel for s in self.specs)
        # A bytearray underneath, so the sum can become the next model's encoding in place (into_model).
        self._buf = bytearray(self.numel * 4)
        self._acc = np.frombuffer(self._buf, dtype=np.float32)
        self._scratch = np.empty(_BLOCK_ELEMS, dtype=np.float32)
        self.total_weight = 0.0
        self.count = 0

    def add_block(self, offset: int, values: np.ndarray, weight: float) -> None:
        """Fold ``weight * values`` into elements ``[offset, offset + len(values))``."""
        n = len(values)
        for start in range(0, n, _BLOCK_ELEMS):
            part = values[start : start + _BLOCK_ELEMS]
            scratch = self._scratch[: len(part)]
            np.multiply(part, weight, out=scratch, casting="unsafe")
            self._acc[offset + start : offset + start + len(part)] += scratch

    def commit(self, weight: float) -> None:
        """Count one finished update of ``weight``."""
        self.total_weight += weight
        self.count += 1

    def add_file(self, path: Path, weight: float) -> None:
        """Fold a verified, spooled float32 update (raw bytes in spec order) into the sum."""
        with path.open("rb", buffering=0) as f:
            buf = bytearray(CHUNK_BYTES)
            offset = 0
            while True:
                n = f.readinto(buf)
                if not n:
                    break
                if n % 4:  # a short read mid-element: read the rest of the element so blocks stay aligned
                    rest = f.read(4 - n % 4)
                    buf[n : n + len(rest)] = rest
                    n += len(rest)
                values = np.frombuffer(buf, dtype="<f4", count=n // 4)
                self.add_block(offset, values, weight)
                offset += n // 4
        if offset != self.numel:
            raise InvalidArgument(f"update holds {offset} values, the model has {self.numel}")
        self.commit(weight)

    def mean(self) -> np.ndarray:
        """The weighted mean as one float64 array (for the server optimizers and robust reports that need it whole;
        plain FedAvg reads it block by block instead: :meth:`mean_block`)."""
        if self.total_weight <= 0:
            raise ValueError("no update was accepted")
        out = self._acc.astype(np.float64)
        out /= self.total_weight
        return out

    def mean_block(self, start: int, stop: int) -> np.ndarray:
        """Elements ``[start, stop)`` of :meth:`mean`, the same bits, without a model-sized copy."""
        if self.total_weight <= 0:
            raise ValueError("no update was accepted")
        out = self._acc[start:stop].astype(np.float64)
        out /= self.total_weight
        return out

    def into_model(self, base: Mapping[str, torch.Tensor], eta: float = 1.0) -> EncodedTensors:
        """FedAvg's next model, ``float32(float64(base) + eta * mean)`` (the same bits as :func:`next_model` with
        the whole mean), written over the sum block by block and handed over as the model's encoding: the commit
        holds the old model and this one buffer. The sum is used up."""
        mean = self.mean_block
        change = mean if eta == 1.0 else (lambda start, stop: eta * mean(start, stop))
        data = _next_buffer(base, self.specs, change, out=self._buf)  # each block is read before it is written
        self._buf, self._acc, self.total_weight = bytearray(), np.empty(0, dtype=np.float32), 0.0
        return encode_buffer(self.specs, data)

    def noisy_mean(self, noise: np.ndarray, denominator: float) -> np.ndarray:
        """DP-FedAvg (central): ``(sum + noise) / denominator`` with a fixed, public denominator."""
        total = self._acc.astype(np.float64)
        total += noise
        total /= denominator
        return total

    def apply_to(self, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """FedAvg: ``base + sum(w_k * delta_k) / sum(w_k)`` per tensor, as float32."""
        return decode_views(self.specs, _next_buffer(base, self.specs, self.mean_block))


# The change to add to elements [start, stop) of the flat model, as float64.
ChangeBlocks = Callable[[int, int], np.ndarray]


def next_model(base: Mapping[str, torch.Tensor], specs: Sequence[Spec], change: ChangeBlocks) -> EncodedTensors:
    """The next global model, ``float32(float64(base) + change)``, written straight into one new buffer in ``specs``
    order and hashed: its wire encoding, whose memory the model's tensors can share (``decode_views``).

    Computed ``_BLOCK_ELEMS`` elements at a time, so the commit holds the old model, the new one and a few small
    blocks, never a model-sized float64 copy (with d = 10^7 those were 80 MB each)."""
    return encode_buffer(specs, _next_buffer(base, specs, change))


def _next_buffer(
    base: Mapping[str, torch.Tensor], specs: Sequence[Spec], change: ChangeBlocks, out: bytearray | None = None
) -> bytearray:
    numel = sum(s.numel for s in specs)
    data = bytearray(numel * 4) if out is None else out
    if len(data) != numel * 4:
        raise ValueError(f"a buffer of {len(data)} bytes for a model of {numel * 4}")
    values = np.frombuffer(data, dtype="<f4")
    offset = 0
    for s in specs:
        if s.numpy_dtype != np.dtype("<f4"):
            raise ValueError(f"tensor {s.name!r} is {s.numpy_dtype}; a global model is float32")
        flat = base[s.name].detach().reshape(-1).numpy()
        if len(flat) != s.numel:
            raise ValueError(f"tensor {s.name!r} holds {len(flat)} values, the model {s.numel}")
        for start in range(0, s.numel, _BLOCK_ELEMS):
            stop = min(start + _BLOCK_ELEMS, s.numel)
            block = flat[start:stop].astype(np.float64)
            block += change(offset + start, offset + stop)
            values[offset + start : offset + stop] = block
        offset += s.numel
    return data


def apply_flat(base: Mapping[str, torch.Tensor], specs: Sequence[Spec], delta: np.ndarray) -> dict[str, torch.Tensor]:
    """``base + delta`` where ``delta`` is the flat concatenation of the tensors in ``specs`` order (float32 tensors
    sharing one new buffer)."""
    numel = sum(s.numel for s in specs)
    if numel != len(delta):
        raise ValueError(f"update has {len(delta)} values, the model {numel}")
    return decode_views(specs, _next_buffer(base, specs, flat_blocks(delta)))


def flat_blocks(delta: np.ndarray) -> ChangeBlocks:
    """A whole flat change read block by block."""
    return lambda start, stop: np.asarray(delta[start:stop], dtype=np.float64)


class Float32Values:
    """Checks a plaintext update's values as its bytes stream in: every value finite, and its L2 norm.

    The stream is cut at arbitrary byte offsets, so a value split across two chunks is carried over. One pass over
    the bytes while they are spooled: the file is never read back for these checks.
    """

    def __init__(self) -> None:
        self._carry = b""
        self.sum_squares = 0.0

    def feed(self, data: bytes) -> None:
        if self._carry:
            data = self._carry + bytes(data)
        usable = len(data) - len(data) % 4
        self._carry = bytes(data[usable:])
        values = np.frombuffer(data, dtype="<f4", count=usable // 4)
        # One pass: einsum casts to float64 in small buffers (no chunk-sized float64 copy; on a machine short of
        # memory bandwidth every pass over an update costs), and is not a BLAS call (OpenBLAS hands a 1 MiB chunk to
        # its thread pool, which on a loaded machine cost ~10x the arithmetic; issue 15). No finite float32 squared
        # overflows float64, so the sum is finite exactly when every value is.
        squares = float(np.einsum("i,i->", values, values, dtype=np.float64))
        if not math.isfinite(squares):
            raise InvalidArgument("update contains NaN or Inf values; nothing was aggregated")
        self.sum_squares += squares

    def finish(self) -> None:
        if self._carry:
            raise InvalidArgument("update length is not a whole number of float32 values")

    @property
    def l2_norm(self) -> float:
        return float(np.sqrt(self.sum_squares))


class MaskedPadding:
    """Checks the padding bits of a bit-packed masked input as it streams in (only the last byte carries them)."""

    def __init__(self, dim: int, bits: int) -> None:
        self.dim, self.bits = dim, bits
        self._last = -1

    def feed(self, data: bytes) -> None:
        self._last = data[-1]

    def finish(self) -> None:
        if self._last >= 0:
            check_padding(self._last, self.dim, self.bits)


ValueCheck = Float32Values | MaskedPadding


class UpdateSpool:
    """Writes an incoming update stream to ``path.part``: size and values (``values``) checked as it goes, the digest
    at the end, in one pass over the bytes."""

    def __init__(
        self,
        path: Path,
        specs: Sequence[Spec],
        total_bytes: int,
        sha256: str,
        max_chunk: int,
        values: ValueCheck | None = None,
    ) -> None:
        self.final_path = path
        self.values = values
        self.part_path = path.with_name(path.name + ".part")
        self.total_bytes = total_bytes
        self.expected = sha256
        self.max_chunk = max_chunk
        self.received = 0
        self._hasher: hashlib._Hash = new_hasher(specs)
        files.private_dir(path.parent, "state_dir/spool")
        self._file = files.open_private(self.part_path)

    def write(self, data: bytes) -> None:
        if not data:
            raise InvalidArgument("empty data chunk")
        if len(data) > self.max_chunk:
            raise InvalidArgument(f"chunk of {len(data)} bytes exceeds the limit of {self.max_chunk} bytes")
        if self.received + len(data) > self.total_bytes:
            raise InvalidArgument(f"upload carries more than the {self.total_bytes} bytes its manifest announced")
        if self.values is not None:
            self.values.feed(data)
        self._file.write(data)
        self._hasher.update(data)
        self.received += len(data)

    def finish(self) -> Path:
        """Verify size and digest, make the file durable, and move it to its final name."""
        if self.received != self.total_bytes:
            raise InvalidArgument(f"upload ended after {self.received} of {self.total_bytes} bytes")
        if self._hasher.hexdigest() != self.expected:
            raise InvalidArgument("digest mismatch: the uploaded bytes do not hash to the manifest's sha256")
        if self.values is not None:
            self.values.finish()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.part_path, self.final_path)
        return self.final_path

    def discard(self) -> None:
        if not self._file.closed:
            self._file.close()
        self.part_path.unlink(missing_ok=True)


# The spool writers' threads: a chunk's value checks, digest and file write release the GIL, so they run beside the
# event loop instead of on it (on the loop they were a third of the coordinator's CPU at N = 20, d = 10^7).
_SPOOL_THREADS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="spool")


class SpoolWriter:
    """An :class:`UpdateSpool` fed from the event loop and written in a worker thread: while one upload's chunk is
    checked, hashed and written there, the loop serves the other streams. Each ``write`` returns when its chunk is
    done, so a bad chunk is refused at once (and chunks stay in order)."""

    def __init__(self, spool: UpdateSpool) -> None:
        self.spool = spool
        self._inflight: Future[object] | None = None

    async def write(self, data: bytes) -> None:
        await self._run(self.spool.write, data)

    async def finish(self) -> Path:
        """Verify and make durable (the fsync runs off the loop too); the spooled file's final path."""
        path = await self._run(self.spool.finish)
        assert isinstance(path, Path)
        return path

    def discard(self) -> None:
        """Drop the partial file, after the chunk in flight (if the handler was cancelled meanwhile) is done."""
        inflight, self._inflight = self._inflight, None
        if inflight is not None:
            with contextlib.suppress(Exception):
                inflight.result()  # at most one chunk's write
        self.spool.discard()

    async def _run(self, fn: Callable[..., object], *args: object) -> object:
        self._inflight = _SPOOL_THREADS.submit(fn, *args)
        result = await asyncio.wrap_future(self._inflight)  # cancelled here: the write goes on; discard() waits
        self._inflight = None
        return result
