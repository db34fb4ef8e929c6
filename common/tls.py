"""Mutual-TLS credentials and peer identity for gRPC.

Identity always comes from the peer's verified certificate (role from the Subject OU, name from the CN), never
from a request field. There is no insecure mode: servers require client certificates.
"""

from __future__ import annotations

import functools
import ssl
from dataclasses import dataclass
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from common.certs import (
    Role,
    TlsFiles,
    check_federation,
    check_tls_files,
    federation_of,
    identity_of,
    load_certificates,
)
from common.errors import CertificateError, ForeignFederation, Unauthenticated

MiB = 1 << 20


def _read(files: TlsFiles) -> tuple[bytes, bytes, bytes]:
    try:
        return files.ca.read_bytes(), files.cert.read_bytes(), files.key.read_bytes()
    except OSError as exc:
        raise CertificateError(f"cannot read {exc.filename}: {exc.strerror}") from exc


def server_credentials(files: TlsFiles, federation: str | None = None) -> grpc.ServerCredentials:
    """Server credentials that require and verify a client certificate from the federation CA.

    With ``federation``, the server's own certificate must name it (O): peers are held to the same rule, so a
    mismatch here would refuse every one of them; better to stop at start-up and say why.
    """
    check_tls_files(files, expect_role=Role.COORDINATOR)
    if federation is not None:
        check_federation(load_certificates(files.cert, "certificate")[0], files.cert, federation)
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


def flow_control_options(window_bytes: int) -> list[tuple[str, Any]]:
    """A fixed HTTP/2 stream window of ``window_bytes`` for what this end receives, instead of BDP probing.

    With BDP probing gRPC grows each connection's window to several MiB, and a receiver that reads more slowly than
    the sender sends buffers up to that window per stream: on a coordinator receiving N uploads at once that is
    memory in proportion to N. A fixed window bounds it; on loopback it moves as fast (bench/federation.py). Over a
    WAN one stream's throughput is at most ``window_bytes`` per round trip (1 MiB at 100 ms: ~10 MB/s).
    """
    return [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", window_bytes)]


def peer_pem(context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    """The caller's certificate (PEM) from the TLS session; the handshake already verified its chain."""
    auth = context.auth_context()
    pems = auth.get("x509_pem_cert") if auth else None
    first = next(iter(pems), None) if pems else None
    if first is None:
        raise Unauthenticated("no client certificate was presented; connect with the site's certificate")
    return bytes(first)


@dataclass(frozen=True)
class CertRef:
    """A caller's verified certificate, read once per call: role and name (OU, CN), the federation it was issued for
    (O), serial number and SHA-256 fingerprint (hex)."""

    role: Role
    name: str
    serial: int
    fingerprint: str
    federation: str | None = None

    @classmethod
    def of(cls, cert: x509.Certificate) -> CertRef:
        identity = identity_of(cert)
        fingerprint = cert.fingerprint(hashes.SHA256()).hex()
        return cls(identity.role, identity.name, cert.serial_number, fingerprint, federation_of(cert))

    def require_federation(self, federation: str) -> None:
        """Refuse (UNAUTHENTICATED) a certificate whose O names another federation.

        The TLS handshake only proves the certificate chains to a CA in ``ca.crt``; a CA bundle may trust several
        federations' CAs (or one CA may serve several), so the federation the certificate was issued for is checked
        too."""
        if self.federation != federation:
            raise ForeignFederation(
                f"the certificate of {self.name!r} was issued for federation {self.federation!r} (its O), but this "
                f"coordinator serves federation {federation!r}; connect with a certificate issued for {federation!r} "
                "(`cohort certs show tls.crt` prints a certificate's federation)"
            )


@functools.lru_cache(maxsize=1024)
def _ref_from_pem(pem: bytes) -> CertRef:
    try:
        return CertRef.of(x509.load_pem_x509_certificate(pem))
    except ValueError as exc:
        raise CertificateError(f"not a PEM certificate: {exc}") from None


def ref_from_der(der: bytes) -> CertRef:
    """The verified peer certificate of a TLS socket (``getpeercert(binary_form=True)``), as for :func:`cert_ref`."""
    return _peer_ref(ssl.DER_cert_to_PEM_cert(der).encode())


def cert_ref(context: grpc.aio.ServicerContext[Any, Any]) -> CertRef:
    """The caller's certificate, from the TLS session (the handshake already verified its chain)."""
    return _peer_ref(peer_pem(context))


def _peer_ref(pem: bytes) -> CertRef:
    try:
        return _ref_from_pem(pem)
    except CertificateError as exc:
        raise Unauthenticated(f"client certificate is not a Cohort certificate: {exc}") from None
