"""Key agreement, key derivation, share encryption and the signatures that bind keys to certified sites.

* **X25519**, a fresh pair of key pairs per site and round: ``c`` keys encrypt the shares routed through the
  coordinator, ``s`` keys seed the pairwise masks. Fresh keys mean a leaked key exposes one round at most, and the
  mask-key private key can be Shamir-shared without exposing anything long-lived.
* **HKDF-SHA256** turns each X25519 shared secret into a key whose ``info`` is the canonical encoding of
  (purpose, job, round, the pair of site ids in sorted order). No derived key is reused across rounds, jobs, pairs
  or purposes ("mask": 32-byte pairwise mask seed; "share-enc": AES-256-GCM key), even if a key pair were.
* **AES-256-GCM** encrypts one share bundle per (owner, holder) with a random 96-bit nonce (one message per key, so
  nonce reuse cannot happen) and associated data (job, round, sender, receiver): a bundle replayed from another round
  or job, or delivered to another site, fails authentication.
* **ECDSA P-256 signatures** with the site's certificate key over (job, round, site, c_pk, s_pk) stop the
  coordinator from substituting keys (a man in the middle between sites) and from replaying old advertisements; a
  signature over (job, round, site, sorted survivors) makes the consistency check possible. The certificate must
  chain to the federation CA, be a participant certificate, and name the claimed site in its CN.

:func:`canonical` is the one byte encoding of every signed, hashed or authenticated tuple: each field is tagged with
its type and length-prefixed, so no two different tuples encode alike.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from common.certs import Role, identity_of
from common.errors import CertificateError, InvalidArgument
from common.secagg.errors import SecAggTampered

KEY_LEN = 32
NONCE_LEN = 12
PURPOSES = ("mask", "share-enc")
_ADVERT = "cohort-secagg-advertise-v1"
_SURVIVORS = "cohort-secagg-survivors-v1"
_SHARE_AAD = "cohort-secagg-share-v1"
_COMMIT = "cohort-secagg-commit-v1"


def canonical(*fields: str | int | bytes) -> bytes:
    """Injective encoding of a tuple: per field a type tag, a 4-byte length and the content."""
    parts: list[bytes] = []
    for field in fields:
        if isinstance(field, str):
            tag, data = b"s", field.encode()
        elif isinstance(field, bytes):
            tag, data = b"b", field
        elif isinstance(field, int) and not isinstance(field, bool) and 0 <= field < 1 << 64:
            tag, data = b"i", field.to_bytes(8, "big")
        else:
            raise InvalidArgument(f"canonical encoding takes str, bytes and integers 0..2**64-1, got {field!r}")
        parts += (tag, len(data).to_bytes(4, "big"), data)
    return b"".join(parts)


def new_key_pair() -> x25519.X25519PrivateKey:
    """A fresh X25519 private key (one per purpose, site and round)."""
    return x25519.X25519PrivateKey.generate()


def public_bytes(key: x25519.X25519PrivateKey) -> bytes:
    """The 32-byte raw public key."""
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def private_bytes(key: x25519.X25519PrivateKey) -> bytes:
    """The 32-byte raw private key (what gets Shamir-shared)."""
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def load_private(data: bytes) -> x25519.X25519PrivateKey:
    """Parse a raw X25519 private key (any 32 bytes are one, after clamping)."""
    if len(data) != KEY_LEN:
        raise InvalidArgument(f"X25519 private keys are {KEY_LEN} bytes, got {len(data)}")
    return x25519.X25519PrivateKey.from_private_bytes(data)


def agree(key: x25519.X25519PrivateKey, peer_public: bytes, peer: str) -> bytes:
    """The X25519 shared secret with ``peer``; a malformed or low-order public key raises :class:`SecAggTampered`."""
    try:
        return key.exchange(x25519.X25519PublicKey.from_public_bytes(peer_public))
    except ValueError:
        raise SecAggTampered(f"site {peer!r} advertised an invalid X25519 public key") from None


def derive(shared: bytes, purpose: str, job_id: str, round_no: int, a: str, b: str) -> bytes:
    """HKDF-SHA256 of ``shared`` for ``purpose`` and the (unordered) pair ``a``, ``b`` in this job and round."""
    if purpose not in PURPOSES:
        raise InvalidArgument(f"unknown key purpose {purpose!r}")
    lo, hi = sorted((a, b))
    info = canonical("cohort-secagg-hkdf-v1", purpose, job_id, round_no, lo, hi)
    return HKDF(algorithm=hashes.SHA256(), length=KEY_LEN, salt=None, info=info).derive(shared)


def _share_aad(job_id: str, round_no: int, sender: str, receiver: str) -> bytes:
    return canonical(_SHARE_AAD, job_id, round_no, sender, receiver)


def encrypt_bundle(key: bytes, plaintext: bytes, job_id: str, round_no: int, sender: str, receiver: str) -> bytes:
    """AES-GCM with a random 96-bit nonce; returns nonce || ciphertext || tag."""
    nonce = os.urandom(NONCE_LEN)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, _share_aad(job_id, round_no, sender, receiver))


def decrypt_bundle(key: bytes, blob: bytes, job_id: str, round_no: int, sender: str, receiver: str) -> bytes:
    """Inverse of :func:`encrypt_bundle`; any mismatch raises :class:`SecAggTampered` naming the sender."""
    try:
        return AESGCM(key).decrypt(blob[:NONCE_LEN], blob[NONCE_LEN:], _share_aad(job_id, round_no, sender, receiver))
    except (InvalidTag, ValueError):
        raise SecAggTampered(
            f"the share bundle from {sender!r} to {receiver!r} failed authentication: it was tampered with, "
            f"replayed from another round or job, or addressed to another site"
        ) from None


def share_commitment(job_id: str, round_no: int, owner: str, holder: str, kind: str, share: bytes) -> bytes:
    """SHA-256 commitment to one share, so the coordinator can tell a holder's forged share from a real one.

    Shares are 521-bit field elements with at least 256 bits of entropy even given t-1 other shares, so the hash
    hides them.
    """
    return hashlib.sha256(canonical(_COMMIT, job_id, round_no, owner, holder, kind, share)).digest()


def advertisement_payload(job_id: str, round_no: int, site: str, c_pk: bytes, s_pk: bytes) -> bytes:
    """What a site signs when it advertises its round keys."""
    return canonical(_ADVERT, job_id, round_no, site, c_pk, s_pk)


def survivors_payload(job_id: str, round_no: int, site: str, survivors: Sequence[str]) -> bytes:
    """What a site signs in the consistency check: the survivor set U3, sorted, with its count."""
    return canonical(_SURVIVORS, job_id, round_no, site, len(survivors), *sorted(survivors))


def sign(key: ec.EllipticCurvePrivateKey, payload: bytes) -> bytes:
    """ECDSA-SHA256 (DER) with the site's certificate key."""
    return key.sign(payload, ec.ECDSA(hashes.SHA256()))


def signature_valid(public_key: ec.EllipticCurvePublicKey, signature: bytes, payload: bytes) -> bool:
    try:
        public_key.verify(signature, payload, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def verify_site_certificate(
    cert_pem: bytes, site: str, cas: Sequence[x509.Certificate], at: datetime
) -> ec.EllipticCurvePublicKey:
    """The signing key of ``site``'s certificate, after checking it is a participant certificate for ``site``
    issued by one of the federation ``cas`` and valid at ``at``; otherwise :class:`SecAggTampered`."""

    def fail(why: str) -> SecAggTampered:
        return SecAggTampered(f"the certificate presented for site {site!r} {why}")

    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except (ValueError, x509.InvalidVersion):  # InvalidVersion (a version field other than v1/v3) is no ValueError
        raise fail("is not a PEM certificate") from None
    issuer = None
    for ca in cas:
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            continue
        issuer = ca
        break
    if issuer is None:
        raise fail("was not issued by the federation CA")
    for c, what in ((cert, "certificate"), (issuer, "CA certificate")):
        if not c.not_valid_before_utc <= at <= c.not_valid_after_utc:
            raise fail(f"is outside its {what}'s validity period")
    try:
        identity = identity_of(cert)
    except CertificateError as exc:
        raise fail(f"is not a Cohort certificate ({exc})") from None
    if identity.role is not Role.PARTICIPANT:
        raise fail(f"is {identity.role.with_article()} certificate, not a participant certificate")
    if identity.name != site:
        raise fail(f"belongs to {identity.name!r}")
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise fail("does not hold an ECDSA P-256 key")
    return key
