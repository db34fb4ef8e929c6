"""Tensors on the wire: ``{name, dtype, shape}`` specs plus raw little-endian bytes, in ~1 MiB chunks.

One serde module for both sides. Nothing is pickled: a model or update is a :class:`Manifest` (the ordered tensor
specs, the total byte count and a SHA-256 digest) followed by the tensors' bytes concatenated in manifest order.
The digest covers a canonical encoding of the specs *and* the bytes, so a tensor renamed, reshaped or retyped in
transit is caught just like a flipped bit.

:class:`Assembler` checks a received stream against its manifest chunk by chunk (size limits first, digest at the
end) so a bad stream is refused before it is used.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from common.errors import InvalidArgument
from common.proto.cohort.v1 import cohort_pb2 as pb

CHUNK_BYTES = 1 << 20  # 1 MiB: well under gRPC's default 4 MiB message limit, large enough to amortise framing
_BLOCK = 1 << 16  # elements per block of in-place float64 work on an update (512 KiB of float64 scratch)

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("Cohort's wire format is little-endian; this platform is not supported")

_TORCH: dict[int, torch.dtype] = {
    pb.DTYPE_FLOAT32: torch.float32,
    pb.DTYPE_FLOAT64: torch.float64,
    pb.DTYPE_INT64: torch.int64,
    pb.DTYPE_INT32: torch.int32,
    pb.DTYPE_UINT32: torch.uint32,
    pb.DTYPE_UINT64: torch.uint64,
    pb.DTYPE_UINT8: torch.uint8,
}
_NUMPY: dict[int, np.dtype[np.generic]] = {
    pb.DTYPE_FLOAT32: np.dtype("<f4"),
    pb.DTYPE_FLOAT64: np.dtype("<f8"),
    pb.DTYPE_INT64: np.dtype("<i8"),
    pb.DTYPE_INT32: np.dtype("<i4"),
    pb.DTYPE_UINT32: np.dtype("<u4"),
    pb.DTYPE_UINT64: np.dtype("<u8"),
    pb.DTYPE_UINT8: np.dtype("u1"),
}
_FROM_TORCH: dict[torch.dtype, int] = {v: k for k, v in _TORCH.items()}


@dataclass(frozen=True)
class Spec:
    """One tensor's name, dtype (a ``pb.DType`` value) and shape."""

    name: str
    dtype: int
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * _NUMPY[self.dtype].itemsize

    @property
    def numpy_dtype(self) -> np.dtype[np.generic]:
        return _NUMPY[self.dtype]

    def to_proto(self) -> pb.TensorSpec:
        return pb.TensorSpec(name=self.name, dtype=self.dtype, shape=list(self.shape))  # type: ignore[arg-type]


def dtype_name(dtype: int) -> str:
    return pb.DType.Name(dtype).removeprefix("DTYPE_").lower()  # type: ignore[arg-type]


def canonical_specs(specs: Sequence[Spec]) -> bytes:
    """The byte string the digest covers before the data: stable across protobuf versions and languages."""
    doc = [[s.name, dtype_name(s.dtype), list(s.shape)] for s in specs]
    return json.dumps(doc, separators=(",", ":")).encode()


def new_hasher(specs: Sequence[Spec]) -> hashlib._Hash:
    h = hashlib.sha256()
    h.update(canonical_specs(specs))
    return h


@dataclass(frozen=True)
class EncodedTensors:
    """A model or update serialized once: specs, one contiguous buffer and its digest.

    ``data`` is a ``bytearray`` when it is a site's reusable update buffer (:class:`UpdateBuffer`): valid until the
    site writes its next update into it.
    """

    specs: tuple[Spec, ...]
    data: bytes | bytearray
    sha256: str

    @property
    def version(self) -> str:
        return "sha256:" + self.sha256

    def manifest(self) -> pb.Manifest:
        return pb.Manifest(tensors=[s.to_proto() for s in self.specs], total_bytes=len(self.data), sha256=self.sha256)

    def chunks(self, chunk_bytes: int = CHUNK_BYTES) -> Iterator[memoryview]:
        view = memoryview(self.data)
        for start in range(0, len(view), chunk_bytes):
            yield view[start : start + chunk_bytes]


def specs_of(tensors: Mapping[str, torch.Tensor]) -> tuple[Spec, ...]:
    specs: list[Spec] = []
    for name, t in tensors.items():
        if t.dtype not in _FROM_TORCH:
            raise ValueError(f"tensor {name!r} has unsupported dtype {t.dtype}")
        specs.append(Spec(name, _FROM_TORCH[t.dtype], tuple(int(d) for d in t.shape)))
    return tuple(specs)


def encode(tensors: Mapping[str, torch.Tensor]) -> EncodedTensors:
    """Serialize named tensors in mapping order (a state dict keeps its module order).

    Each tensor is copied once, straight into its place in the one output buffer, and hashed in the same pass."""
    specs = specs_of(tensors)
    data = bytearray(sum(s.nbytes for s in specs))
    flat = torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    offset = 0
    for s, t in zip(specs, tensors.values(), strict=True):
        n = s.nbytes
        if n:
            flat[offset : offset + n].copy_(t.detach().to("cpu").reshape(-1).view(torch.uint8))
        offset += n
    return encode_buffer(specs, data)


def encode_buffer(specs: tuple[Spec, ...] | Sequence[Spec], data: bytearray) -> EncodedTensors:
    """The encoding of tensors already laid out in ``data`` in ``specs`` order (no copy: ``data`` is handed over)."""
    specs = tuple(specs)
    if len(data) != sum(s.nbytes for s in specs):
        raise ValueError(f"buffer of {len(data)} bytes for tensors of {sum(s.nbytes for s in specs)}")
    h = new_hasher(specs)
    h.update(data)
    return EncodedTensors(specs, data, h.hexdigest())


def decode(specs: Sequence[Spec], data: bytes | bytearray | memoryview) -> dict[str, torch.Tensor]:
    """Tensors from a verified buffer; each tensor owns a copy (the buffer may be reused)."""
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for s in specs:
        n = s.nbytes
        arr = np.frombuffer(data, dtype=s.numpy_dtype, count=s.numel, offset=offset).reshape(s.shape)
        out[s.name] = torch.from_numpy(arr.copy())
        offset += n
    return out


def decode_views(specs: Sequence[Spec], data: bytearray) -> dict[str, torch.Tensor]:
    """Tensors that share ``data``'s memory (no copy); a tensor whose offset is not aligned to its element size
    gets a copy. The caller hands ``data`` over: whoever writes to it changes the tensors."""
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for s in specs:
        arr = np.frombuffer(data, dtype=s.numpy_dtype, count=s.numel, offset=offset).reshape(s.shape)
        out[s.name] = torch.from_numpy(arr if offset % arr.itemsize == 0 else arr.copy())
        offset += s.nbytes
    return out


@dataclass(frozen=True)
class Limits:
    max_tensors: int = 10_000
    max_total_bytes: int = 2 << 30  # 2 GiB
    max_chunk_bytes: int = 4 << 20


MAX_METADATA_ENTRIES = 64
MAX_METADATA_CHARS = 4096


def specs_from_manifest(manifest: pb.Manifest, limits: Limits, *, annotated: bool = False) -> tuple[Spec, ...]:
    """Validate a received manifest and return its specs; raises InvalidArgument naming the problem.

    ``metadata`` (a checkpoint's description; the digest does not cover it) is only sent with a finished job's final
    model (``annotated``); anywhere else a manifest carrying it is refused, so it cannot ride along unchecked.
    """
    if manifest.metadata and not annotated:
        raise InvalidArgument("manifest metadata is only sent with a finished job's final model")
    if len(manifest.metadata) > MAX_METADATA_ENTRIES or any(
        len(k) > MAX_METADATA_CHARS or len(v) > MAX_METADATA_CHARS for k, v in manifest.metadata.items()
    ):
        raise InvalidArgument(
            f"manifest metadata: at most {MAX_METADATA_ENTRIES} entries of {MAX_METADATA_CHARS} characters"
        )
    if len(manifest.tensors) == 0:
        raise InvalidArgument("manifest lists no tensors")
    if len(manifest.tensors) > limits.max_tensors:
        raise InvalidArgument(f"manifest lists {len(manifest.tensors)} tensors; the limit is {limits.max_tensors}")
    if len(manifest.sha256) != 64 or any(c not in "0123456789abcdef" for c in manifest.sha256):
        raise InvalidArgument("manifest sha256 must be 64 lowercase hex characters")
    specs: list[Spec] = []
    seen: set[str] = set()
    total = 0
    for i, t in enumerate(manifest.tensors):
        if not t.name or len(t.name) > 512:
            raise InvalidArgument(f"tensor #{i} has an empty or over-long name")
        if t.name in seen:
            raise InvalidArgument(f"tensor name {t.name!r} appears twice in the manifest")
        seen.add(t.name)
        if t.dtype not in _NUMPY:
            raise InvalidArgument(f"tensor {t.name!r} has unsupported dtype {t.dtype}")
        if len(t.shape) > 8 or any(d < 0 for d in t.shape):
            raise InvalidArgument(f"tensor {t.name!r} has an invalid shape {list(t.shape)}")
        spec = Spec(t.name, t.dtype, tuple(int(d) for d in t.shape))
        total += spec.nbytes
        if total > limits.max_total_bytes:
            raise InvalidArgument(f"tensors exceed the size limit of {limits.max_total_bytes} bytes")
        specs.append(spec)
    if manifest.total_bytes != total:
        raise InvalidArgument(f"manifest says {manifest.total_bytes} bytes but its tensors need {total}")
    return tuple(specs)


class Assembler:
    """Collects a chunked stream into memory, enforcing the manifest's size and digest (participant side)."""

    def __init__(
        self,
        manifest: pb.Manifest,
        limits: Limits | None = None,
        *,
        annotated: bool = False,
        reuse: bytearray | None = None,
    ) -> None:
        """``reuse``: a buffer of the right size to receive into instead of a new one (a site's previous model: a
        fresh model-sized buffer every round is a zero-fill and a page fault per 4 KiB); whatever shares it is
        overwritten."""
        self.limits = limits or Limits()
        self.specs = specs_from_manifest(manifest, self.limits, annotated=annotated)
        self.expected_sha256 = manifest.sha256
        self.total = manifest.total_bytes
        self.buffer = reuse if reuse is not None and len(reuse) == self.total else bytearray(self.total)
        self._buf = self.buffer
        self._filled = 0
        self._hasher = new_hasher(self.specs)

    def add(self, chunk: bytes | bytearray | memoryview) -> None:
        if len(chunk) > self.limits.max_chunk_bytes:
            raise InvalidArgument(f"chunk of {len(chunk)} bytes exceeds the limit of {self.limits.max_chunk_bytes}")
        end = self._filled + len(chunk)
        if end > self.total:
            raise InvalidArgument(f"stream carries more than the {self.total} bytes its manifest announced")
        self._buf[self._filled : end] = chunk
        self._hasher.update(chunk)
        self._filled = end

    def spaces(self, size: int) -> Iterator[memoryview]:
        """The rest of the buffer in pieces of at most ``size`` bytes, to receive into in place; report each piece
        with :meth:`filled` before taking the next."""
        view = memoryview(self._buf)
        while self._filled < self.total:
            yield view[self._filled : min(self.total, self._filled + size)]

    def filled(self, nbytes: int) -> None:
        """``nbytes`` were written into the piece :meth:`spaces` gave out last."""
        end = self._filled + nbytes
        if end > self.total:
            raise InvalidArgument(f"stream carries more than the {self.total} bytes its manifest announced")
        self._hasher.update(memoryview(self._buf)[self._filled : end])
        self._filled = end

    def require_version(self, version: str) -> None:
        """Refuse a stream whose manifest is not model ``version`` (``sha256:<digest>``), the one a task named."""
        if "sha256:" + self.expected_sha256 != version:
            raise InvalidArgument("the coordinator sent a different model than the task named")

    def finish(self) -> dict[str, torch.Tensor]:
        """The verified tensors. They share the assembler's buffer (no copy): use the assembler no further."""
        if self._filled != self.total:
            raise InvalidArgument(f"stream ended after {self._filled} of {self.total} bytes")
        if self._hasher.hexdigest() != self.expected_sha256:
            raise InvalidArgument("digest mismatch: the received bytes do not hash to the manifest's sha256")
        return decode_views(self.specs, self._buf)


def state_dict_float32(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A model's state as float32 tensors; refuses non-float entries, which FedAvg cannot average."""
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if not torch.is_floating_point(t):
            raise ValueError(f"state entry {name!r} is {t.dtype}; tasks must keep every entry floating point")
        out[name] = t.detach().to(torch.float32).clone()
    return out


class UpdateBuffer:
    """A site's update, ``local - global`` as float32, written straight into its wire buffer.

    One buffer per model shape, reused round after round: the subtraction writes into it (no intermediate tensors),
    optional clipping scales it in place, and the upload streams slices of it. :meth:`encoded` hashes it once.
    """

    def __init__(self, specs: Sequence[Spec]) -> None:
        if any(s.dtype != pb.DTYPE_FLOAT32 for s in specs):
            raise ValueError("an update buffer holds float32 tensors only")
        self.specs = tuple(specs)
        self.data = bytearray(sum(s.nbytes for s in self.specs))
        self.flat: torch.Tensor = (
            torch.frombuffer(self.data, dtype=torch.float32) if self.data else torch.empty(0, dtype=torch.float32)
        )
        self._views: list[torch.Tensor] = []
        offset = 0
        for s in self.specs:
            self._views.append(self.flat[offset : offset + s.numel].view(s.shape))
            offset += s.numel

    def fits(self, tensors: Mapping[str, torch.Tensor]) -> bool:
        return len(tensors) == len(self.specs) and all(
            s.name in tensors and tuple(tensors[s.name].shape) == s.shape for s in self.specs
        )

    def write_delta(self, local: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]) -> None:
        """``self = local - base``, tensor by tensor, in this buffer's order (``base``'s keys)."""
        for s, out in zip(self.specs, self._views, strict=True):
            t = local[s.name].detach()
            if not torch.is_floating_point(t):
                raise ValueError(f"state entry {s.name!r} is {t.dtype}; tasks must keep every entry floating point")
            if t.dtype != torch.float32:
                t = t.to(torch.float32)
            torch.sub(t, base[s.name], out=out)

    def _blocks(self) -> Iterator[torch.Tensor]:
        for start in range(0, self.flat.numel(), _BLOCK):
            yield self.flat[start : start + _BLOCK]

    def l2_norm(self) -> float:
        """The L2 norm, summed in float64 block by block (no model-sized float64 copy)."""
        return math.sqrt(sum(float(part.double().square().sum()) for part in self._blocks()))

    def scale(self, *factors: float) -> None:
        """``self = float32(float64(self) * f1 * f2 ...)`` (one rounding to float32), block by block."""
        for part in self._blocks():
            scaled = part.double()
            for f in factors:
                scaled *= f
            part.copy_(scaled)

    def encoded(self) -> EncodedTensors:
        h = new_hasher(self.specs)
        h.update(self.data)
        return EncodedTensors(self.specs, self.data, h.hexdigest())
