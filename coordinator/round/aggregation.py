"""Streaming FedAvg: one running sum per round, whatever the number of sites.

An upload is first spooled to disk while its digest is computed chunk by chunk (:class:`UpdateSpool`); only an
upload that arrived whole, hashes to its manifest's digest and holds finite values is folded into the round's
:class:`RunningSum`, one ~1 MiB block at a time. So a broken or malicious stream never touches the sum (it changes
no state), the coordinator holds one float32 sum of the model's size plus a small scratch block (memory O(model), not
O(sites x model)), and the spooled file is the durable record of the accepted upload.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from common import files
from common.errors import InvalidArgument
from common.secagg.encoding import check_padding
from common.serde import CHUNK_BYTES, Spec, new_hasher

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
        self._acc = np.zeros(self.numel, dtype=np.float32)
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
        if self.total_weight <= 0:
            raise ValueError("no update was accepted")
        return self._acc.astype(np.float64) / self.total_weight

    def noisy_mean(self, noise: np.ndarray, denominator: float) -> np.ndarray:
        """DP-FedAvg (central): ``(sum + noise) / denominator`` with a fixed, public denominator."""
        total: np.ndarray = (self._acc.astype(np.float64) + noise) / denominator
        return total

    def apply_to(self, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """FedAvg: ``base + sum(w_k * delta_k) / sum(w_k)`` per tensor, as float32."""
        return apply_flat(base, self.specs, self.mean())


def apply_flat(base: dict[str, torch.Tensor], specs: Sequence[Spec], delta: np.ndarray) -> dict[str, torch.Tensor]:
    """``base + delta`` where ``delta`` is the flat concatenation of the tensors in ``specs`` order."""
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for s in specs:
        part = np.asarray(delta[offset : offset + s.numel], dtype=np.float64).reshape(s.shape)
        out[s.name] = (base[s.name].to(torch.float64) + torch.from_numpy(part)).to(torch.float32)
        offset += s.numel
    if offset != len(delta):
        raise ValueError(f"update has {len(delta)} values, the model {offset}")
    return out


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
            data = self._carry + data
        usable = len(data) - len(data) % 4
        self._carry = bytes(data[usable:])
        values = np.frombuffer(data, dtype="<f4", count=usable // 4)
        if not np.isfinite(values).all():
            raise InvalidArgument("update contains NaN or Inf values; nothing was aggregated")
        wide = values.astype(np.float64)
        # einsum, not ``wide @ wide``: that is a BLAS call, and OpenBLAS hands a 1 MiB chunk to its thread pool, which
        # on a loaded machine costs ~10x the arithmetic (bench/federation.py profile, issue 15).
        self.sum_squares += float(np.einsum("i,i->", wide, wide))

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
