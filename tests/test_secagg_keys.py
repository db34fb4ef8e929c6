"""The SecAgg key helpers' fast paths give the same answers as the plain computation, and their caches never turn a
check into a pass: a remembered certificate or signature is keyed by everything the check depends on, so a forged
signature, another key, another payload, another site name, another CA or another time is checked in full."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import random
from functools import reduce

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from test_secagg_protocol import NOW, Federation, federation, full_params, make_inputs, make_round
from test_secagg_protocol import check_result as check_sum

from common.errors import InvalidArgument
from common.secagg import keys, shamir
from common.secagg.errors import SecAggTampered
from common.secagg.messages import RoundParams


def reference_canonical(*fields: object) -> bytes:
    """The encoding as first written (before the fast paths): type tag, 4-byte length, content, per field."""
    parts: list[bytes] = []
    for field in fields:
        if isinstance(field, str):
            tag, data = b"s", field.encode()
        elif isinstance(field, bytes):
            tag, data = b"b", field
        elif isinstance(field, int) and not isinstance(field, bool) and 0 <= field < 1 << 64:
            tag, data = b"i", field.to_bytes(8, "big")
        else:
            raise InvalidArgument(f"bad field {field!r}")
        parts += (tag, len(data).to_bytes(4, "big"), data)
    return b"".join(parts)


class Name(str):
    """A str subclass: takes the checked path, encodes like a str."""


def test_canonical_matches_the_reference_encoding() -> None:
    rng = random.Random(7)
    for _ in range(300):
        fields: list[str | int | bytes] = []
        for _ in range(rng.randrange(0, 8)):
            kind = rng.randrange(4)
            if kind == 0:
                fields.append("".join(rng.choice("abcé-_0") for _ in range(rng.randrange(0, 12))))
            elif kind == 1:
                fields.append(os.urandom(rng.randrange(0, 70)))
            elif kind == 2:
                fields.append(rng.choice([0, 1, 2**63, 2**64 - 1, rng.randrange(2**64)]))
            else:
                fields.append(Name("site-x"))
        assert keys.canonical(*fields) == reference_canonical(*fields)


@pytest.mark.parametrize("bad", [True, False, -1, 2**64, 1.0, None, bytearray(b"x")])
def test_canonical_still_refuses_what_it_refused(bad: object) -> None:
    with pytest.raises(InvalidArgument):
        keys.canonical("a", bad)  # type: ignore[arg-type]


def test_remembered_prefixes_tell_true_from_one() -> None:
    # The round number 1 is remembered first; True (equal to 1 as a dict key) must still be refused.
    keys.derive(bytes(32), "mask", "job", 1, "a", "b")
    with pytest.raises(InvalidArgument):
        keys.derive(bytes(32), "mask", "job", True, "a", "b")
    with pytest.raises(InvalidArgument):
        keys.share_commitment("job", True, "a", "b", "b", bytes(66))


def test_derive_is_rfc5869_hkdf_sha256() -> None:
    for i in range(50):
        shared = os.urandom(32)
        info = reference_canonical("cohort-secagg-hkdf-v1", "share-enc", "job-x", i, "s01", f"s{i + 2:02d}")
        want = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)
        assert keys.derive(shared, "share-enc", "job-x", i, f"s{i + 2:02d}", "s01") == want


def test_payloads_match_the_reference_encoding() -> None:
    survivors = ["s03", "s01", "s10", "s02"]
    want = reference_canonical("cohort-secagg-survivors-v1", "job", 7, "s01", 4, *sorted(survivors))
    assert keys.survivors_payload("job", 7, "s01", survivors) == want
    listing = keys.survivor_list(tuple(sorted(survivors)))
    assert keys.survivors_digest("job", 7, "s01", listing) == hashlib.sha256(want).digest()
    with pytest.raises(InvalidArgument):
        keys.survivor_list(("s02", "s01"))
    commit = reference_canonical("cohort-secagg-commit-v1", "job", 7, "s01", "s02", "b", b"\x01" * 66)
    assert keys.share_commitment("job", 7, "s01", "s02", "b", b"\x01" * 66) == hashlib.sha256(commit).digest()


# -- remembered signature checks -----------------------------------------------------------------------------------


def forge(signature: bytes) -> bytes:
    """The same DER signature with one bit of its last byte (in s) flipped."""
    return signature[:-1] + bytes([signature[-1] ^ 1])


def test_a_remembered_signature_check_still_rejects_forgeries() -> None:
    fed = federation()
    alice, bob = fed.identity("s01"), fed.identity("s02")
    signer = keys.verify_signer(alice.cert_pem, "s01", fed.cas, NOW)
    payload = keys.advertisement_payload("job", 3, "s01", bytes(32), bytes([1]) * 32)
    signature = keys.sign(alice.key, payload)
    assert signer.valid(signature, payload)
    assert signer.valid(signature, payload)  # now from memory
    assert (signer.point, signature, hashlib.sha256(payload).digest()) in keys.VERIFIED_SIGNATURES._seen
    assert not signer.valid(forge(signature), payload)
    other = keys.advertisement_payload("job", 4, "s01", bytes(32), bytes([1]) * 32)
    assert not signer.valid(signature, other)  # replayed into another round
    bob_signer = keys.verify_signer(bob.cert_pem, "s02", fed.cas, NOW)
    assert not bob_signer.valid(signature, payload)  # another site's key
    assert not signer.valid(keys.sign(bob.key, payload), payload)  # signed by another site
    assert not signer.valid(b"", payload)
    # A fresh check (memory emptied) gives the same answers.
    keys.VERIFIED_SIGNATURES.clear()
    assert signer.valid(signature, payload)
    assert not signer.valid(forge(signature), payload)


def test_the_memory_is_bounded() -> None:
    fed = federation()
    ident = fed.identity("s01")
    signer = keys.verify_signer(ident.cert_pem, "s01", fed.cas, NOW)
    memory = keys._VerifiedSignatures(3)
    payloads = [bytes([i]) * 8 for i in range(5)]
    for p in payloads:
        digest = hashlib.sha256(p).digest()
        assert memory.check(signer.key, signer.point, keys.sign(ident.key, p), digest)
    assert len(memory._seen) == 3


# -- remembered certificate checks ---------------------------------------------------------------------------------


def test_a_remembered_certificate_is_still_checked_for_site_ca_and_time() -> None:
    fed = federation()
    ident = fed.identity("s05")
    signer = keys.verify_signer(ident.cert_pem, "s05", fed.cas, NOW)
    assert keys.verify_signer(ident.cert_pem, "s05", fed.cas, NOW) is signer  # parsed and checked once
    assert keys.verify_site_certificate(ident.cert_pem, "s05", fed.cas, NOW) is signer.key
    with pytest.raises(SecAggTampered, match="belongs to 's05'"):
        keys.verify_signer(ident.cert_pem, "s06", fed.cas, NOW)
    with pytest.raises(SecAggTampered, match="validity period"):
        keys.verify_signer(ident.cert_pem, "s05", fed.cas, NOW + dt.timedelta(days=400))
    with pytest.raises(SecAggTampered, match="validity period"):
        keys.verify_signer(ident.cert_pem, "s05", fed.cas, NOW - dt.timedelta(days=400))
    stranger = Federation("other")
    with pytest.raises(SecAggTampered, match="not issued by the federation CA"):
        keys.verify_signer(ident.cert_pem, "s05", stranger.cas, NOW)
    # The same name under another CA's certificate is another certificate.
    impostor = stranger.identity("s05")
    with pytest.raises(SecAggTampered, match="not issued by the federation CA"):
        keys.verify_signer(impostor.cert_pem, "s05", fed.cas, NOW)
    # A certificate altered by one byte (here in its signature) is other bytes: checked in full, refused.
    body, _, tail = ident.cert_pem.partition(b"-----END")
    lines = body.split(b"\n")
    last = lines[-2]
    lines[-2] = last[:-3] + (b"A" if last[-3:-2] != b"A" else b"B") + last[-2:]
    altered = b"\n".join(lines) + b"-----END" + tail
    with pytest.raises(SecAggTampered):
        keys.verify_signer(altered, "s05", fed.cas, NOW)
    with pytest.raises(SecAggTampered, match="not a PEM certificate"):
        keys.verify_signer(b"not a certificate", "s05", fed.cas, NOW)


def test_expired_certificate_is_refused_even_after_a_valid_one_was_remembered() -> None:
    fed = federation()
    fed.identity("s07")  # a valid certificate for the same site is remembered by other tests' checks
    expired = fed.identity("s07", expired=True)
    with pytest.raises(SecAggTampered, match="validity period"):
        keys.verify_signer(expired.cert_pem, "s07", fed.cas, NOW)


# -- Shamir and positions ------------------------------------------------------------------------------------------


def naive_lagrange(xs: tuple[int, ...]) -> tuple[int, ...]:
    p = shamir.PRIME
    out = []
    for i, xi in enumerate(xs):
        num = reduce(lambda a, b: a * b % p, [xj for j, xj in enumerate(xs) if j != i], 1)
        den = reduce(lambda a, b: a * b % p, [(xj - xi) % p for j, xj in enumerate(xs) if j != i], 1)
        out.append(num * pow(den, -1, p) % p)
    return tuple(out)


def test_lagrange_coefficients_match_the_textbook_formula() -> None:
    rng = random.Random(3)
    for _ in range(30):
        xs = tuple(sorted(rng.sample(range(1, 2000), rng.randrange(1, 60))))
        assert shamir._lagrange_at_zero(xs) == naive_lagrange(xs)


def test_split_and_combine_over_sparse_holder_sets() -> None:
    rng = random.Random(5)
    for _ in range(20):
        secret = os.urandom(32)
        xs = sorted(rng.sample(range(1, 1001), 85))
        shares = shamir.split(secret, 43, xs)
        assert all(0 <= y < shamir.PRIME for y in shares.values())
        picked = dict(rng.sample(sorted(shares.items()), 43))
        assert shamir.combine(picked, 43) == secret


def test_positions_are_one_based_and_refuse_strangers() -> None:
    params = RoundParams("job", 1, ("a1", "b2", "c3"), k=2, t=2, bits=24, dim=4)
    assert [params.x_of(s) for s in params.cohort] == [1, 2, 3]
    with pytest.raises(ValueError, match="not in the cohort"):
        params.x_of("zz")


def test_sparse_round_sums_exactly_with_the_remembered_checks() -> None:
    """A SecAgg+ round (k < n - 1) twice over the same certificates: the second runs on remembered checks."""
    from common.secagg.local import run_local_round

    for round_no in (11, 12):
        params = RoundParams("job-keys", round_no, tuple(f"s{i:02d}" for i in range(40)), k=10, t=6, bits=24, dim=1000)
        server, clients = make_round(params)
        inputs = make_inputs(params.cohort)
        total = run_local_round(server, clients, inputs.encoded)
        check_sum(total, server.survivors, inputs)


def test_full_params_helper_still_builds_rounds() -> None:
    assert full_params(5).k == 4
