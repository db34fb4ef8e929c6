"""Mutual-TLS credentials and peer identity for gRPC.

Identity always comes from the peer's verified certificate (role from the Subject OU, name from the CN), never
from a request field. There is no insecure mode: servers require client certificates.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from common.certs import PeerIdentity, Role, TlsFiles, check_tls_files, identity_from_pem, identity_of
from common.errors import CertificateError, PermissionDenied, Unauthenticated
from common.settings import TlsConfig

MiB = 1 << 20


def tls_files(cfg: TlsConfig) -> TlsFiles:
    return TlsFiles(ca=cfg.ca, cert=cfg.cert, key=cfg.key)


def _read(files: TlsFiles) -> tuple[bytes, bytes, bytes]:
    try:
        return files.ca.read_bytes(), files.cert.read_bytes(), files.key.read_bytes()
    except OSError as exc:
        raise CertificateError(f"cannot read {exc.filename}: {exc.strerror}") from exc


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """Server credentials that require and verify a client certificate from the federation CA."""
    check_tls_files(files, expect_role=Role.COORDINATOR)
    ca, cert, key = _read(files)
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)


def channel_credentials(files: TlsFiles, expect_role: Role) -> grpc.ChannelCredentials:
    check_tls_files(files, expect_role=expect_role)
    ca, cert, key = _read(files)
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def keepalive_options(heartbeat_interval_s: float, timeout_s: float | None = None) -> list[tuple[str, Any]]:
    """HTTP/2 keepalive: a ping every ``heartbeat_interval_s``, and the connection is dropped when one is not answered
    within ``timeout_s`` (default: the same time). So a dead or frozen peer (or one behind a NAT that forgot the flow)
    is noticed within interval + timeout. The coordinator pings every half heartbeat interval and waits
    ``server.keepalive_timeout_s`` (two intervals by default): long enough for a loaded site or a lossy WAN link."""
    interval_ms = max(250, int(heartbeat_interval_s * 1000))
    timeout_ms = interval_ms if timeout_s is None else max(250, int(timeout_s * 1000))
    return [
        ("grpc.keepalive_time_ms", interval_ms),
        ("grpc.keepalive_timeout_ms", timeout_ms),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.min_ping_interval_without_data_ms", min(interval_ms, 5000)),
    ]


def message_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]


@functools.lru_cache(maxsize=1024)
def _identity_cached(pem: bytes) -> PeerIdentity:
    return identity_from_pem(pem)


def peer_pem(context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    """The caller's certificate (PEM) from the TLS session; the handshake already verified its chain."""
    auth = context.auth_context()
    pems = auth.get("x509_pem_cert") if auth else None
    first = next(iter(pems), None) if pems else None
    if first is None:
        raise Unauthenticated("no client certificate was presented; connect with the site's certificate")
    return bytes(first)


def peer_identity(context: grpc.aio.ServicerContext[Any, Any]) -> PeerIdentity:
    """The verified identity of the caller. The TLS stack already checked the chain to the federation CA."""
    pem = peer_pem(context)
    try:
        return _identity_cached(pem)
    except CertificateError as exc:
        raise Unauthenticated(f"client certificate is not a Cohort certificate: {exc}") from None


def require_role(context: grpc.aio.ServicerContext[Any, Any], role: Role) -> PeerIdentity:
    identity = peer_identity(context)
    if identity.role is not role:
        raise PermissionDenied(
            f"this call needs a {role.value} certificate; the caller presented a {identity.role.value} "
            f"certificate for {identity.name!r}"
        )
    return identity


@dataclass(frozen=True)
class CertRef:
    """A caller's verified certificate: role and name (OU, CN), serial number and SHA-256 fingerprint (hex)."""

    role: Role
    name: str
    serial: int
    fingerprint: str

    @classmethod
    def of(cls, cert: x509.Certificate) -> CertRef:
        identity = identity_of(cert)
        return cls(identity.role, identity.name, cert.serial_number, cert.fingerprint(hashes.SHA256()).hex())


@functools.lru_cache(maxsize=1024)
def _ref_from_pem(pem: bytes) -> CertRef:
    try:
        return CertRef.of(x509.load_pem_x509_certificate(pem))
    except ValueError as exc:
        raise CertificateError(f"not a PEM certificate: {exc}") from None


def cert_ref(context: grpc.aio.ServicerContext[Any, Any]) -> CertRef:
    """The caller's certificate, from the TLS session (the handshake already verified its chain)."""
    pem = peer_pem(context)
    try:
        return _ref_from_pem(pem)
    except CertificateError as exc:
        raise Unauthenticated(f"client certificate is not a Cohort certificate: {exc}") from None
