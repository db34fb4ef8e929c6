"""Raw data chunks (common/raw_chunks.py) are byte for byte what protobuf writes and reads."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from common.proto.cohort.v1 import cohort_pb2 as pb
from common.raw_chunks import data_message, data_of

# Payloads around 2**14 bytes, where the length's varint grows from 2 to 3 bytes; their bytes come from a seeded
# generator (drawing 16 KiB from hypothesis itself trips its input-size health check).
_LONG = st.builds(lambda n, seed: random.Random(seed).randbytes(n), st.integers(16_380, 16_400), st.integers(0, 2**32))


@settings(max_examples=200, deadline=None)
@given(payload=st.binary(max_size=600) | _LONG)
def test_a_data_chunk_is_what_protobuf_writes_and_reads(payload: bytes) -> None:
    wire = data_message(memoryview(payload))
    assert wire == pb.UpdateChunk(data=payload).SerializeToString()
    assert wire == pb.ModelChunk(data=payload).SerializeToString()
    assert pb.UpdateChunk.FromString(wire).data == payload
    view = data_of(wire)
    assert view is not None
    assert bytes(view) == payload
    assert view.obj is wire  # a view into the received message, not a copy


@settings(max_examples=200, deadline=None)
@given(message=st.binary(max_size=64))
def test_anything_else_is_left_to_protobuf(message: bytes) -> None:
    view = data_of(message)
    if view is None:
        return
    # Whatever data_of accepts, protobuf reads the same way: one data field with exactly these bytes.
    assert pb.UpdateChunk.FromString(message).WhichOneof("kind") == "data"
    assert pb.UpdateChunk.FromString(message).data == bytes(view)


def test_headers_and_damaged_chunks_are_not_data() -> None:
    header = pb.UpdateChunk(header=pb.UpdateHeader(job_id="j", round=1)).SerializeToString()
    assert data_of(header) is None
    wire = data_message(b"abcdef")
    assert data_of(wire[:-1]) is None  # truncated
    assert data_of(wire + b"\x08\x01") is None  # a second field follows
    assert data_of(b"") is None
    assert data_of(b"\x12\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01") is None  # an over-long varint
