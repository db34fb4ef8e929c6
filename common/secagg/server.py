"""The coordinator's side of a SecAgg round: collect, route, fold, unmask. No I/O, no clock.

The caller drives it: ``receive_*`` for each message as it arrives (``sender`` is the site id from the peer's
verified certificate, never a request field), ``close_*`` when a stage's deadline passes or everyone answered, and
``*_for(site)`` for what to send each site next. The coordinator never sees a share in the clear before stage 4 and
never holds more than one running sum of d values plus the messages of the small stages: O(d + n*k), not O(n*d).

Sets, as in Bonawitz et al.: U1 advertised keys, U2 shared keys, U3 sent a masked input, U4 signed the survivor
list, U5 sent unmasking shares. Closing a stage first drops sites that can no longer be helped (too few holders
left), then checks that every secret the result needs still has >= t holders that may answer; if not, the round is
aborted there and then with :class:`SecAggAborted` naming the site, never later with a wrong sum.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

import numpy as np
from cryptography import x509

from common.errors import AlreadyExists, FailedPrecondition, InvalidArgument, PermissionDenied
from common.secagg import keys, shamir
from common.secagg.encoding import Unpacker, packed_len
from common.secagg.errors import SecAggAborted, SecAggTampered
from common.secagg.messages import (
    Advertisement,
    EncryptedShare,
    MaskedInput,
    RoundParams,
    ShareCommitment,
    ShareKeys,
    SurvivorSignature,
    Unmask,
)
from common.secagg.prg import Mask, U32Array, apply_masks

_T = TypeVar("_T")


class ServerStage(enum.Enum):
    ADVERTISE = "advertise"
    SHARE_KEYS = "share_keys"
    MASKED_INPUT = "masked_input"
    CONSISTENCY = "consistency_check"
    UNMASK = "unmask"
    DONE = "done"
    ABORTED = "aborted"


@dataclass(frozen=True)
class RejectedShare:
    """A revealed share that did not match its owner's commitment: evidence against ``holder``."""

    holder: str
    owner: str
    kind: str


class SecAggServer:
    """The coordinator's state for one round; ``ca_certs`` and ``now`` verify the sites' advertisements."""

    def __init__(self, params: RoundParams, ca_certs: Sequence[x509.Certificate], *, now: datetime | None = None):
        self.params = params
        self._cas, self._now = tuple(ca_certs), now or datetime.now(UTC)
        self.stage = ServerStage.ADVERTISE
        self.abort_reason = ""
        self._ads: dict[str, Advertisement] = {}
        self._signers: dict[str, keys.Signer] = {}
        self._share_keys: dict[str, ShareKeys] = {}
        self._inbox: dict[str, list[EncryptedShare]] = {}
        self._commitments: dict[tuple[str, str], ShareCommitment] = {}  # (owner, holder) -> commitment
        self._masked: dict[str, bytes] = {}  # site -> SHA-256 of its masked input, for idempotent retries
        self._sum: U32Array = np.zeros(params.dim, dtype=np.uint32)
        self._sigs: dict[str, SurvivorSignature] = {}
        self._unmasks: dict[str, Unmask] = {}
        self._shares: dict[tuple[str, str], dict[int, int]] = {}  # (owner, kind) -> {x of holder: share}
        self.rejected: list[RejectedShare] = []
        self.u1: frozenset[str] = frozenset()
        self.u2: frozenset[str] = frozenset()
        self.u3: frozenset[str] = frozenset()
        self.u4: frozenset[str] = frozenset()
        self._u3_listing = b""  # keys.survivor_list(sorted U3), encoded once when U3 is fixed
        self._u2_holders: dict[str, frozenset[str]] = {}  # owner in U2 -> its holders in U2, fixed with U2

    # -- helpers -------------------------------------------------------------------------------------------------

    def _expect(self, stage: ServerStage, sender: str | None = None, members: frozenset[str] | None = None) -> None:
        if self.stage is ServerStage.ABORTED:
            # Whatever comes after an abort belongs to a round that cannot finish: the caller must see the abort
            # (and fail the round), not a stage mismatch it would take for a programming error.
            raise SecAggAborted(f"secure aggregation round {self.params.round_no} was aborted: {self.abort_reason}")
        if self.stage is not stage:
            raise FailedPrecondition(f"the SecAgg round is at stage {self.stage.value}, not {stage.value}")
        if sender is not None and sender not in (members if members is not None else self.params.cohort):
            raise PermissionDenied(f"site {sender!r} is not taking part in this SecAgg stage")

    @staticmethod
    def _record(store: dict[str, _T], sender: str, value: _T) -> bool:
        """Store ``value`` once per sender; True if new. A retry with the same value is a no-op."""
        if sender in store:
            if store[sender] != value:
                raise AlreadyExists(f"site {sender!r} already sent a different message for this stage")
            return False
        store[sender] = value
        return True

    def _holders(self, owner: str, alive: frozenset[str]) -> frozenset[str]:
        """Who holds shares of ``owner``'s secrets and is in ``alive``: live neighbours in U2, and itself."""
        return (self.params.neighbours_of(owner) & self.u2 | {owner}) & alive

    def _prune(self, members: frozenset[str], counted: frozenset[str]) -> frozenset[str]:
        """Drop, until none is left, members with fewer than t - 1 neighbours in the set (they would abort)."""
        t = self.params.t
        while True:
            keep = frozenset(s for s in members if len(self.params.neighbours_of(s) & members & counted) + 1 >= t)
            if keep == members:
                return keep
            members = keep

    def _needed(self) -> list[tuple[str, str]]:
        """The (owner, kind) secrets the result needs: b of each survivor, s of each dropout with a survivor
        neighbour (its pairwise masks are in the survivors' inputs)."""
        needs = [(j, "b") for j in sorted(self.u3)]
        needs += [(d, "s") for d in sorted(self.u2 - self.u3) if self.params.neighbours_of(d) & self.u3]
        return needs

    def _check_recoverable(self, alive: frozenset[str], when: str) -> None:
        for owner, kind in self._needed():
            have = len(self._holders(owner, alive) - ({owner} if kind == "s" else set()))
            if have < self.params.t:
                self._abort(
                    f"{when}, only {have} holders of the {'self-mask seed' if kind == 'b' else 'mask key'} of "
                    f"{owner!r} remain; t={self.params.t} are needed"
                )

    def _abort(self, why: str) -> None:
        self.stage, self.abort_reason = ServerStage.ABORTED, why
        raise SecAggAborted(f"secure aggregation round {self.params.round_no} aborted: {why}")

    # -- stage 0: advertise ----------------------------------------------------------------------------------------

    def receive_advertisement(self, sender: str, ad: Advertisement) -> None:
        """Verify (certificate, CN, signature over job and round) and keep a site's advertisement."""
        self._expect(ServerStage.ADVERTISE, sender)
        p = self.params
        if ad.site != sender:
            raise PermissionDenied(f"site {sender!r} sent an advertisement for {ad.site!r}")
        try:
            signer = keys.verify_signer(ad.cert_pem, sender, self._cas, self._now)
        except SecAggTampered as exc:
            raise InvalidArgument(str(exc)) from None
        payload = keys.advertisement_payload(p.job_id, p.round_no, sender, ad.c_pk, ad.s_pk)
        if len(ad.c_pk) != keys.KEY_LEN or len(ad.s_pk) != keys.KEY_LEN:
            raise InvalidArgument("advertised X25519 public keys must be 32 bytes each")
        if not signer.valid(ad.signature, payload):
            raise InvalidArgument(f"the advertisement of {sender!r} is not signed for this job and round")
        if self._record(self._ads, sender, ad):
            self._signers[sender] = signer

    def close_advertise(self) -> frozenset[str]:
        """End stage 0; returns U1 (sites with enough advertised neighbours to go on)."""
        self._expect(ServerStage.ADVERTISE)
        self.u1 = self._prune(frozenset(self._ads), frozenset(self._ads))
        if not self.u1:
            self._abort(f"too few sites advertised keys ({len(self._ads)} of {self.params.n})")
        self.stage = ServerStage.SHARE_KEYS
        return self.u1

    def advertisements_for(self, site: str) -> tuple[Advertisement, ...]:
        """What ``site`` needs for stage 1: the advertisements of its neighbours in U1."""
        self._expect(ServerStage.SHARE_KEYS, site, self.u1)
        return tuple(self._ads[j] for j in sorted(self.params.neighbours_of(site) & self.u1))

    # -- stage 1: share keys ---------------------------------------------------------------------------------------

    def receive_share_keys(self, sender: str, msg: ShareKeys) -> None:
        """Keep a site's encrypted bundles (one per neighbour in U1) and its share commitments."""
        self._expect(ServerStage.SHARE_KEYS, sender, self.u1)
        live = self.params.neighbours_of(sender) & self.u1
        if msg.site != sender or any(es.sender != sender for es in msg.shares):
            raise PermissionDenied(f"site {sender!r} sent shares in another site's name")
        receivers = [es.receiver for es in msg.shares]
        if len(set(receivers)) != len(receivers) or set(receivers) != live:
            raise InvalidArgument(f"site {sender!r} must send exactly one share bundle to each of {sorted(live)}")
        holders = [c.holder for c in msg.commitments]
        if len(set(holders)) != len(holders) or set(holders) != live | {sender}:
            raise InvalidArgument(f"site {sender!r} must commit to the shares of each holder exactly once")
        if any(len(c.b_commitment) != 32 or len(c.s_commitment) != 32 for c in msg.commitments):
            raise InvalidArgument("share commitments are 32-byte SHA-256 digests")
        self._record(self._share_keys, sender, msg)

    def close_share_keys(self) -> frozenset[str]:
        """End stage 1; returns U2 (sites whose shares will be delivered)."""
        self._expect(ServerStage.SHARE_KEYS)
        self.u2 = self._prune(frozenset(self._share_keys), frozenset(self._share_keys))
        if not self.u2:
            self._abort(f"too few sites shared keys ({len(self._share_keys)} of {len(self.u1)})")
        self._u2_holders = {owner: self._holders(owner, self.u2) for owner in self.u2}
        for sender in sorted(self.u2):
            for c in self._share_keys[sender].commitments:
                self._commitments[(sender, c.holder)] = c
            for es in self._share_keys[sender].shares:
                if es.receiver in self.u2:
                    self._inbox.setdefault(es.receiver, []).append(es)
        self.stage = ServerStage.MASKED_INPUT
        return self.u2

    def shares_for(self, site: str) -> tuple[EncryptedShare, ...]:
        """What ``site`` needs for stage 2: the bundles its neighbours in U2 addressed to it."""
        self._expect(ServerStage.MASKED_INPUT, site, self.u2)
        return tuple(self._inbox.get(site, ()))

    # -- stage 2: masked input -------------------------------------------------------------------------------------

    def receive_masked_input(self, sender: str, msg: MaskedInput) -> None:
        """Fold a site's packed masked input into the running sum (whole message)."""
        if msg.site != sender:
            raise PermissionDenied(f"site {sender!r} sent a masked input in another site's name")
        expected = packed_len(self.params.dim, self.params.bits)
        if len(msg.data) != expected:
            raise InvalidArgument(f"a masked input is {expected} bytes here, got {len(msg.data)}")
        self.receive_masked_chunks(sender, [msg.data])

    def receive_masked_chunks(self, sender: str, chunks: Iterable[bytes]) -> None:
        """Fold a site's packed masked input chunk by chunk, as it streams in; memory stays O(chunk).

        Feed it from a complete, length-checked upload (e.g. the spooled file): a stream that turns out too long
        or too short after some chunks were folded leaves the sum unusable, and the round is then aborted.
        """
        self._expect(ServerStage.MASKED_INPUT, sender, self.u2)
        if sender in self._masked:
            digest = hashlib.sha256()
            for chunk in chunks:
                digest.update(chunk)
            if digest.digest() != self._masked[sender]:
                raise AlreadyExists(f"site {sender!r} already sent a different masked input")
            return
        digest, unpacker = hashlib.sha256(), Unpacker(self.params.dim, self.params.bits)
        try:
            for chunk in chunks:
                digest.update(chunk)
                for start, values in unpacker.feed(chunk):
                    part = self._sum[start : start + len(values)]
                    np.add(part, values, out=part)
            unpacker.close()
        except InvalidArgument as exc:
            if unpacker.done:
                self._abort(f"the masked input of {sender!r} broke off after it was partly added ({exc})")
            raise
        self._masked[sender] = digest.digest()

    def close_masked_input(self) -> tuple[str, ...]:
        """End stage 2; returns U3 sorted, the survivor list every site in U3 is asked to sign."""
        self._expect(ServerStage.MASKED_INPUT)
        self.u3 = frozenset(self._masked)
        self._u3_listing = keys.survivor_list(tuple(sorted(self.u3)))
        if not self.u3:
            self._abort("no site sent its masked input")
        self._check_recoverable(self.u3, "after the masked inputs")
        self.stage = ServerStage.CONSISTENCY
        return tuple(sorted(self.u3))

    # -- stage 3: consistency check --------------------------------------------------------------------------------

    def receive_survivor_signature(self, sender: str, sig: SurvivorSignature) -> None:
        """Keep a site's signature on U3, after checking it with the site's certificate key."""
        self._expect(ServerStage.CONSISTENCY, sender, self.u3)
        p = self.params
        digest = keys.survivors_digest(p.job_id, p.round_no, sender, self._u3_listing)
        if sig.site != sender or not self._signers[sender].valid_digest(sig.signature, digest):
            raise InvalidArgument(f"the survivor-list signature of {sender!r} does not verify")
        self._record(self._sigs, sender, sig)

    def close_consistency(self) -> frozenset[str]:
        """End stage 3; returns U4: the signers that will see >= t signatures from their holders (the others would
        abort), and so will be asked for their shares."""
        self._expect(ServerStage.CONSISTENCY)
        signers = frozenset(self._sigs)
        nb = self.params.neighbours_of
        self.u4 = frozenset(s for s in signers if len((nb(s) | {s}) & signers) >= self.params.t)
        self._check_recoverable(self.u4, "after the consistency check")
        self.stage = ServerStage.UNMASK
        return self.u4

    def signatures_for(self, site: str) -> tuple[SurvivorSignature, ...]:
        """What ``site`` needs for stage 4: the survivor-list signatures of its neighbours in U4 and its own."""
        self._expect(ServerStage.UNMASK, site, self.u4)
        return tuple(self._sigs[j] for j in sorted((self.params.neighbours_of(site) | {site}) & set(self._sigs)))

    # -- stage 4: unmask -------------------------------------------------------------------------------------------

    def receive_unmask(self, sender: str, msg: Unmask) -> None:
        """Check and keep a site's revealed shares: one per owner it holds, of the kind U3 calls for, each
        matching its owner's commitment (a share that does not is dropped and recorded in :attr:`rejected`)."""
        self._expect(ServerStage.UNMASK, sender, self.u4)
        p = self.params
        if msg.site != sender:
            raise PermissionDenied(f"site {sender!r} sent shares in another site's name")
        owners = [r.owner for r in msg.shares]
        if len(set(owners)) != len(owners):
            raise InvalidArgument(f"site {sender!r} revealed two shares for one owner; a holder reveals only one")
        for r in msg.shares:
            if r.owner not in self.u2 or sender not in self._u2_holders[r.owner]:
                raise InvalidArgument(f"site {sender!r} cannot hold shares of {r.owner!r}")
            if r.kind != ("b" if r.owner in self.u3 else "s"):
                raise InvalidArgument(f"site {sender!r} revealed the wrong kind of share of {r.owner!r}")
        if not self._record(self._unmasks, sender, msg):
            return
        x = p.x_of(sender)
        for r in msg.shares:
            commits = self._commitments[(r.owner, sender)]
            want = commits.b_commitment if r.kind == "b" else commits.s_commitment
            # A share that is no field element is evidence like a forged one, even when it matches its commitment
            # (its owner committed to it, e.g. for the share it holds itself): the message is taken either way.
            if keys.share_commitment(p.job_id, p.round_no, r.owner, sender, r.kind, r.share) != want or not (
                len(r.share) == shamir.SHARE_LEN and int.from_bytes(r.share, "big") < shamir.PRIME
            ):
                self.rejected.append(RejectedShare(sender, r.owner, r.kind))
                continue
            self._shares.setdefault((r.owner, r.kind), {})[x] = shamir.share_from_bytes(r.share)

    def finish(self) -> U32Array:
        """End the round: reconstruct the needed secrets, strip the masks, and return the exact sum mod 2**b of
        the survivors' (U3) encoded inputs. Too few valid shares for any secret aborts the round."""
        self._expect(ServerStage.UNMASK)
        p = self.params
        masks: list[Mask] = []
        for owner, kind in self._needed():
            got = self._shares.get((owner, kind), {})
            if len(got) < p.t:
                self._abort(f"only {len(got)} valid shares of {owner!r}'s {kind}-secret arrived; t={p.t} are needed")
            secret = shamir.combine(got, p.t)
            if kind == "b":
                masks.append((secret, -1))
                continue
            s_sk = keys.load_private(secret)
            if keys.public_bytes(s_sk) != self._ads[owner].s_pk:
                self.stage, self.abort_reason = ServerStage.ABORTED, f"the mask key of {owner!r} was tampered with"
                raise SecAggTampered(f"the reconstructed mask key of {owner!r} does not match its advertised key")
            for u in sorted(p.neighbours_of(owner) & self.u3):
                seed = keys.derive(keys.agree(s_sk, self._ads[u].s_pk, u), "mask", p.job_id, p.round_no, owner, u)
                # u added +PRG if u < owner, else -PRG; take out what u put in.
                masks.append((seed, -1 if u < owner else 1))
        apply_masks(self._sum, masks, p.bits)
        self.stage = ServerStage.DONE
        return self._sum

    @property
    def survivors(self) -> tuple[str, ...]:
        """U3: the sites whose inputs the result sums."""
        return tuple(sorted(self.u3))
