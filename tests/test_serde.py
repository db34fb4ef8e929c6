"""Tensor wire format: round trips for any shape and dtype; any tampering is caught."""

from __future__ import annotations

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from common.errors import InvalidArgument
from common.proto.cohort.v1 import cohort_pb2 as pb
from common.serde import Assembler, Limits, decode, encode, specs_from_manifest

DTYPES = [np.float32, np.float64, np.int64, np.int32]


@st.composite
def tensor_dicts(draw: st.DrawFn) -> dict[str, torch.Tensor]:
    names = draw(st.lists(st.text("abcdefgh._", min_size=1, max_size=8), min_size=1, max_size=4, unique=True))
    out = {}
    for name in names:
        dtype = draw(st.sampled_from(DTYPES))
        shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5))
        arr = draw(hnp.arrays(dtype, shape))
        out[name] = torch.from_numpy(arr.copy())
    return out


@settings(max_examples=60, deadline=None)
@given(tensors=tensor_dicts(), chunk=st.integers(1, 64))
def test_round_trip_through_chunks(tensors: dict[str, torch.Tensor], chunk: int) -> None:
    enc = encode(tensors)
    asm = Assembler(enc.manifest())
    for part in enc.chunks(chunk):
        asm.add(bytes(part))
    out = asm.finish()
    assert list(out) == list(tensors)
    for name, t in tensors.items():
        assert out[name].dtype == t.dtype
        assert out[name].shape == t.shape
        assert out[name].numpy().tobytes() == t.numpy().tobytes()  # bit-exact, NaNs included


@settings(max_examples=40, deadline=None)
@given(tensors=tensor_dicts(), data=st.data())
def test_any_flipped_byte_is_caught(tensors: dict[str, torch.Tensor], data: st.DataObject) -> None:
    enc = encode(tensors)
    if not enc.data:
        return
    i = data.draw(st.integers(0, len(enc.data) - 1))
    tampered = bytearray(enc.data)
    tampered[i] ^= data.draw(st.integers(1, 255))
    asm = Assembler(enc.manifest())
    asm.add(bytes(tampered))
    with pytest.raises(InvalidArgument, match="digest mismatch"):
        asm.finish()


def test_renamed_or_reshaped_tensor_changes_the_digest() -> None:
    enc = encode({"a": torch.zeros(2, 3)})
    assert enc.sha256 != encode({"b": torch.zeros(2, 3)}).sha256
    assert enc.sha256 != encode({"a": torch.zeros(3, 2)}).sha256
    assert enc.sha256 != encode({"a": torch.zeros(6, dtype=torch.float32).view(2, 3).double()}).sha256


def test_manifest_validation_names_the_problem() -> None:
    ok = encode({"w": torch.zeros(4)}).manifest()
    cases = {
        "lists no tensors": pb.Manifest(total_bytes=0, sha256="0" * 64),
        "appears twice": pb.Manifest(tensors=[ok.tensors[0], ok.tensors[0]], total_bytes=32, sha256="0" * 64),
        "but its tensors need": pb.Manifest(tensors=ok.tensors, total_bytes=99, sha256="0" * 64),
        "64 lowercase hex": pb.Manifest(tensors=ok.tensors, total_bytes=16, sha256="xyz"),
        "invalid shape": pb.Manifest(
            tensors=[pb.TensorSpec(name="w", dtype=pb.DTYPE_FLOAT32, shape=[-1])],
            total_bytes=0,
            sha256="0" * 64,
        ),
        "unsupported dtype": pb.Manifest(
            tensors=[pb.TensorSpec(name="w", dtype=pb.DTYPE_UNSPECIFIED, shape=[1])], total_bytes=4, sha256="0" * 64
        ),
        "size limit": pb.Manifest(
            tensors=[pb.TensorSpec(name="w", dtype=pb.DTYPE_FLOAT32, shape=[1 << 40])],
            total_bytes=4 << 40,
            sha256="0" * 64,
        ),
    }
    for message, manifest in cases.items():
        with pytest.raises(InvalidArgument, match=message):
            specs_from_manifest(manifest, Limits())


def test_manifest_metadata_only_with_a_final_model() -> None:
    """A checkpoint's description rides on a finished job's final model only; the digest does not cover it, so any
    other manifest carrying it (an upload, a round's model) is refused, and its size is bounded."""
    manifest = encode({"w": torch.zeros(3)}).manifest()
    manifest.metadata["job"] = "j"
    with pytest.raises(InvalidArgument, match="only sent with a finished job's final model"):
        specs_from_manifest(manifest, Limits())
    assert specs_from_manifest(manifest, Limits(), annotated=True)[0].name == "w"
    manifest.metadata["x"] = "y" * 5000
    with pytest.raises(InvalidArgument, match="at most 64 entries of 4096 characters"):
        specs_from_manifest(manifest, Limits(), annotated=True)


def test_stream_size_limits() -> None:
    enc = encode({"w": torch.zeros(1000)})
    asm = Assembler(enc.manifest(), Limits(max_chunk_bytes=100))
    with pytest.raises(InvalidArgument, match="exceeds the limit"):
        asm.add(enc.data[:101])
    asm = Assembler(enc.manifest())
    asm.add(enc.data)
    with pytest.raises(InvalidArgument, match="more than"):
        asm.add(b"x")
    asm = Assembler(enc.manifest())
    asm.add(enc.data[:10])
    with pytest.raises(InvalidArgument, match="ended after"):
        asm.finish()


def test_decode_copies() -> None:
    enc = encode({"w": torch.arange(4, dtype=torch.float32)})
    buf = bytearray(enc.data)
    out = decode(enc.specs, buf)
    buf[:] = b"\x00" * len(buf)
    assert out["w"].tolist() == [0.0, 1.0, 2.0, 3.0]


def test_an_assembler_receives_into_a_reused_buffer_in_place() -> None:
    first = encode({"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(3)})
    second = encode({"w": torch.full((2, 3), 7.0), "b": torch.zeros(3)})
    asm = Assembler(first.manifest())
    offset = 0
    for piece in asm.spaces(5):  # received straight into the buffer, 5 bytes at a time
        piece[:] = first.data[offset : offset + len(piece)]
        asm.filled(len(piece))
        offset += len(piece)
    old = asm.finish()
    torch.testing.assert_close(old["w"], torch.arange(6, dtype=torch.float32).reshape(2, 3))
    # The next model of the same size lands in the same buffer: the old tensors (views of it) see the new values.
    again = Assembler(second.manifest(), reuse=asm.buffer)
    assert again.buffer is asm.buffer
    for chunk in second.chunks(7):
        again.add(chunk)
    new = again.finish()
    torch.testing.assert_close(new["w"], torch.full((2, 3), 7.0))
    torch.testing.assert_close(old["w"], torch.full((2, 3), 7.0))
    # A buffer of another size is not used, and a stream that overfills the buffer is refused.
    assert Assembler(second.manifest(), reuse=bytearray(3)).buffer is not asm.buffer
    over = Assembler(second.manifest())
    with pytest.raises(InvalidArgument, match="more than"):
        over.filled(over.total + 1)
