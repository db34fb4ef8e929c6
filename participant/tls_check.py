"""A site whose TLS settings do not fit the coordinator: told as a configuration error, after a few tries.

gRPC reports a CA that did not issue the coordinator's certificate, or a server name that certificate does not
carry, as ``UNAVAILABLE`` ("failed to connect to all addresses ... CERTIFICATE_VERIFY_FAILED" or "Hostname
Verification Check failed") — the code of a network outage, which a daemon retries forever. Retrying cannot fix
either; :func:`tls_mismatch` recognises them and :func:`diagnose` fetches the certificate the coordinator presents
(one TLS handshake with the standard library, without verifying it: it is only read, never trusted) to say which
CA file and which names are involved.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from common.certs import TlsFiles
from common.errors import ConfigError
from common.settings import parse_address

# Consecutive connection attempts that failed on the coordinator's certificate before the daemon gives up: a
# coordinator restarting with a new certificate gets a moment, a wrong ca.crt or server name does not loop forever.
MAX_TLS_FAILURES = 3

_TRUST_MARKERS = ("CERTIFICATE_VERIFY_FAILED", "certificate verify failed", "unable to get local issuer")
_NAME_MARKERS = ("Hostname Verification", "Peer name", "hostname mismatch")


def tls_mismatch(details: str) -> str | None:
    """``"trust"`` or ``"name"`` when a failed call's details say the coordinator's certificate was refused."""
    if any(m in details for m in _NAME_MARKERS):
        return "name"
    if any(m in details for m in _TRUST_MARKERS):
        return "trust"
    return None


def presented_certificate(address: str, tls: TlsFiles, timeout_s: float = 5.0) -> x509.Certificate | None:
    """The certificate the server at ``address`` presents (unverified), or None if it cannot be fetched."""
    host, port = parse_address(address, "coordinator.address")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    try:
        context.load_cert_chain(tls.cert, tls.key)
        with (
            socket.create_connection((host, port), timeout=timeout_s) as raw,
            context.wrap_socket(raw, server_hostname=host) as conn,
        ):
            der = conn.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError, ValueError):
        return None
    return x509.load_der_x509_certificate(der) if der else None


def names_of(cert: x509.Certificate) -> list[str]:
    """The DNS names and IP addresses a certificate is valid for."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*san.get_values_for_type(x509.DNSName), *(str(ip) for ip in san.get_values_for_type(x509.IPAddress))]


def _issued_by(cert: x509.Certificate, ca_file: TlsFiles) -> bool:
    try:
        cas = x509.load_pem_x509_certificates(ca_file.ca.read_bytes())
    except (OSError, ValueError):
        return False
    for ca in cas:
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):  # a different issuer, key type or signature
            continue
        return True
    return False


def _fits(name: str, names: list[str]) -> bool:
    try:
        ip = ipaddress.ip_address(name)
    except ValueError:
        return any(n == name or (n.startswith("*.") and name.split(".", 1)[-1] == n[2:]) for n in names)
    return str(ip) in names


def diagnose(address: str, server_name: str, tls: TlsFiles, kind: str, details: str) -> ConfigError:
    """The configuration error for a coordinator whose certificate this site refused, naming the CA file and the
    expected vs presented server name."""
    host, _ = parse_address(address, "coordinator.address")
    expected = server_name or host
    where = "coordinator.server_name" if server_name else "the host of coordinator.address"
    cert = presented_certificate(address, tls)
    if cert is None:
        return ConfigError(
            f"coordinator.address {address}: the coordinator's certificate was refused ({kind}: {details[:200]}); "
            f"check tls.ca ({tls.ca}) and coordinator.server_name (expected name {expected!r})"
        )
    names = names_of(cert)
    presented = ", ".join(names) or "no names"
    if not _issued_by(cert, tls):
        return ConfigError(
            f"tls.ca: the coordinator at {address} presents a certificate issued by {cert.issuer.rfc4514_string()!r}, "
            f"which the CA in {tls.ca} did not issue; use the ca.crt of the coordinator's federation "
            f"(expected server name {expected!r}, presented {presented})"
        )
    if not _fits(expected, names):
        return ConfigError(
            f"coordinator.server_name: expected server name {expected!r} ({where}) but the coordinator at {address} "
            f"presents {presented}; set coordinator.server_name to one of these, or reissue the coordinator's "
            "certificate with `cohort certs init --coordinator-name`"
        )
    return ConfigError(
        f"coordinator.address {address}: the coordinator's certificate was refused ({details[:200]}) although it "
        f"was issued by the CA in {tls.ca} and presents {expected!r}; check that certificate's validity dates"
    )
