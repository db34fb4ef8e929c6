"""Secure-aggregation messages between their protobuf form (cohort.v1) and the library's dataclasses.

Field for field copies; the library checks content (signatures, lengths, stages) when it receives them.
"""

from __future__ import annotations

import json

from common.errors import InvalidArgument
from common.proto.cohort.v1 import cohort_pb2 as pb
from common.secagg.encoding import EncodingParams
from common.secagg.lanes import LaneLayout
from common.secagg.protocol import (
    Advertisement,
    EncryptedShare,
    RevealedShare,
    RoundParams,
    ShareCommitment,
    ShareKeys,
    SurvivorSignature,
    Unmask,
)

MASKED_TENSOR = "secagg.masked"


MAX_ATTEMPTS = 500  # training attempts of a round (the job's max_round_retries is below)
MAX_EVAL_INSTANCES = 250  # secure evaluation instances of one round and split


def secagg_round_no(round_no: int, attempt: int, split: str = "") -> int:
    """The instance number signed and bound into every key: distinct for each training attempt of a round and for each
    secure evaluation instance of it (``split`` "val"/"test", ``attempt`` the instance), so nothing from one instance
    can be replayed into another."""
    if split == "":
        if not 0 <= attempt < MAX_ATTEMPTS:
            raise InvalidArgument(f"attempt {attempt} is out of range")
        return round_no * 1000 + attempt
    if split not in ("val", "test") or not 0 <= attempt < MAX_EVAL_INSTANCES:
        raise InvalidArgument(f"no secure evaluation instance {split!r}/{attempt}")
    return round_no * 1000 + MAX_ATTEMPTS + 2 * attempt + (split == "test")


def setup_to_proto(
    params: RoundParams, enc: EncodingParams | None, weight_cap: int, lanes: LaneLayout | None = None
) -> pb.SecAggSetup:
    setup = pb.SecAggSetup(
        cohort=list(params.cohort),
        k=params.k,
        t=params.t,
        bits=params.bits,
        dim=params.dim,
        weight_cap=weight_cap,
    )
    if enc is not None:
        setup.clip, setup.max_n, setup.levels = enc.clip, enc.max_n, enc.levels
    if lanes is not None:
        setup.lanes_json = json.dumps(lanes.to_dict(), sort_keys=True)
    return setup


def setup_from_proto(
    job_id: str, round_no: int, attempt: int, s: pb.SecAggSetup, split: str = ""
) -> tuple[RoundParams, EncodingParams | None, LaneLayout | None]:
    """The instance's public parameters: ring and graph, the update's encoding (None for an evaluation, which sums
    lanes only) and the metadata lanes (None when the setup has none)."""
    params = RoundParams(
        job_id, secagg_round_no(round_no, attempt, split), tuple(s.cohort), int(s.k), int(s.t), int(s.bits), int(s.dim)
    )
    enc = None
    if split == "":
        if s.bits != 0 and s.weight_cap < 1:
            raise InvalidArgument("secure aggregation setup has no weight cap")
        enc = EncodingParams(bits=int(s.bits), clip=float(s.clip), max_n=int(s.max_n), levels=int(s.levels))
    lanes = None
    if s.lanes_json:
        try:
            lanes = LaneLayout.from_dict(json.loads(s.lanes_json))
        except ValueError as exc:
            raise InvalidArgument(f"secure aggregation setup: bad lane layout ({exc})") from None
    return params, enc, lanes


def ad_to_proto(a: Advertisement) -> pb.SecAggAdvertisement:
    return pb.SecAggAdvertisement(site=a.site, c_pk=a.c_pk, s_pk=a.s_pk, signature=a.signature, cert_pem=a.cert_pem)


def ad_from_proto(a: pb.SecAggAdvertisement) -> Advertisement:
    return Advertisement(a.site, a.c_pk, a.s_pk, a.signature, a.cert_pem)


def share_to_proto(e: EncryptedShare) -> pb.SecAggEncryptedShare:
    return pb.SecAggEncryptedShare(sender=e.sender, receiver=e.receiver, ciphertext=e.ciphertext)


def share_from_proto(e: pb.SecAggEncryptedShare) -> EncryptedShare:
    return EncryptedShare(e.sender, e.receiver, e.ciphertext)


def share_keys_to_proto(m: ShareKeys) -> pb.SecAggShareKeys:
    return pb.SecAggShareKeys(
        shares=[share_to_proto(e) for e in m.shares],
        commitments=[
            pb.SecAggShareCommitment(holder=c.holder, b_commitment=c.b_commitment, s_commitment=c.s_commitment)
            for c in m.commitments
        ],
    )


def share_keys_from_proto(site: str, m: pb.SecAggShareKeys) -> ShareKeys:
    return ShareKeys(
        site,
        tuple(share_from_proto(e) for e in m.shares),
        tuple(ShareCommitment(c.holder, c.b_commitment, c.s_commitment) for c in m.commitments),
    )


def signature_to_proto(s: SurvivorSignature) -> pb.SecAggSignature:
    return pb.SecAggSignature(site=s.site, signature=s.signature)


def signature_from_proto(s: pb.SecAggSignature) -> SurvivorSignature:
    return SurvivorSignature(s.site, s.signature)


def unmask_to_proto(u: Unmask) -> pb.SecAggUnmask:
    return pb.SecAggUnmask(shares=[pb.SecAggRevealedShare(owner=r.owner, kind=r.kind, share=r.share) for r in u.shares])


def unmask_from_proto(site: str, u: pb.SecAggUnmask) -> Unmask:
    shares = []
    for r in u.shares:
        if r.kind not in ("b", "s"):
            raise InvalidArgument(f"revealed share of {r.owner!r} has unknown kind {r.kind!r}")
        shares.append(RevealedShare(r.owner, "b" if r.kind == "b" else "s", r.share))
    return Unmask(site, tuple(shares))
