"""The site's side of a SecAgg round: a state machine with one method per stage, no I/O and no clock.

Each stage method checks the previous stage ran, and fails closed: any error (tampering, too few neighbours, a bad
argument) moves the client to ``ABORTED``, after which it refuses every call, so a site that saw something wrong
never reveals anything more. The caller (the participant daemon) carries the returned messages over gRPC.
"""

from __future__ import annotations

import enum
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from common.errors import FailedPrecondition, InvalidArgument
from common.secagg import keys, shamir
from common.secagg.encoding import pack
from common.secagg.errors import SecAggAborted, SecAggTampered
from common.secagg.messages import (
    Advertisement,
    EncryptedShare,
    MaskedInput,
    RevealedShare,
    RoundParams,
    ShareCommitment,
    ShareKeys,
    SurvivorSignature,
    Unmask,
)
from common.secagg.prg import Mask, U32Array, apply_masks, check_vector

BUNDLE_LEN = 2 * shamir.SHARE_LEN


class ClientStage(enum.Enum):
    ADVERTISE = "advertise"
    SHARE_KEYS = "share_keys"
    RECEIVE_SHARES = "receive_shares"
    MASKED_INPUT = "masked_input"
    CONSISTENCY = "consistency_check"
    UNMASK = "unmask"
    DONE = "done"
    ABORTED = "aborted"


@dataclass(frozen=True)
class _Peer:
    """A neighbour whose advertisement verified: its keys and certificate signing key."""

    c_pk: bytes
    s_pk: bytes
    signer: keys.Signer


class SecAggClient:
    """One site's state for one round. ``signing_key`` and ``cert_pem`` are the site's certificate key and
    certificate; ``ca_certs`` the federation CA(s) neighbours' certificates must chain to; ``now`` the time at
    which certificates must be valid (injectable; defaults to the time of construction)."""

    def __init__(
        self,
        params: RoundParams,
        site: str,
        signing_key: ec.EllipticCurvePrivateKey,
        cert_pem: bytes,
        ca_certs: Sequence[x509.Certificate],
        *,
        now: datetime | None = None,
    ) -> None:
        if site not in params.cohort:
            raise InvalidArgument(f"site {site!r} is not in this round's cohort")
        self.params, self.site = params, site
        self._signing_key, self._cert_pem, self._cas = signing_key, cert_pem, tuple(ca_certs)
        self._now = now or datetime.now(UTC)
        self.stage = ClientStage.ADVERTISE
        self._c_sk = keys.new_key_pair()
        self._s_sk = keys.new_key_pair()
        self._peers: dict[str, _Peer] = {}  # verified live neighbours (U1 as this site sees it)
        self._enc_keys: dict[str, bytes] = {}
        self._held: dict[str, tuple[bytes, bytes]] = {}  # owner -> (b share, s share) this site holds
        self._u2: frozenset[str] = frozenset()  # neighbours whose shares arrived
        self._u3: frozenset[str] = frozenset()
        self._u3_listing = b""  # keys.survivor_list(sorted U3): encoded once, shared by the sites of the round
        self._b = b""

    def _enter(self, expected: ClientStage) -> None:
        if self.stage is not expected:
            raise FailedPrecondition(
                f"SecAgg client {self.site!r} is at stage {self.stage.value}, not {expected.value}"
            )
        # Fail closed: only a stage that returns normally moves on.
        self.stage = ClientStage.ABORTED

    def advertise(self) -> Advertisement:
        """Stage 0: this round's public keys, signed with the site's certificate key."""
        self._enter(ClientStage.ADVERTISE)
        p = self.params
        c_pk, s_pk = keys.public_bytes(self._c_sk), keys.public_bytes(self._s_sk)
        payload = keys.advertisement_payload(p.job_id, p.round_no, self.site, c_pk, s_pk)
        signature = keys.sign(self._signing_key, payload)
        self.stage = ClientStage.SHARE_KEYS
        return Advertisement(self.site, c_pk, s_pk, signature, self._cert_pem)

    def share_keys(self, advertisements: Sequence[Advertisement]) -> ShareKeys:
        """Stage 1: verify the neighbours' advertisements, then Shamir-share s_sk and a fresh self-mask seed b
        among the live neighbours and this site, one encrypted bundle per neighbour."""
        self._enter(ClientStage.SHARE_KEYS)
        p = self.params
        mine = p.neighbours_of(self.site)
        for ad in advertisements:
            if ad.site not in mine:
                raise SecAggTampered(f"got an advertisement from {ad.site!r}, not a neighbour of {self.site!r}")
            if ad.site in self._peers:
                raise SecAggTampered(f"got two advertisements from {ad.site!r}")
            if len(ad.c_pk) != keys.KEY_LEN or len(ad.s_pk) != keys.KEY_LEN:
                raise SecAggTampered(f"site {ad.site!r} advertised public keys of the wrong length")
            signer = keys.verify_signer(ad.cert_pem, ad.site, self._cas, self._now)
            payload = keys.advertisement_payload(p.job_id, p.round_no, ad.site, ad.c_pk, ad.s_pk)
            if not signer.valid(ad.signature, payload):
                raise SecAggTampered(
                    f"the advertisement of {ad.site!r} has a bad signature: its keys were substituted or altered, "
                    f"or it was replayed from another round or job"
                )
            self._peers[ad.site] = _Peer(ad.c_pk, ad.s_pk, signer)
        live = sorted(self._peers)
        if len(live) + 1 < p.t:
            raise SecAggAborted(
                f"only {len(live)} of the {len(mine)} neighbours of {self.site!r} advertised keys; "
                f"{p.t - 1} are needed for threshold t={p.t}"
            )
        holders = [*live, self.site]
        self._b = secrets.token_bytes(shamir.SECRET_LEN)
        xs = [p.x_of(h) for h in holders]
        b_shares = shamir.split(self._b, p.t, xs)
        s_shares = shamir.split(keys.private_bytes(self._s_sk), p.t, xs)
        shares, commitments = [], []
        for holder, x in zip(holders, xs, strict=True):
            b_share, s_share = shamir.share_to_bytes(b_shares[x]), shamir.share_to_bytes(s_shares[x])
            commitments.append(
                ShareCommitment(
                    holder,
                    keys.share_commitment(p.job_id, p.round_no, self.site, holder, "b", b_share),
                    keys.share_commitment(p.job_id, p.round_no, self.site, holder, "s", s_share),
                )
            )
            if holder == self.site:
                self._held[self.site] = (b_share, s_share)
                continue
            shared = keys.agree(self._c_sk, self._peers[holder].c_pk, holder)
            key = keys.derive(shared, "share-enc", p.job_id, p.round_no, self.site, holder)
            self._enc_keys[holder] = key
            blob = keys.encrypt_bundle(key, b_share + s_share, p.job_id, p.round_no, self.site, holder)
            shares.append(EncryptedShare(self.site, holder, blob))
        self.stage = ClientStage.RECEIVE_SHARES
        return ShareKeys(self.site, tuple(shares), tuple(commitments))

    def receive_shares(self, shares: Sequence[EncryptedShare]) -> None:
        """Stage 1 -> 2: decrypt the bundles neighbours sent this site; their senders form U2 (this site's view)."""
        self._enter(ClientStage.RECEIVE_SHARES)
        p = self.params
        senders: set[str] = set()
        for es in shares:
            if es.receiver != self.site:
                raise SecAggTampered(f"a share bundle addressed to {es.receiver!r} was delivered to {self.site!r}")
            if es.sender not in self._peers:
                raise SecAggTampered(f"{self.site!r} got a share bundle from {es.sender!r}, not a verified neighbour")
            if es.sender in senders:
                raise SecAggTampered(f"{self.site!r} got two share bundles from {es.sender!r}")
            key = self._enc_keys[es.sender]
            plain = keys.decrypt_bundle(key, es.ciphertext, p.job_id, p.round_no, es.sender, es.receiver)
            if len(plain) != BUNDLE_LEN:
                raise SecAggTampered(f"the share bundle from {es.sender!r} has the wrong length")
            b_share, s_share = plain[: shamir.SHARE_LEN], plain[shamir.SHARE_LEN :]
            try:
                shamir.share_from_bytes(b_share)
                shamir.share_from_bytes(s_share)
            except InvalidArgument:
                raise SecAggTampered(f"the share bundle from {es.sender!r} holds no valid shares") from None
            self._held[es.sender] = (b_share, s_share)
            senders.add(es.sender)
        if len(senders) + 1 < p.t:
            raise SecAggAborted(
                f"only {len(senders)} neighbours of {self.site!r} shared keys; {p.t - 1} are needed for t={p.t}"
            )
        self._u2 = frozenset(senders)
        self.stage = ClientStage.MASKED_INPUT

    def masked_input(self, encoded: U32Array, *, in_place: bool = False) -> MaskedInput:
        """Stage 2: y = encoded + PRG(b) + sum over U2 neighbours j of +-PRG(s_ij) mod 2**b, bit-packed.

        ``encoded`` (from :func:`~common.secagg.encoding.encode`) is not modified unless ``in_place``, where the
        masks are added into it (a caller that built the vector for this call saves a copy of it). The pairwise mask
        is added by the site whose id sorts first and subtracted by the other, so each pair cancels in the sum.
        """
        self._enter(ClientStage.MASKED_INPUT)
        p = self.params
        if encoded.shape != (p.dim,):
            raise InvalidArgument(f"the encoded update has shape {encoded.shape}, expected ({p.dim},)")
        y = check_vector(encoded if in_place else np.array(encoded, dtype=np.uint32, order="C"), "encoded update")
        if p.bits < 32 and int(y.max()) >> p.bits:
            raise InvalidArgument(f"the encoded update has values outside the {p.bits}-bit ring")
        masks: list[Mask] = [(self._b, 1)]
        for j in sorted(self._u2):
            shared = keys.agree(self._s_sk, self._peers[j].s_pk, j)
            seed = keys.derive(shared, "mask", p.job_id, p.round_no, self.site, j)
            masks.append((seed, 1 if self.site < j else -1))
        apply_masks(y, masks, p.bits)
        self.stage = ClientStage.CONSISTENCY
        return MaskedInput(self.site, pack(y, p.bits))

    def consistency_check(self, survivors: Sequence[str]) -> SurvivorSignature:
        """Stage 3: check the coordinator's survivor list U3 fits what this site saw, then sign it."""
        self._enter(ClientStage.CONSISTENCY)
        p = self.params
        u3 = frozenset(survivors)
        if len(u3) != len(survivors) or not u3 <= set(p.cohort):
            raise SecAggTampered("the survivor list repeats a site or names a site outside the cohort")
        if self.site not in u3:
            raise SecAggAborted(f"the coordinator did not count the masked input of {self.site!r}")
        stray = (u3 & p.neighbours_of(self.site)) - self._u2
        if stray:
            raise SecAggTampered(
                f"survivors {sorted(stray)} never shared keys with {self.site!r}: the coordinator's views differ"
            )
        alive = len((u3 & self._u2) | {self.site})
        if alive < p.t:
            raise SecAggAborted(f"only {alive} of the share holders of {self.site!r} survived; t={p.t} are needed")
        self._u3 = u3
        self._u3_listing = keys.survivor_list(tuple(sorted(u3)))
        payload = keys.survivors_payload(p.job_id, p.round_no, self.site, sorted(u3))
        self.stage = ClientStage.UNMASK
        return SurvivorSignature(self.site, keys.sign(self._signing_key, payload))

    def unmask(self, signatures: Sequence[SurvivorSignature]) -> Unmask:
        """Stage 4: with >= t holders' valid signatures on the same U3, reveal for each owner whose shares this
        site holds the b-share if the owner survived (in U3), else its s-share; never both."""
        self._enter(ClientStage.UNMASK)
        p = self.params
        signed = {self.site}
        for sig in signatures:
            if sig.site == self.site:
                continue
            peer = self._peers.get(sig.site)
            if peer is None or sig.site in signed or sig.site not in self._u3:
                raise SecAggTampered(f"unexpected or repeated survivor-list signature from {sig.site!r}")
            digest = keys.survivors_digest(p.job_id, p.round_no, sig.site, self._u3_listing)
            if not peer.signer.valid_digest(sig.signature, digest):
                raise SecAggTampered(
                    f"the survivor-list signature of {sig.site!r} does not verify: the coordinator sent different "
                    f"survivor lists to different sites, or altered the signature"
                )
            signed.add(sig.site)
        if len(signed) < p.t:
            raise SecAggAborted(f"only {len(signed)} holders confirmed the survivor list; t={p.t} are needed")
        revealed = []
        for owner in sorted(self._held):
            b_share, s_share = self._held[owner]
            # The survivor list alone decides, once per owner: b if it survived, s if it dropped after sharing.
            revealed.append(
                RevealedShare(owner, "b", b_share) if owner in self._u3 else RevealedShare(owner, "s", s_share)
            )
        self._held.clear()
        self.stage = ClientStage.DONE
        return Unmask(self.site, tuple(revealed))
