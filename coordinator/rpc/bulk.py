"""The coordinator's bulk data channel: model downloads and update uploads over a mutual-TLS socket.

Framing in common/bulk_wire.py; why in docs/ARCHITECTURE.md ("Bulk data channel"). What is the same as gRPC's
``DownloadModel`` / ``UploadUpdate``: the TLS context trusts the same CA and requires a client certificate; the
caller is read from that certificate (federation, role, revocation: :func:`check_caller`); requests go through the
same handlers, the same :class:`GuardedStream` (idle timeout, transfer deadline, admission, revocation while
sending), the same refusal accounting (status, audit, metrics). What differs: bytes move between the socket and the
spool or the shared model buffer with no per-message Python work beyond one recv or send call per MiB, in threads
that release the GIL while OpenSSL encrypts.

Threads: one accepts; each connection has one that waits for its next request (``server.max_data_connections`` at
most: the rest are closed at once, before the handshake, and their sites use gRPC); the transfer itself runs as a
coroutine on the event loop, whose socket calls go to a small pool sized to the admission limits. A connection idle
for ``server.data_idle_timeout_s`` between requests is closed; sites open a new one when they need it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar, cast

import grpc

from common import bulk_wire as wire
from common import failpoints
from common.certs import Role, TlsFiles
from common.errors import (
    CertificateRevoked,
    DeadlineExceeded,
    InvalidArgument,
    RpcError,
    Unauthenticated,
)
from common.proto.cohort.v1 import cohort_pb2 as pb
from common.serde import CHUNK_BYTES
from common.settings import parse_address
from common.tls import CertRef, ref_from_der
from coordinator.handlers import participant as handlers
from coordinator.rpc.servicer import FederationServicer, audit_as, check_caller, refusal
from coordinator.rpc.upload_guard import GuardedStream

log = logging.getLogger("cohort.coordinator.bulk")

T = TypeVar("T")
HANDSHAKE_TIMEOUT_S = 10.0


def server_context(tls: TlsFiles) -> ssl.SSLContext:
    """TLS 1.3, the coordinator's certificate, client certificates required and verified against the federation CA."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(tls.cert, tls.key)
    ctx.load_verify_locations(tls.ca)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class DataChunk:
    """An upload's data chunk as the intake reads it (``UpdateChunk`` with ``data`` set), without a protobuf copy."""

    __slots__ = ("data",)

    def __init__(self, data: memoryview) -> None:
        self.data = data

    def WhichOneof(self, _group: str) -> str:  # the protobuf method it stands in for
        return "data"


class _Upload:
    """The upload's messages for :class:`GuardedStream`: the header, then the raw bytes in 1 MiB chunks. The first
    data read tells the site to send (the header was accepted and the upload admitted)."""

    def __init__(self, conn: Connection, header: pb.UpdateHeader) -> None:
        self._conn = conn
        self._header: pb.UpdateHeader | None = header
        self.remaining = header.manifest.total_bytes
        self.started = False
        self._buf: bytearray | None = None

    def __aiter__(self) -> _Upload:
        return self

    async def __anext__(self) -> pb.UpdateChunk | DataChunk:
        if self._header is not None:
            header, self._header = self._header, None
            return pb.UpdateChunk(header=header)
        if not self.started:
            self.started = True
            await self._conn.io(wire.send_reply, grpc.StatusCode.OK)
        if self.remaining <= 0:
            raise StopAsyncIteration
        if self._buf is None:
            self._buf = bytearray(min(CHUNK_BYTES, self.remaining))
        # One buffer per upload, refilled: the intake has checked, hashed and written a chunk before it asks for the
        # next (SpoolWriter.write), and a fresh buffer per chunk cost a zero-fill and page faults per MiB.
        view = memoryview(self._buf)[: min(len(self._buf), self.remaining)]
        await self._conn.io(wire.recv_exact, view)
        self.remaining -= len(view)
        return DataChunk(view)


class Connection:
    """One site's TLS connection: its certificate, and socket calls run in the server's I/O pool."""

    def __init__(self, server: BulkServer, sock: ssl.SSLSocket, ref: CertRef) -> None:
        self.server = server
        self.sock = sock
        self.ref = ref

    async def io(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.server.pool, fn, self.sock, *args)

    def abort(self) -> None:
        """Unblock any socket call on this connection (it is closed by its thread)."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)


class BulkServer:
    """Listens on ``server.data_listen``; ``start()`` returns the bound port, ``close()`` stops and joins."""

    def __init__(self, servicer: FederationServicer, tls: TlsFiles, address: str) -> None:
        self.servicer = servicer
        self.state = servicer.c
        cfg = self.state.config.server
        self._context = server_context(tls)
        self._address = parse_address(address, "server.data_listen")
        self._idle_s = cfg.data_idle_timeout_s
        self._slots = threading.BoundedSemaphore(cfg.max_data_connections)
        gates = max(1, cfg.max_concurrent_uploads) + max(1, cfg.max_concurrent_downloads)
        workers = 32 if 0 in (cfg.max_concurrent_uploads, cfg.max_concurrent_downloads) else gates + 2
        self.pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="cohort-bulk-io")
        self._listener: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._threads: set[threading.Thread] = set()
        self._open: set[Connection] = set()
        self._calls: set[concurrent.futures.Future[bool]] = set()
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._turned_away = 0
        self._next_full_warning = 0.0

    def start(self) -> int:
        self._loop = asyncio.get_running_loop()
        host, port = self._address
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, sockaddr = infos[0]
        listener = socket.socket(family, kind, proto)
        # A restarted coordinator rebinds its port while the last run's connections sit in TIME_WAIT (SO_REUSEADDR
        # does not let a second live listener share it, unlike SO_REUSEPORT).
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind(sockaddr)
            listener.listen(128)
        except OSError:
            listener.close()
            raise
        self._listener = listener
        self._spawn(self._accept, "cohort-bulk-accept")
        return int(listener.getsockname()[1])

    def _spawn(self, target: Callable[..., None], name: str, *args: Any) -> None:
        thread = threading.Thread(target=self._run, args=(target, *args), name=name, daemon=True)
        with self._lock:
            self._threads.add(thread)
        thread.start()

    def _run(self, target: Callable[..., None], *args: Any) -> None:
        try:
            target(*args)
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())

    async def close(self) -> None:
        """Stop accepting, end every transfer in flight (its site retries over a new connection or gRPC) and join
        the threads."""
        self._closing.set()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
        with self._lock:
            conns, calls = list(self._open), list(self._calls)
        for conn in conns:
            conn.abort()
        for call in calls:
            call.cancel()
        await asyncio.to_thread(self._join)
        self.pool.shutdown(wait=False, cancel_futures=True)

    def _join(self) -> None:
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout=5)

    # -- threads ----------------------------------------------------------------------------------------------
    def _accept(self) -> None:
        assert self._listener is not None
        while not self._closing.is_set():
            try:
                raw, peer = self._listener.accept()
            except OSError:
                return  # closed
            if not self._slots.acquire(blocking=False):
                # At the limit: closed before the handshake, so a flood of connections costs no thread. The site
                # sees the data port unreachable and moves its transfer over gRPC.
                raw.close()
                self._turned_away += 1
                if time.monotonic() >= self._next_full_warning:  # at most one line per 10 s under a flood
                    self._next_full_warning = time.monotonic() + 10
                    log.warning(
                        "data channel: %d connections open (server.max_data_connections); %d turned away so far, "
                        "the last from %s:%s",
                        self.state.config.server.max_data_connections,
                        self._turned_away,
                        *peer[:2],
                    )
                continue
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._spawn(self._connection, f"cohort-bulk-{peer[0]}:{peer[1]}", raw, f"{peer[0]}:{peer[1]}")

    def _connection(self, raw: socket.socket, peer: str) -> None:
        try:
            raw.settimeout(HANDSHAKE_TIMEOUT_S)
            try:
                sock = self._context.wrap_socket(raw, server_side=True)
            except (OSError, ssl.SSLError) as exc:
                self._handshake_refused(peer, exc)
                return
            with sock:
                self._serve(sock)
        finally:
            raw.close()
            self._slots.release()

    def _serve(self, sock: ssl.SSLSocket) -> None:
        try:
            der = sock.getpeercert(binary_form=True)
            if der is None:
                raise Unauthenticated("no client certificate was presented; connect with the site's certificate")
            ref = ref_from_der(der)
        except RpcError as exc:
            self._reply_refusal(sock, "data channel", exc, "unauthenticated")
            return
        conn = Connection(self, sock, ref)
        with self._lock:
            self._open.add(conn)
        try:
            while not self._closing.is_set():
                sock.settimeout(self._idle_s)
                try:
                    op, body = wire.read_request(sock)
                except wire.FramingError as exc:
                    self._reply_refusal(sock, "data channel", InvalidArgument(str(exc)), ref.name)
                    return
                except (wire.Closed, OSError):
                    return  # the site is done with it, idle past data_idle_timeout_s, or the server is closing
                # A transfer's socket calls give up after the upload idle timeout without progress (a site that
                # stops reading its model or sending its update); GuardedStream bounds the whole upload.
                sock.settimeout(self.state.config.server.upload_idle_timeout_s)
                if not self._call(conn, op, body):
                    return
        finally:
            with self._lock:
                self._open.discard(conn)

    def _call(self, conn: Connection, op: int, body: bytes) -> bool:
        """Serve one request on the event loop; False when the connection cannot carry another."""
        assert self._loop is not None
        serve = self._download if op == wire.DOWNLOAD else self._upload
        future = asyncio.run_coroutine_threadsafe(serve(conn, body), self._loop)
        with self._lock:
            self._calls.add(future)
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            return False  # the server is closing
        finally:
            with self._lock:
                self._calls.discard(future)

    def _handshake_refused(self, peer: str, exc: BaseException) -> None:
        """Logged, counted and audited as gRPC's refused handshakes are (docs/SECURITY.md), marked as this port's."""
        reason = str(getattr(exc, "reason", None) or type(exc).__name__).lower()
        log.warning("data channel: TLS handshake refused: peer=%s reason=%s detail=%r", peer, reason, str(exc)[:200])
        if self._loop is None or self._closing.is_set():
            return

        def record() -> None:
            if self.state.ops is not None:
                self.state.ops.handshake_refused(reason)
            audit_as(
                self.servicer,
                "unauthenticated",
                "tls_handshake_refused",
                True,
                peer=peer,
                reason=reason,
                detail=str(exc)[:300],
                port="data",
            )

        self._loop.call_soon_threadsafe(record)

    def _reply_refusal(self, sock: ssl.SSLSocket, method: str, exc: RpcError, actor: str) -> None:
        """Refuse on a connection thread (before any request reached the loop), then the connection closes."""
        assert self._loop is not None
        code = asyncio.run_coroutine_threadsafe(self._refused(actor, method, exc), self._loop).result()
        with contextlib.suppress(OSError):
            wire.send_reply(sock, code[0], code[1].encode())

    async def _refused(self, actor: str, method: str, exc: BaseException) -> tuple[grpc.StatusCode, str]:
        code, message, _ = refusal(self.servicer, actor, method, exc)
        return code, message

    # -- requests, on the event loop --------------------------------------------------------------------------
    async def _download(self, conn: Connection, body: bytes) -> bool:
        method = "DownloadModel"
        sent = False
        try:
            ref = check_caller(conn.ref, Role.PARTICIPANT, self.state)
            request = _parse(pb.ModelRequest, body)
            with self.state.revocations.watch(ref) as revoked:
                model = handlers.download_model(ref, request, self.state)
                slot = await self.servicer.download_gate.lease(self.servicer.upload_limits.idle_timeout_s)
                try:
                    await conn.io(wire.send_reply, grpc.StatusCode.OK, model.manifest().SerializeToString())
                    sent = True
                    for i, chunk in enumerate(model.chunks()):
                        if revoked.is_set():
                            self.state.revocations.check(ref)
                        await conn.io(wire.send_all, chunk)
                        slot.touch()
                        if i == 0:
                            failpoints.hit("coordinator.model_streaming", round=self.state.model_round())
                finally:
                    slot.release()
            if self.state.ops is not None:
                self.state.ops.model_sent(len(model.data), "data")
            return True
        except Exception as exc:
            if sent:  # inside the raw bytes: no reply can follow; the site sees the connection close
                log.info("%s over the data channel to %s broke off: %s", method, conn.ref.name, exc)
                conn.abort()
                return False
            return await self._refuse(conn, method, exc)

    async def _upload(self, conn: Connection, body: bytes) -> bool:
        method = "UploadUpdate"
        source: _Upload | None = None
        try:
            ref = check_caller(conn.ref, Role.PARTICIPANT, self.state)
            header = _parse(pb.UpdateHeader, body)
            with self.state.revocations.watch(ref) as revoked:
                source = _Upload(conn, header)
                stream = GuardedStream(
                    cast(AsyncIterator[pb.UpdateChunk], source),
                    self.servicer.upload_limits,
                    revoked=revoked,
                    on_revoked=lambda: self.state.revocations.check(ref),
                    gate=self.servicer.upload_gate,
                )
                try:
                    await anext(stream)  # the header
                    reply = await handlers.upload(ref, header, stream, self.state)
                finally:
                    stream.close()
            await conn.io(wire.send_reply, grpc.StatusCode.OK, reply.SerializeToString())
            if self.state.ops is not None:
                self.state.ops.update_received("data")
            return True
        except Exception as exc:
            cut = isinstance(exc, DeadlineExceeded | CertificateRevoked)  # not worth reading the rest of
            if (
                source is not None
                and source.started
                and source.remaining > 0
                and (cut or not await self._drain(conn, source))
            ):
                await self._refused(conn.ref.name, method, exc)
                conn.abort()  # the rest of the bytes may still be coming: the connection cannot be reused
                return False
            return await self._refuse(conn, method, exc)

    async def _drain(self, conn: Connection, source: _Upload) -> bool:
        """Read and drop the rest of a refused upload so its refusal can be read; False if that fails."""
        buf = bytearray(min(CHUNK_BYTES, source.remaining))
        try:
            while source.remaining > 0:
                view = memoryview(buf)[: min(len(buf), source.remaining)]
                await asyncio.wait_for(conn.io(wire.recv_exact, view), self.servicer.upload_limits.idle_timeout_s)
                source.remaining -= len(view)
        except (OSError, wire.Closed, TimeoutError):
            conn.abort()
            return False
        return True

    async def _refuse(self, conn: Connection, method: str, exc: BaseException) -> bool:
        code, message = await self._refused(conn.ref.name, method, exc)
        try:
            await conn.io(wire.send_reply, code, message.encode())
        except OSError:
            return False
        return True


def _parse(cls: type[T], body: bytes) -> T:
    try:
        return cls.FromString(body)  # type: ignore[attr-defined, no-any-return]
    except Exception as exc:  # DecodeError, and anything else the parser raises on hostile bytes
        raise InvalidArgument(
            f"the request is not a valid {cls.DESCRIPTOR.full_name} message ({type(exc).__name__})"  # type: ignore[attr-defined]
        ) from None
