"""The federation CA: create it, issue a certificate to the coordinator, every site and every admin, sign CSRs.

One CA per federation; every leaf certificate carries the identity :mod:`common.certs` reads (Subject ``OU``
the role, ``CN`` the name, ``O`` the federation) and an ECDSA P-256 key. A site can keep its private key at
home with :func:`create_csr` (at the site) and :func:`sign_csr` (at the operator).

Files are written as PEM with :func:`write_pem`: private keys unencrypted PKCS#8 with mode 0600, the rest 0644, into
directories that only their owner may write (created 0700; see :func:`write_pem` for existing ones).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.certs import (
    Role,
    TlsFiles,
    check_key_type,
    check_validity,
    load_certificates,
    load_private_key,
    read_file,
    spki,
    subject_attribute,
    subject_identity,
    validate_name,
)
from common.errors import CertificateError, ConfigError
from common.files import OWNER_FILE, check_not_shared, private_dir, write_atomic

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Clocks at sites may run a little behind the issuer's; a fresh certificate must not be "not yet valid" there.
CLOCK_SKEW = timedelta(minutes=5)
MAX_DAYS = 36500
_HOST_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_HOST_RE = re.compile(rf"{_HOST_LABEL}(?:\.{_HOST_LABEL})*")
COORDINATOR_NAME = "coordinator"
# The coordinator certificate always covers local connections (demo, tests, a proxy on the same host).
DEFAULT_COORDINATOR_NAMES = ("localhost", "127.0.0.1", "::1")


def _check_days(days: int, what: str = "days") -> None:
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= MAX_DAYS:
        raise ConfigError(f"{what}: must be a whole number of days from 1 to {MAX_DAYS}, got {days!r}")


def _check_federation(federation: str) -> None:
    # X.520 caps O at 64 characters; control characters would garble logs and `certs show`.
    if not federation or len(federation) > 64 or not federation.isprintable():
        raise ConfigError(f"federation {federation!r}: use 1-64 printable characters")


def _split_host_names(names: Iterable[str]) -> tuple[list[str], list[IpAddress]]:
    """Sort host names into DNS names and IP addresses, validated and without duplicates."""
    dns: list[str] = []
    ips: list[IpAddress] = []
    for raw in names:
        name = raw.strip().lower()
        try:
            ip = ipaddress.ip_address(name.strip("[]"))
        except ValueError:
            if len(name) > 253 or not _HOST_RE.fullmatch(name):
                raise ConfigError(f"host name {raw!r}: not a valid DNS name or IP address") from None
            if name not in dns:
                dns.append(name)
        else:
            if ip not in ips:
                ips.append(ip)
    return dns, ips


def new_private_key() -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA P-256 private key."""
    return ec.generate_private_key(ec.SECP256R1())


def _subject(federation: str | None, role: Role | None, common_name: str) -> x509.Name:
    attrs = [] if federation is None else [x509.NameAttribute(NameOID.ORGANIZATION_NAME, federation)]
    if role is not None:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role.value))
    return x509.Name([*attrs, x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    # A CA signs certificates (and CRLs); a leaf only signs TLS handshakes (ECDHE, so no key encipherment).
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def create_ca(federation: str = "cohort", days: int = 3650) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A new self-signed federation CA certificate and its private key."""
    _check_federation(federation)
    _check_days(days)
    key = new_private_key()
    subject = _subject(federation, None, f"{federation} federation CA")
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + timedelta(days=days))
        # path_length=0: this CA signs leaf certificates only, never another CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def issue_certificate(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    *,
    name: str,
    role: Role,
    public_key: CertificatePublicKeyTypes,
    not_before: datetime,
    not_after: datetime,
    dns_names: Sequence[str] = (),
    ip_addresses: Sequence[str | IpAddress] = (),
    federation: str = "cohort",
) -> x509.Certificate:
    """Sign a leaf certificate for ``name`` in ``role`` exactly as asked (no capping of the validity)."""
    validate_name(name)
    eku = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if role is Role.COORDINATOR:
        eku.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateBuilder()
        .subject_name(_subject(federation, role, name))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(eku), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
    )
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def write_pem(path: Path, data: bytes, private: bool) -> None:
    """Write ``data`` to ``path`` atomically (:func:`common.files.write_atomic`), 0600 for a key and 0644 otherwise.

    The directory is created owner-only (0700) if missing. An existing one that group or others may write is
    refused: whoever can write there can swap the key, the certificate or ``ca.crt`` (and so choose whom this
    identity trusts), before or after this command, and tightening it now would not undo that. An existing one they
    may only read is tightened to 0700 when it receives a private key (nothing else in it changes); a directory that
    receives only certificates, which are public, is left as it is.
    """
    private_dir(path.parent, "output directory", tighten=private)
    write_atomic(path, data, OWNER_FILE if private else 0o644)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    encoding, fmt = serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8
    return key.private_bytes(encoding, fmt, serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def load_ca(ca_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The CA certificate and key in ``ca_dir`` (``ca.crt``, ``ca.key``), checked to match and be valid."""
    cert_path, key_path = ca_dir / "ca.crt", ca_dir / "ca.key"
    cert = load_certificates(cert_path, "CA certificate")[0]
    key = load_private_key(key_path)
    if spki(key.public_key()) != spki(cert.public_key()):
        raise CertificateError(f"{key_path}: CA key does not match the CA certificate {cert_path}")
    check_validity(cert, cert_path, datetime.now(UTC), "start a new federation with `cohort certs init --force`")
    return cert, key


def _issue_leaf(
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    name: str,
    role: Role,
    public_key: CertificatePublicKeyTypes,
    days: int,
    host_names: Sequence[str],
) -> x509.Certificate:
    """Issue for ``days`` (capped at the CA's expiry, which bounds it anyway) with the SANs the role needs."""
    ca_cert, ca_key = ca
    if role is Role.COORDINATOR:
        host_names = [*DEFAULT_COORDINATOR_NAMES, *host_names]
    dns, ips = _split_host_names(host_names)
    now = datetime.now(UTC)
    not_after = min(now + timedelta(days=days), ca_cert.not_valid_after_utc)
    federation = subject_attribute(ca_cert.subject, NameOID.ORGANIZATION_NAME, "federation (O)")
    return issue_certificate(
        ca_cert,
        ca_key,
        name=name,
        role=role,
        public_key=public_key,
        not_before=now - CLOCK_SKEW,
        not_after=not_after,
        dns_names=dns,
        ip_addresses=ips,
        federation=federation,
    )


def _write_identity(
    directory: Path, ca_cert: x509.Certificate, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> TlsFiles:
    files = TlsFiles.in_dir(directory)
    write_pem(files.key, _key_pem(key), private=True)
    write_pem(files.cert, _cert_pem(cert), private=False)
    write_pem(files.ca, _cert_pem(ca_cert), private=False)
    return files


def _refuse_existing(paths: Iterable[Path], hint: str) -> None:
    for path in paths:
        if path.exists():
            raise CertificateError(f"{path} already exists; {hint}")


def issue_identity(
    ca_dir: Path,
    out_dir: Path,
    name: str,
    role: Role,
    *,
    dns_names: Sequence[str] = (),
    days: int = 365,
    force: bool = False,
) -> TlsFiles:
    """Make a key and certificate for ``name`` with the CA in ``ca_dir``, into ``out_dir``.

    This adds a site or admin to an existing federation. ``dns_names`` may hold DNS names or IP addresses; a
    coordinator certificate also gets the local names. An existing key is only replaced with ``force``.
    """
    validate_name(name)
    _check_days(days)
    _split_host_names(dns_names)  # validate before touching any file
    files = TlsFiles.in_dir(out_dir)
    if not force:
        _refuse_existing([files.key], "pass --force to replace this identity's key and certificate")
    ca = load_ca(ca_dir)
    key = new_private_key()
    cert = _issue_leaf(ca, name, role, key.public_key(), days, dns_names)
    return _write_identity(out_dir, ca[0], cert, key)


def init_federation(
    out_dir: Path,
    *,
    sites: Sequence[str],
    admins: Sequence[str] = ("admin",),
    coordinator_names: Sequence[str] = (),
    federation: str = "cohort",
    days: int = 365,
    ca_days: int = 3650,
    force: bool = False,
) -> dict[str, TlsFiles]:
    """Create a federation CA and certificates for the coordinator, sites and admins under ``out_dir``.

    Layout: ``ca/{ca.crt,ca.key}``, ``coordinator/``, ``sites/<id>/``, ``admins/<name>/``; each identity
    directory holds ``ca.crt``, ``tls.crt`` and ``tls.key`` so it can be handed out alone. Returns the files
    keyed by ``"coordinator"``, ``"site:<id>"`` and ``"admin:<name>"``. The CA lives ``ca_days`` (longer than
    the leaves) so that sites can be added later with :func:`issue_identity` or :func:`sign_csr`. Existing CA
    or key files are replaced only with ``force``, since a new CA invalidates every certificate the old one
    issued; directories of identities not named again are left alone.
    """
    _check_federation(federation)
    _check_days(days)
    _check_days(ca_days, "ca_days")
    for what, names in (("site id", sites), ("admin name", admins)):
        for name in names:
            validate_name(name, what)
        if len(set(names)) != len(names):
            raise ConfigError(f"{what}s must be unique, got {list(names)}")
    _split_host_names(coordinator_names)
    plan = [("coordinator", out_dir / "coordinator", Role.COORDINATOR, COORDINATOR_NAME)]
    plan += [(f"site:{s}", out_dir / "sites" / s, Role.PARTICIPANT, s) for s in sites]
    plan += [(f"admin:{a}", out_dir / "admins" / a, Role.ADMIN, a) for a in admins]
    ca_dir = out_dir / "ca"
    # Before any file is written: no directory on the way may be writable by others (write_pem checks each again).
    for directory in (out_dir, out_dir / "sites", out_dir / "admins", ca_dir, *(d for _, d, _, _ in plan)):
        check_not_shared(directory, "--out")
    if not force:
        _refuse_existing(
            [ca_dir / "ca.key", ca_dir / "ca.crt", *(directory / "tls.key" for _, directory, _, _ in plan)],
            "refusing to replace the federation CA or a key (every certificate the CA issued would "
            f"stop working); add a site with `cohort certs add --ca {ca_dir}`, or pass --force to start "
            "a new federation",
        )
    ca = create_ca(federation, ca_days)
    # The CA directory holds the one key that can mint identities: owner-only, like the key file itself.
    private_dir(ca_dir, "CA directory")
    write_pem(ca_dir / "ca.key", _key_pem(ca[1]), private=True)
    write_pem(ca_dir / "ca.crt", _cert_pem(ca[0]), private=False)
    result: dict[str, TlsFiles] = {}
    for label, directory, role, name in plan:
        key = new_private_key()
        hosts = coordinator_names if role is Role.COORDINATOR else ()
        cert = _issue_leaf(ca, name, role, key.public_key(), days, hosts)
        result[label] = _write_identity(directory, ca[0], cert, key)
    return result


def create_csr(out_dir: Path, name: str, role: Role = Role.PARTICIPANT, *, force: bool = False) -> tuple[Path, Path]:
    """At a site: write a new key ``tls.key`` (0600) and a signing request ``tls.csr`` to ``out_dir``.

    Only the CSR goes to the federation operator; the key never leaves the site. Returns (key path, CSR path).
    """
    validate_name(name)
    key_path, csr_path = out_dir / "tls.key", out_dir / "tls.csr"
    if not force:
        _refuse_existing([key_path], "pass --force to replace it (a certificate issued for it stops working)")
    key = new_private_key()
    # The request proposes only role and name; the operator decides the federation (O) and any SANs.
    builder = x509.CertificateSigningRequestBuilder().subject_name(_subject(None, role, name))
    write_pem(key_path, _key_pem(key), private=True)
    write_pem(csr_path, builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM), private=False)
    return key_path, csr_path


def sign_csr(
    ca_dir: Path,
    csr_path: Path,
    out_path: Path,
    *,
    role: Role = Role.PARTICIPANT,
    days: int = 365,
    dns_names: Sequence[str] = (),
) -> Path:
    """At the operator: issue a certificate for a site's CSR, write it to ``out_path`` and ``ca.crt`` beside.

    The CSR needs a valid signature (proof that the requester holds the key), an ECDSA P-256 key, a valid
    name (CN) and the role asked for (OU). Its extensions are ignored: the operator, not the requester,
    decides what the certificate allows (``dns_names``). Returns ``out_path``.
    """
    _check_days(days)
    _split_host_names(dns_names)
    if out_path.name == "ca.crt":
        raise ConfigError(f"{out_path}: name the certificate otherwise; the CA certificate is written beside it")
    try:
        csr = x509.load_pem_x509_csr(read_file(csr_path, "certificate signing request"))
    except ValueError:
        raise CertificateError(f"{csr_path}: not a PEM certificate signing request") from None
    if not csr.is_signature_valid:
        raise CertificateError(f"{csr_path}: the request's signature is invalid; ask the site for a new CSR")
    public_key = csr.public_key()
    check_key_type(public_key, csr_path)
    try:
        identity = subject_identity(csr.subject)
    except CertificateError as exc:
        raise CertificateError(f"{csr_path}: {exc}") from None
    if identity.role is not role:
        raise CertificateError(
            f"{csr_path}: the request is for {identity.role.with_article()} but {role.with_article()} was asked for"
        )
    ca = load_ca(ca_dir)
    cert = _issue_leaf(ca, identity.name, role, public_key, days, dns_names)
    write_pem(out_path, _cert_pem(cert), private=False)
    write_pem(out_path.parent / "ca.crt", _cert_pem(ca[0]), private=False)
    return out_path
