"""Secure-aggregation messages between their protobuf form (cohort.v1) and the library's dataclasses.

Field for field copies; the library checks content (signatures, lengths, stages) when it receives them.
"""

from __future__ import annotations

from common.errors import InvalidArgument
from common.proto.cohort.v1 import cohort_pb2 as pb
from common.secagg.encoding import EncodingParams
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


def secagg_round_no(round_no: int, attempt: int) -> int:
    """The round number signed and bound into every key: distinct for each attempt of a round, so nothing from a
    failed attempt can be replayed into its retry."""
    return round_no * 1000 + attempt


def setup_to_proto(params: RoundParams, enc: EncodingParams, weight_cap: int) -> pb.SecAggSetup:
    return pb.SecAggSetup(
        cohort=list(params.cohort),
        k=params.k,
        t=params.t,
        bits=params.bits,
        dim=params.dim,
        clip=enc.clip,
        max_n=enc.max_n,
        levels=enc.levels,
        weight_cap=weight_cap,
    )


def setup_from_proto(job_id: str, round_no: int, attempt: int, s: pb.SecAggSetup) -> tuple[RoundParams, EncodingParams]:
    if s.bits != 0 and s.weight_cap < 1:
        raise InvalidArgument("secure aggregation setup has no weight cap")
    params = RoundParams(
        job_id, secagg_round_no(round_no, attempt), tuple(s.cohort), int(s.k), int(s.t), int(s.bits), int(s.dim)
    )
    enc = EncodingParams(bits=int(s.bits), clip=float(s.clip), max_n=int(s.max_n), levels=int(s.levels))
    return params, enc


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
