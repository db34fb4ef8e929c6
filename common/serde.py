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
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from common.errors import InvalidArgument
from common.proto.cohort.v1 import cohort_pb2 as pb

CHUNK_BYTES = 1 << 20  # 1 MiB: well under gRPC's default 4 MiB message limit, large enough to amortise framing

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
    """A model or update serialized once: specs, one contiguous buffer and its digest."""

    specs: tuple[Spec, ...]
    data: bytes
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


def encode(tensors: Mapping[str, torch.Tensor]) -> EncodedTensors:
    """Serialize named tensors in mapping order (a state dict keeps its module order)."""
    specs: list[Spec] = []
    parts: list[bytes] = []
    for name, t in tensors.items():
        if t.dtype not in _FROM_TORCH:
            raise ValueError(f"tensor {name!r} has unsupported dtype {t.dtype}")
        arr = t.detach().to("cpu").contiguous()
        specs.append(Spec(name, _FROM_TORCH[arr.dtype], tuple(int(d) for d in arr.shape)))
        parts.append(arr.view(-1).view(torch.uint8).numpy().tobytes() if arr.numel() else b"")
    data = b"".join(parts)
    h = new_hasher(specs)
    h.update(data)
    return EncodedTensors(tuple(specs), data, h.hexdigest())


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


@dataclass(frozen=True)
class Limits:
    max_tensors: int = 10_000
    max_total_bytes: int = 2 << 30  # 2 GiB
    max_chunk_bytes: int = 4 << 20


def specs_from_manifest(manifest: pb.Manifest, limits: Limits) -> tuple[Spec, ...]:
    """Validate a received manifest and return its specs; raises InvalidArgument naming the problem."""
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

    def __init__(self, manifest: pb.Manifest, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self.specs = specs_from_manifest(manifest, self.limits)
        self.expected_sha256 = manifest.sha256
        self.total = manifest.total_bytes
        self._buf = bytearray(self.total)
        self._filled = 0
        self._hasher = new_hasher(self.specs)

    def add(self, chunk: bytes) -> None:
        if len(chunk) > self.limits.max_chunk_bytes:
            raise InvalidArgument(f"chunk of {len(chunk)} bytes exceeds the limit of {self.limits.max_chunk_bytes}")
        end = self._filled + len(chunk)
        if end > self.total:
            raise InvalidArgument(f"stream carries more than the {self.total} bytes its manifest announced")
        self._buf[self._filled : end] = chunk
        self._hasher.update(chunk)
        self._filled = end

    def finish(self) -> dict[str, torch.Tensor]:
        if self._filled != self.total:
            raise InvalidArgument(f"stream ended after {self._filled} of {self.total} bytes")
        if self._hasher.hexdigest() != self.expected_sha256:
            raise InvalidArgument("digest mismatch: the received bytes do not hash to the manifest's sha256")
        return decode(self.specs, self._buf)


def state_dict_float32(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A model's state as float32 tensors; refuses non-float entries, which FedAvg cannot average."""
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if not torch.is_floating_point(t):
            raise ValueError(f"state entry {name!r} is {t.dtype}; tasks must keep every entry floating point")
        out[name] = t.detach().to(torch.float32).clone()
    return out
