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
import hmac
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache

from cryptography import x509
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from common.certs import PeerIdentity, Role, identity_of
from common.errors import CertificateError, InvalidArgument
from common.secagg.errors import SecAggTampered

KEY_LEN = 32
NONCE_LEN = 12
PURPOSES = ("mask", "share-enc")
_ADVERT = "cohort-secagg-advertise-v1"
_SURVIVORS = "cohort-secagg-survivors-v1"
_SHARE_AAD = "cohort-secagg-share-v1"
_COMMIT = "cohort-secagg-commit-v1"
_NO_SALT = bytes(hashlib.sha256().digest_size)


def _field(field: str | int | bytes) -> bytes:
    if isinstance(field, str):
        tag, data = b"s", field.encode()
    elif isinstance(field, bytes):
        tag, data = b"b", field
    elif isinstance(field, int) and not isinstance(field, bool) and 0 <= field < 1 << 64:
        tag, data = b"i", field.to_bytes(8, "big")
    else:
        raise InvalidArgument(f"canonical encoding takes str, bytes and integers 0..2**64-1, got {field!r}")
    return tag + len(data).to_bytes(4, "big") + data


def canonical(*fields: str | int | bytes) -> bytes:
    """Injective encoding of a tuple: per field a type tag, a 4-byte length and the content.

    The encoding of a tuple is the concatenation of its fields' encodings, so a fixed prefix of fields can be
    encoded once (:func:`_prefix`). Plain ``str``, ``bytes`` and ``int`` take a fast path; anything else (a subclass,
    a bool, an out-of-range integer) goes through the full checks of :func:`_field`.
    """
    parts: list[bytes] = []
    for field in fields:
        if type(field) is str:
            parts.append(_str_field(field))
        elif type(field) is bytes:
            parts.append(b"b" + len(field).to_bytes(4, "big") + field)
        elif type(field) is int and 0 <= field < 1 << 64:
            parts.append(b"i\x00\x00\x00\x08" + field.to_bytes(8, "big"))
        else:
            parts.append(_field(field))
    return b"".join(parts)


@lru_cache(maxsize=65536, typed=True)
def _str_field(field: str) -> bytes:
    """:func:`_field` of one ``str`` field, remembered: site names recur in every key, associated data and
    commitment of a round (anything but a ``str`` gets :func:`_field`'s checks and encoding unchanged)."""
    return _field(field)


@lru_cache(maxsize=256, typed=True)  # typed: True and 1 are different keys (canonical refuses a bool)
def _prefix(*fields: str | int) -> bytes:
    """:func:`canonical` of the leading fields that every key, associated data or commitment of a round shares."""
    return canonical(*fields)


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
    """HKDF-SHA256 of ``shared`` for ``purpose`` and the (unordered) pair ``a``, ``b`` in this job and round.

    RFC 5869 with no salt and a 32-byte output, written out with :func:`hmac.digest` (one HMAC to extract, one to
    expand): the same bytes as ``cryptography``'s HKDF (tests/test_secagg_keys.py checks it), at a quarter of the
    cost, which matters when one process derives the keys of 1,000 virtual sites' 84 neighbours each.
    """
    if purpose not in PURPOSES:
        raise InvalidArgument(f"unknown key purpose {purpose!r}")
    lo, hi = sorted((a, b))
    info = _prefix("cohort-secagg-hkdf-v1", purpose, job_id, round_no) + _str_field(lo) + _str_field(hi)
    prk = hmac.digest(_NO_SALT, shared, "sha256")  # extract: the salt defaults to HashLen zero bytes
    return hmac.digest(prk, info + b"\x01", "sha256")  # expand: one block, T(1) = HMAC(PRK, info || 0x01)


def _share_aad(job_id: str, round_no: int, sender: str, receiver: str) -> bytes:
    return _prefix(_SHARE_AAD, job_id, round_no) + _str_field(sender) + _str_field(receiver)


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
    fields = _str_field(owner) + _str_field(holder) + _str_field(kind) + canonical(share)
    return hashlib.sha256(_prefix(_COMMIT, job_id, round_no) + fields).digest()


def advertisement_payload(job_id: str, round_no: int, site: str, c_pk: bytes, s_pk: bytes) -> bytes:
    """What a site signs when it advertises its round keys."""
    return canonical(_ADVERT, job_id, round_no, site, c_pk, s_pk)


@lru_cache(maxsize=16)
def survivor_list(ordered: tuple[str, ...]) -> bytes:
    """The survivor-list part of :func:`survivors_payload`: the count and the sites of ``ordered`` (sorted).

    It is the same for every site of a round, so it is encoded once per distinct list, not once per site and
    signature (at 1,000 sites that was 10**6 field encodings per stage check, per site).
    """
    if list(ordered) != sorted(ordered):
        raise InvalidArgument("the survivor list must be sorted")
    return canonical(len(ordered), *ordered)


def survivors_payload(job_id: str, round_no: int, site: str, survivors: Sequence[str]) -> bytes:
    """What a site signs in the consistency check: the survivor set U3, sorted, with its count."""
    return canonical(_SURVIVORS, job_id, round_no, site) + survivor_list(tuple(sorted(survivors)))


@lru_cache(maxsize=8192)
def survivors_digest(job_id: str, round_no: int, site: str, listing: bytes) -> bytes:
    """SHA-256 of :func:`survivors_payload` with ``listing`` from :func:`survivor_list`: what ECDSA-SHA256 checks.

    Each of a site's k neighbours checks that site's signature on the same list; the payload is hashed once.
    """
    return hashlib.sha256(canonical(_SURVIVORS, job_id, round_no, site) + listing).digest()


def sign(key: ec.EllipticCurvePrivateKey, payload: bytes) -> bytes:
    """ECDSA-SHA256 (DER) with the site's certificate key."""
    return key.sign(payload, ec.ECDSA(hashes.SHA256()))


def signature_valid(public_key: ec.EllipticCurvePublicKey, signature: bytes, payload: bytes) -> bool:
    try:
        public_key.verify(signature, payload, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


class _VerifiedSignatures:
    """The (signer's public key, signature, SHA-256 of the payload) triples that verified, most recent last.

    ECDSA-SHA256 verification is a function of exactly these three values (the payload enters it only through its
    SHA-256 digest), so a triple that verified once verifies again: the check is made once per distinct input. A
    forged or altered signature, another key or another payload is another triple and is checked in full. Only
    successes are kept; the set is bounded (least recently used first out).
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._seen: OrderedDict[tuple[bytes, bytes, bytes], None] = OrderedDict()
        self._lock = threading.Lock()

    def check(self, public_key: ec.EllipticCurvePublicKey, point: bytes, signature: bytes, digest: bytes) -> bool:
        entry = (point, signature, digest)
        with self._lock:
            if entry in self._seen:
                self._seen.move_to_end(entry)
                return True
        try:
            public_key.verify(signature, digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
        except InvalidSignature:
            return False
        with self._lock:
            self._seen[entry] = None
            while len(self._seen) > self._size:
                self._seen.popitem(last=False)
        return True

    def clear(self) -> None:
        with self._lock:
            self._seen.clear()


VERIFIED_SIGNATURES = _VerifiedSignatures(16384)


@dataclass(frozen=True)
class Signer:
    """A site's certificate signing key, checked by :func:`verify_signer`; ``point`` is its encoded public point."""

    key: ec.EllipticCurvePublicKey
    point: bytes

    def valid(self, signature: bytes, payload: bytes) -> bool:
        """Whether ``signature`` is this signer's ECDSA-SHA256 signature over ``payload``."""
        return self.valid_digest(signature, hashlib.sha256(payload).digest())

    def valid_digest(self, signature: bytes, digest: bytes) -> bool:
        """Whether ``signature`` is this signer's ECDSA-SHA256 signature over the payload whose SHA-256 is
        ``digest`` (checked once per distinct key, signature and digest: :data:`VERIFIED_SIGNATURES`)."""
        return VERIFIED_SIGNATURES.check(self.key, self.point, signature, digest)


@dataclass(frozen=True)
class _CertificateFacts:
    """What a certificate says, independent of the time it is checked at: either why it is refused outright (not
    PEM, not issued by a federation CA), or its and its issuer's validity periods, its identity (or why it has
    none) and its key (None: not ECDSA P-256)."""

    refused: str = ""
    periods: tuple[tuple[datetime, datetime, str], ...] = ()
    identity: PeerIdentity | None = None
    identity_error: str = ""
    signer: Signer | None = None


@lru_cache(maxsize=8192)
def _certificate_facts(cert_pem: bytes, cas: tuple[x509.Certificate, ...]) -> _CertificateFacts:
    """Parse ``cert_pem`` and check its issuer signature once per distinct certificate bytes and CA list: a site's
    certificate is checked by each of its k neighbours, and again every round, with the same answer."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except (ValueError, x509.InvalidVersion):  # InvalidVersion (a version field other than v1/v3) is no ValueError
        return _CertificateFacts(refused="is not a PEM certificate")
    issuer = None
    for ca in cas:
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            continue
        issuer = ca
        break
    if issuer is None:
        return _CertificateFacts(refused="was not issued by the federation CA")
    periods = tuple(
        (c.not_valid_before_utc, c.not_valid_after_utc, what)
        for c, what in ((cert, "certificate"), (issuer, "CA certificate"))
    )
    try:
        identity = identity_of(cert)
    except CertificateError as exc:
        return _CertificateFacts(periods=periods, identity_error=str(exc))
    key = cert.public_key()
    signer = None
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        point = key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
        signer = Signer(key, point)
    return _CertificateFacts(periods=periods, identity=identity, signer=signer)


def verify_signer(cert_pem: bytes, site: str, cas: Sequence[x509.Certificate], at: datetime) -> Signer:
    """:func:`verify_site_certificate`, returning the key as a :class:`Signer` (whose checks are remembered)."""

    def fail(why: str) -> SecAggTampered:
        return SecAggTampered(f"the certificate presented for site {site!r} {why}")

    facts = _certificate_facts(bytes(cert_pem), tuple(cas))
    if facts.refused:
        raise fail(facts.refused)
    for not_before, not_after, what in facts.periods:
        if not not_before <= at <= not_after:
            raise fail(f"is outside its {what}'s validity period")
    identity = facts.identity
    if identity is None:
        raise fail(f"is not a Cohort certificate ({facts.identity_error})")
    if identity.role is not Role.PARTICIPANT:
        raise fail(f"is {identity.role.with_article()} certificate, not a participant certificate")
    if identity.name != site:
        raise fail(f"belongs to {identity.name!r}")
    if facts.signer is None:
        raise fail("does not hold an ECDSA P-256 key")
    return facts.signer


def verify_site_certificate(
    cert_pem: bytes, site: str, cas: Sequence[x509.Certificate], at: datetime
) -> ec.EllipticCurvePublicKey:
    """The signing key of ``site``'s certificate, after checking it is a participant certificate for ``site``
    issued by one of the federation ``cas`` and valid at ``at``; otherwise :class:`SecAggTampered`.

    The parsing and the issuer's signature are checked once per distinct certificate bytes and CA list (they do not
    depend on ``at``); the validity period, the role and the name are checked on every call."""
    return verify_signer(cert_pem, site, cas, at).key
