"""The site's end of the bulk data channel (coordinator/rpc/bulk.py; framing in common/bulk_wire.py).

When the coordinator offers a data port (``JoinReply.data_port``) and ``coordinator.data_channel`` is on, the model
download and the update upload go over a mutual-TLS socket to it: the site dials out (it never listens), verifies the
coordinator's certificate as the gRPC channel does (the federation CA, the host or ``coordinator.server_name``) and
presents its own. Transfers run in a thread (OpenSSL releases the GIL) straight between the socket and the update
buffer or the model's assembler.

The coordinator's refusals arrive as ``grpc.aio.AioRpcError`` with its status and message, so the daemon retries or
gives up exactly as for gRPC. A data port that cannot be reached (a firewall, an older coordinator) raises
:class:`Unreachable`: the caller moves that transfer over gRPC, and the channel rests for :data:`REST_S` before it
is tried again.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import grpc

from common import bulk_wire as wire
from common import failpoints
from common.certs import TlsFiles
from common.proto.cohort.v1 import cohort_pb2 as pb
from common.serde import Assembler
from common.settings import parse_address
from participant.config import CoordinatorEndpoint

log = logging.getLogger("cohort.participant.bulk")

T = TypeVar("T")
REST_S = 60.0  # after the data port could not be reached, use gRPC alone this long
CONNECT_TIMEOUT_S = 10.0


class Unreachable(Exception):
    """The data port could not be reached or its TLS handshake failed; nothing was sent."""


def client_context(tls: TlsFiles) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(tls.cert, tls.key)
    ctx.load_verify_locations(tls.ca)
    return ctx  # PROTOCOL_TLS_CLIENT: CERT_REQUIRED and hostname checking


def _error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


class BulkClient:
    """Pooled connections to the coordinator's data port; :meth:`offered` is set from each JoinReply."""

    def __init__(self, endpoint: CoordinatorEndpoint, tls: TlsFiles) -> None:
        self._endpoint = endpoint
        self._context = client_context(tls)
        self._port = 0
        self._idle: list[ssl.SSLSocket] = []
        self._busy: set[ssl.SSLSocket] = set()
        self._lock = threading.Lock()
        self._resting_until = 0.0
        self._closed = False
        # Its own threads: a transfer blocks one while it waits (for admission, for the coordinator's answer), and
        # must not hold the event loop's default executor, which runs this site's training and masking.
        self._pool = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="cohort-site-bulk")
        self.transfers = 0  # completed over the data channel (tests, logs)

    def offered(self, port: int) -> None:
        """The coordinator's data port from its JoinReply (0: none)."""
        if port != self._port:
            self._drop_idle()
        self._port = port

    @property
    def usable(self) -> bool:
        return self._endpoint.data_channel and self._target() is not None and time.monotonic() >= self._resting_until

    def _target(self) -> tuple[str, int] | None:
        if self._endpoint.data_address:
            return parse_address(self._endpoint.data_address, "coordinator.data_address")
        if not self._port:
            return None
        host, _ = parse_address(self._endpoint.address, "coordinator.address")
        return host, self._port

    async def download(self, job_id: str, version: str, timeout: float, reuse: bytearray | None = None) -> Assembler:
        """Model ``version`` of ``job_id`` in a checked assembler (digest still to be verified by ``finish()``);
        ``reuse``: a buffer to receive into (:class:`Assembler`)."""
        body = pb.ModelRequest(job_id=job_id, model_version=version).SerializeToString()

        def run(sock: ssl.SSLSocket, deadline: float) -> Assembler:
            wire.send_request(sock, wire.DOWNLOAD, body)
            code, reply = wire.read_reply(sock)
            if code is not grpc.StatusCode.OK:
                raise _error(code, reply.decode(errors="replace"))
            assembler = Assembler(pb.Manifest.FromString(reply), reuse=reuse)
            assembler.require_version(version)
            for view in assembler.spaces(wire.SLICE):
                _on_time(sock, deadline)
                wire.recv_exact(sock, view)
                assembler.filled(len(view))
            return assembler

        return await self._transfer("model download", run, timeout)

    async def upload(self, header: pb.UpdateHeader, data: bytes | bytearray, timeout: float) -> pb.UploadReply:
        body = header.SerializeToString()

        def run(sock: ssl.SSLSocket, deadline: float) -> pb.UploadReply:
            wire.send_request(sock, wire.UPLOAD, body)
            code, reply = wire.read_reply(sock)  # "send", a duplicate's answer, or a refusal of the header
            if code is grpc.StatusCode.OK and not reply:
                view = memoryview(data)
                for start in range(0, len(view), wire.SLICE):
                    _on_time(sock, deadline)
                    sock.sendall(view[start : start + wire.SLICE])
                    failpoints.hit("participant.upload", round=header.round)  # the upload is open, not yet whole
                code, reply = wire.read_reply(sock)
            if code is not grpc.StatusCode.OK:
                raise _error(code, reply.decode(errors="replace"))
            return pb.UploadReply.FromString(reply)

        return await self._transfer("upload", run, timeout)

    async def _transfer(self, what: str, run: Callable[[ssl.SSLSocket, float], T], timeout: float) -> T:
        deadline = time.monotonic() + timeout

        def go() -> T:
            sock = self._take()
            try:
                result = run(sock, deadline)
            except grpc.aio.AioRpcError:
                self._give_back(sock)  # a refusal in a reply: the connection is in step
                raise
            except (OSError, wire.Closed, wire.FramingError) as exc:
                self._discard(sock)
                if isinstance(exc, TimeoutError):
                    raise _error(grpc.StatusCode.DEADLINE_EXCEEDED, f"{what} over the data channel timed out") from None
                raise _error(grpc.StatusCode.UNAVAILABLE, f"{what} over the data channel broke off: {exc}") from None
            except BaseException:
                self._discard(sock)
                raise
            self._give_back(sock)
            self.transfers += 1
            return result

        return await asyncio.get_running_loop().run_in_executor(self._pool, go)

    # -- connections ------------------------------------------------------------------------------------------
    def _take(self) -> ssl.SSLSocket:
        while True:
            with self._lock:
                sock = self._idle.pop() if self._idle else None
            if sock is None:
                sock = self._connect()
                break
            # The coordinator never writes unasked: a pooled connection that reads as ready was closed by it (idle
            # past server.data_idle_timeout_s, or a restart).
            if not select.select([sock], [], [], 0)[0]:
                break
            self._discard(sock)
        with self._lock:
            self._busy.add(sock)
        return sock

    def _connect(self) -> ssl.SSLSocket:
        target = self._target()
        if target is None:
            raise Unreachable("the coordinator offers no data port")
        host, port = target
        server_name = self._endpoint.server_name or host
        try:
            raw = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S)
        except OSError as exc:
            self._rest(f"cannot connect to the coordinator's data port {host}:{port} ({exc})")
            raise Unreachable(str(exc)) from None
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return self._context.wrap_socket(raw, server_hostname=server_name)
        except (OSError, ssl.SSLError) as exc:
            raw.close()
            self._rest(f"TLS handshake with the coordinator's data port {host}:{port} failed ({exc})")
            raise Unreachable(str(exc)) from None

    def _rest(self, why: str) -> None:
        self._resting_until = time.monotonic() + REST_S
        log.warning("%s; models and updates go over gRPC for the next %.0f s", why, REST_S)

    def _give_back(self, sock: ssl.SSLSocket) -> None:
        with self._lock:
            self._busy.discard(sock)
            if not self._closed:
                self._idle.append(sock)
                return
        with contextlib.suppress(OSError):
            sock.close()  # the client closed while this transfer ran

    def _discard(self, sock: ssl.SSLSocket) -> None:
        with self._lock:
            self._busy.discard(sock)
        with contextlib.suppress(OSError):
            sock.close()

    def _drop_idle(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for sock in idle:
            with contextlib.suppress(OSError):
                sock.close()

    def close(self) -> None:
        """Close idle connections and cut transfers in flight (their threads see the connection end)."""
        self._closed = True
        self._drop_idle()
        with self._lock:
            busy = list(self._busy)
        for sock in busy:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._pool.shutdown(wait=False, cancel_futures=True)


def _on_time(sock: ssl.SSLSocket, deadline: float) -> None:
    """Bound the next socket call by what is left of the transfer's deadline."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    sock.settimeout(left)
