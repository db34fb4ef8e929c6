"""Federation identities: who a certificate says its holder is, and the start-up check of one identity's files.

A certificate says who holds it: Subject ``OU`` is the :class:`Role`, ``CN`` the name (site id, admin name
or ``coordinator``), ``O`` the federation. The gRPC layer takes a peer's identity only from its verified
certificate. Every key is ECDSA P-256: fast, fine for TLS 1.3, and the one key type participants also use to
sign their secure-aggregation public keys, so verifiers need handle only one. The CA that issues these
certificates, and the tools that make them, are in :mod:`common.ca`.

Files are PEM. Private keys are unencrypted PKCS#8 with mode 0600: daemons start unattended, so, as with SSH
host keys, file permissions protect them.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import NameOID

from common.errors import CertificateError, ConfigError
from common.names import RULE, is_name

log = logging.getLogger(__name__)


class Role(enum.StrEnum):
    """What a certificate's holder may do; stored in the certificate's Subject OU."""

    PARTICIPANT = "participant"
    ADMIN = "admin"
    COORDINATOR = "coordinator"

    def with_article(self) -> str:
        """``"a participant"``, ``"an admin"``, ``"a coordinator"``: for messages."""
        return f"{'an' if self.value[0] in 'aeiou' else 'a'} {self.value}"


@dataclass(frozen=True)
class PeerIdentity:
    """Who a certificate belongs to. ``name`` is the site id, admin name or ``coordinator``."""

    role: Role
    name: str


@dataclass(frozen=True)
class TlsFiles:
    """The three files of one identity: the federation CA certificate, its own certificate and private key."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def in_dir(cls, directory: Path) -> TlsFiles:
        """The standard file names inside one identity directory."""
        return cls(ca=directory / "ca.crt", cert=directory / "tls.crt", key=directory / "tls.key")


def validate_name(name: str, what: str = "name") -> str:
    """Return ``name`` if it is a valid site id or admin name, else raise :class:`ConfigError`."""
    if not is_name(name):
        raise ConfigError(f"{what} {name!r}: use {RULE}")
    return name


def spki(key: CertificatePublicKeyTypes) -> bytes:
    """The DER SubjectPublicKeyInfo of ``key``: equal for a certificate and the private key that belongs to it."""
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 fingerprint of the DER certificate as colon-separated upper-case hex, as openssl shows it."""
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def subject_attribute(name: x509.Name, oid: x509.ObjectIdentifier, label: str) -> str:
    """The one value of ``oid`` in ``name``; :class:`CertificateError` naming ``label`` if there is not exactly one."""
    values = name.get_attributes_for_oid(oid)
    if len(values) != 1 or not isinstance(values[0].value, str):
        raise CertificateError(f"subject must have exactly one {label}, found {len(values)}")
    return values[0].value


def subject_identity(subject: x509.Name) -> PeerIdentity:
    """The role (OU) and name (CN) in a certificate's or a signing request's subject, both checked."""
    ou = subject_attribute(subject, NameOID.ORGANIZATIONAL_UNIT_NAME, "role (OU)")
    if ou not in {r.value for r in Role}:
        raise CertificateError(f"role (OU) {ou!r} is not one of {', '.join(Role)}")
    name = subject_attribute(subject, NameOID.COMMON_NAME, "name (CN)")
    if not is_name(name):
        raise CertificateError(f"name (CN) {name!r} is not a valid Cohort name")
    return PeerIdentity(role=Role(ou), name=name)


def federation_of(cert: x509.Certificate) -> str | None:
    """The federation a certificate was issued for (Subject ``O``), or None when it names none or several."""
    values = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    return values[0].value if len(values) == 1 and isinstance(values[0].value, str) else None


def check_federation(cert: x509.Certificate, path: Path, federation: str) -> None:
    """Raise :class:`CertificateError` unless ``cert`` (read from ``path``) names ``federation`` in its O."""
    named = federation_of(cert)
    if named != federation:
        raise CertificateError(
            f"{path}: this certificate is for federation {named!r} (its O), but federation.name is {federation!r}; "
            f"set federation.name to the federation of its CA, or use a certificate issued for {federation!r}"
        )


def identity_of(cert: x509.Certificate) -> PeerIdentity:
    """The role (Subject OU) and name (Subject CN) of a Cohort certificate."""
    return subject_identity(cert.subject)


def identity_from_pem(pem: bytes) -> PeerIdentity:
    """The identity in a PEM certificate; :class:`CertificateError` if it is not a Cohort leaf certificate."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except (ValueError, x509.InvalidVersion) as exc:  # InvalidVersion (not v1/v3) is no ValueError
        raise CertificateError(f"not a PEM certificate: {exc}") from None
    return identity_of(cert)


def read_file(path: Path, what: str) -> bytes:
    """The bytes of ``path``; :class:`CertificateError` saying what to do if it is missing or unreadable."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CertificateError(f"{path}: {what} not found; fix the path or create it with `cohort certs`") from None
    except OSError as exc:
        msg = f"{path}: cannot read {what} ({exc.strerror}); make it readable by the user running Cohort"
        raise CertificateError(msg) from None


def load_certificates(path: Path, what: str) -> list[x509.Certificate]:
    """The PEM certificates in ``path`` (``what`` names the file in errors), at least one."""
    try:
        return x509.load_pem_x509_certificates(read_file(path, what))
    except ValueError:
        msg = f"{path}: {what} is not PEM (expected '-----BEGIN CERTIFICATE-----')"
        raise CertificateError(msg) from None


def check_key_type(key: object, path: Path) -> None:
    """Raise :class:`CertificateError` unless ``key`` (from ``path``) is an ECDSA P-256 public key."""
    # One key type everywhere: participants sign SecAgg keys with it, and verifiers expect ECDSA P-256.
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise CertificateError(f"{path}: Cohort keys are ECDSA P-256; create one with `cohort certs`")


def load_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """The unencrypted ECDSA P-256 private key in the PEM file ``path``."""
    data = read_file(path, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        msg = f"{path}: private key is encrypted; Cohort needs an unencrypted PKCS#8 key protected by mode 0600"
        raise CertificateError(msg) from None
    except ValueError:
        raise CertificateError(f"{path}: not a PEM private key (expected '-----BEGIN PRIVATE KEY-----')") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateError(f"{path}: Cohort keys are ECDSA P-256; create one with `cohort certs`")
    check_key_type(key.public_key(), path)
    return key


def check_validity(cert: x509.Certificate, path: Path, now: datetime, renew: str) -> None:
    """Raise :class:`CertificateError` unless ``cert`` is valid ``now``; ``renew`` says what to do if expired."""
    if now < cert.not_valid_before_utc:
        when = f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
        raise CertificateError(f"{path}: certificate is not valid before {when}; check this machine's clock")
    if now > cert.not_valid_after_utc:
        raise CertificateError(f"{path}: certificate expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; {renew}")


def _issuer(cert: x509.Certificate, cas: Sequence[x509.Certificate]) -> x509.Certificate | None:
    for ca in cas:
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return ca
    return None


def check_tls_files(files: TlsFiles, *, expect_role: Role | None = None, now: datetime | None = None) -> PeerIdentity:
    """Start-up check of one identity's files; returns the identity in the certificate.

    All three files must be readable PEM; the CA and the certificate valid ``now``; the certificate issued by
    (a CA in) ``files.ca``; the key the certificate's; the role ``expect_role`` if given. Each failure raises
    :class:`CertificateError` naming the file and what to do, instead of a TLS handshake error later.
    """
    now = now or datetime.now(UTC)
    cas = load_certificates(files.ca, "CA certificate")
    cert = load_certificates(files.cert, "certificate")[0]
    key = load_private_key(files.key)
    check_validity(cert, files.cert, now, "ask the federation operator for a new one")
    issuer = _issuer(cert, cas)
    if issuer is None:
        raise CertificateError(
            f"{files.cert}: not issued by the federation CA in {files.ca}; "
            "use the ca.crt that came with this certificate, or get one from this federation's operator"
        )
    # Only the issuing CA must be valid: during a CA change, ca.crt may still list an expired old CA.
    check_validity(issuer, files.ca, now, "the federation needs a new CA and new certificates")
    if spki(key.public_key()) != spki(cert.public_key()):
        raise CertificateError(
            f"{files.key}: private key does not match the certificate {files.cert}; "
            "use the tls.key that was created together with it"
        )
    try:
        identity = identity_of(cert)
    except CertificateError as exc:
        raise CertificateError(f"{files.cert}: {exc}") from None
    if expect_role is not None and identity.role is not expect_role:
        raise CertificateError(
            f"{files.cert}: this is {identity.role.with_article()} certificate for {identity.name!r}, "
            f"but this process needs {expect_role.with_article()} certificate"
        )
    # Only a warning: Kubernetes mounts secrets 0644 unless told otherwise; refusing to start would not help.
    if files.key.stat().st_mode & 0o077:
        log.warning("%s: private key is readable by group or others; chmod 600 it", files.key)
    return identity
