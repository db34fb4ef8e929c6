"""Data chunks of a stream without the protobuf runtime (a prototype for the upload and download paths).

A ``data`` chunk of ``UpdateChunk`` or ``ModelChunk`` (field 2 of the message's oneof, ``bytes``) is on the wire just
``0x12, varint(len), payload``. Parsing it with the generated class copies the payload into a new ``bytes``; serializing
one copies it in and out again. These two functions do it in place: :func:`data_of` returns a view of the received
message (no copy), :func:`data_message` builds the message from a slice of the sender's buffer with one copy.
Anything that is not a bare data chunk (the header or manifest, an unknown field) is left to the generated parser,
so the wire format does not change: either side may use this or protobuf, the bytes are the same.

Use with gRPC by passing an identity (de)serializer for the method (``grpc.stream_unary_rpc_method_handler(...,
request_deserializer=bytes)``, or ``channel.stream_unary(path, request_serializer=...)``) and calling these.
bench/upload_path.py measures what it saves.
"""

from __future__ import annotations

DATA_TAG = 0x12  # field 2, wire type 2 (length-delimited)
_MAX_VARINT = 10


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def data_message(payload: bytes | bytearray | memoryview) -> bytes:
    """The serialized chunk message ``{data: payload}``, built with one copy of ``payload``."""
    return b"".join((bytes((DATA_TAG,)), _varint(len(payload)), payload))


def data_of(message: bytes | bytearray | memoryview) -> memoryview | None:
    """The payload of a serialized message that is exactly one ``data`` field, as a view into ``message``; None for
    anything else (a header, a manifest, extra or unknown fields, a truncated message): parse those with protobuf."""
    view = memoryview(message)
    if len(view) < 2 or view[0] != DATA_TAG:
        return None
    length, shift, i = 0, 0, 1
    while True:
        if i >= len(view) or i > _MAX_VARINT:
            return None
        byte = view[i]
        length |= (byte & 0x7F) << shift
        i += 1
        if not byte & 0x80:
            break
        shift += 7
    if i + length != len(view):
        return None  # truncated, or followed by more fields: the generated parser decides what that means
    return view[i:]
