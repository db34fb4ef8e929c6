"""The bulk data channel's framing: models and updates as raw bytes over a mutual-TLS socket.

gRPC-python moves about 350 MB/s per core through its receive path (bench/results/upload_path-data.md) while a TLS
socket moves several times that; on a coordinator that takes N updates and sends N models a round, that difference
is most of a round (issue 15). So the two bulk transfers may go over a second listener (``server.data_listen``,
advertised in ``JoinReply.data_port``) with the same certificates, the same identity rule (the peer certificate)
and the same handlers as ``DownloadModel`` and ``UploadUpdate``; only the framing differs. One connection carries
any number of transfers, one at a time:

    request   MAGIC, op (1 byte), length (u32 BE), body    body: ModelRequest (DOWNLOAD) or UpdateHeader (UPLOAD)
    reply     status (1 byte: a gRPC status code), length (u32 BE), body    body: a message, or the error text

    DOWNLOAD  -> reply(OK, Manifest) then exactly manifest.total_bytes raw bytes, or reply(error)
    UPLOAD    -> reply(OK, empty): "send" (the header was accepted and the upload admitted), or reply(error)
              <- exactly header.manifest.total_bytes raw bytes
              -> reply(OK, UploadReply) or reply(error)

A peer that breaks the framing gets a reply(INVALID_ARGUMENT) where it can still be read, and the connection closes.
Nothing here is unpickled: bodies are protobuf messages parsed by the generated classes, and data are bytes.
"""

from __future__ import annotations

import socket
import ssl
import struct

import grpc

MAGIC = b"CB1"
DOWNLOAD, UPLOAD = 1, 2
OPS = {DOWNLOAD: "DownloadModel", UPLOAD: "UploadUpdate"}
_REQUEST = struct.Struct(">3sBI")
_REPLY = struct.Struct(">BI")
# A request or reply body: as large as gRPC's largest message at the coordinator (server.max_chunk_bytes' default
# plus 64 KiB); a manifest of 10,000 tensors is well under it. Read as it arrives, so a peer that announces a large
# body and sends little holds little memory.
MAX_BODY = (4 << 20) + (64 << 10)
_BODY_PIECE = 64 << 10
SLICE = 1 << 20  # bytes per send or receive call

_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}


class FramingError(Exception):
    """The peer broke the framing (wrong magic, unknown op or status, a body over :data:`MAX_BODY`)."""


class Closed(Exception):
    """The peer closed the connection (``clean``: between frames, not inside one)."""

    def __init__(self, clean: bool) -> None:
        super().__init__("connection closed" + ("" if clean else " in the middle of a frame"))
        self.clean = clean


Sock = socket.socket | ssl.SSLSocket


def recv_exact(sock: Sock, view: memoryview, *, clean_eof: bool = False) -> None:
    """Fill ``view`` from ``sock``; :class:`Closed` when the peer closes first (``clean`` if nothing was read and
    ``clean_eof``)."""
    filled = 0
    while filled < len(view):
        n = sock.recv_into(view[filled:], min(SLICE, len(view) - filled))
        if n == 0:
            raise Closed(clean=clean_eof and filled == 0)
        filled += n


def _body(sock: Sock, length: int) -> bytes:
    if length > MAX_BODY:
        raise FramingError(f"a frame of {length} bytes is over the limit of {MAX_BODY}")
    body = bytearray()
    piece = bytearray(min(length, _BODY_PIECE))
    while len(body) < length:
        view = memoryview(piece)[: min(len(piece), length - len(body))]
        recv_exact(sock, view)
        body += view
    return bytes(body)


def send_request(sock: Sock, op: int, body: bytes) -> None:
    sock.sendall(_REQUEST.pack(MAGIC, op, len(body)) + body)


def read_request(sock: Sock) -> tuple[int, bytes]:
    """The next request's op and body; :class:`Closed` (clean) when the peer is done with the connection."""
    head = bytearray(_REQUEST.size)
    recv_exact(sock, memoryview(head), clean_eof=True)
    magic, op, length = _REQUEST.unpack(head)
    if magic != MAGIC:
        raise FramingError("not a Cohort bulk-channel request (wrong magic); is this the coordinator's data port?")
    if op not in OPS:
        raise FramingError(f"unknown operation {op}")
    return op, _body(sock, length)


def send_reply(sock: Sock, code: grpc.StatusCode, body: bytes = b"") -> None:
    sock.sendall(_REPLY.pack(code.value[0], len(body)) + body)


def read_reply(sock: Sock) -> tuple[grpc.StatusCode, bytes]:
    head = bytearray(_REPLY.size)
    recv_exact(sock, memoryview(head))
    value, length = _REPLY.unpack(head)
    code = _BY_VALUE.get(value)
    if code is None:
        raise FramingError(f"unknown status {value} in a reply")
    return code, _body(sock, length)


def send_all(sock: Sock, data: memoryview) -> None:
    """``data`` in :data:`SLICE` pieces (no copy of the buffer)."""
    for start in range(0, len(data), SLICE):
        sock.sendall(data[start : start + SLICE])
