"""The round's public parameters and the messages of each SecAgg stage, as plain dataclasses of str, int and bytes.

Each message maps one to one onto a protobuf message with ``string``/``bytes``/``repeated`` fields, so the gRPC
layer only copies fields. The job id and round are not fields: they are part of every signed payload, associated
data and key derivation, so a message from another job or round fails verification at the receiver.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from common.certs import validate_name
from common.errors import ConfigError, InvalidArgument
from common.secagg.graph import choose_k_and_t, graph_seed, neighbours, threshold
from common.secagg.prg import check_bits

ShareKind = Literal["b", "s"]  # "b": share of the self-mask seed; "s": share of the mask-key private key


@dataclass(frozen=True)
class RoundParams:
    """What every party of a round must agree on; the coordinator puts it into the round's task.

    ``cohort`` is the sorted list of sites selected for the round; a site's Shamir evaluation point is its 1-based
    position in it. ``k`` is the neighbour count (``n - 1``: full graph) and ``t`` the Shamir threshold over a
    site's ``k + 1`` holders (its neighbours and itself). Construction checks the privacy condition
    ``t > (k + 1) / 2`` so that a site never accepts parameters that would let the coordinator unmask it.
    """

    job_id: str
    round_no: int
    cohort: tuple[str, ...]
    k: int
    t: int
    bits: int
    dim: int
    graph: dict[str, frozenset[str]] = field(init=False, repr=False, compare=False)
    positions: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        n = len(self.cohort)
        if n < 2 or list(self.cohort) != sorted(set(self.cohort)):
            raise InvalidArgument("the cohort must list at least 2 distinct sites in sorted order")
        try:
            for site in self.cohort:
                validate_name(site, "site id")
        except ConfigError as exc:
            raise InvalidArgument(str(exc)) from None
        if not self.job_id or self.round_no < 0 or self.dim < 1:
            raise InvalidArgument("job_id must be non-empty, round_no non-negative and dim positive")
        check_bits(self.bits)
        if not (self.k == n - 1 or (2 <= self.k < n - 1 and self.k % 2 == 0)):
            raise InvalidArgument(f"k={self.k} must be n-1={n - 1} (full graph) or even and below n-1")
        if not threshold(self.k, 0) <= self.t <= self.k + 1:
            raise InvalidArgument(
                f"threshold t={self.t} must be between {threshold(self.k, 0)} and {self.k + 1} for k={self.k}: "
                "a lower one would let the coordinator recover both secrets of a site"
            )
        seed = graph_seed(self.job_id, self.round_no, self.cohort)
        object.__setattr__(self, "graph", neighbours(self.cohort, self.k, seed))
        object.__setattr__(self, "positions", {site: i + 1 for i, site in enumerate(self.cohort)})

    @classmethod
    def create(
        cls,
        job_id: str,
        round_no: int,
        cohort: tuple[str, ...] | list[str],
        *,
        dim: int,
        bits: int,
        dropout_rate: float,
        corruption_rate: float,
        full_graph_max: int = 64,
    ) -> RoundParams:
        """Parameters with k and t from :func:`~common.secagg.graph.choose_k_and_t`."""
        ordered = tuple(sorted(cohort))
        k, t = choose_k_and_t(len(ordered), dropout_rate, corruption_rate, full_graph_max=full_graph_max)
        return cls(job_id, round_no, ordered, k, t, bits, dim)

    @property
    def n(self) -> int:
        return len(self.cohort)

    def x_of(self, site: str) -> int:
        """The site's Shamir evaluation point (never 0)."""
        try:
            return self.positions[site]
        except KeyError:
            raise ValueError(f"{site!r} is not in the cohort") from None

    def neighbours_of(self, site: str) -> frozenset[str]:
        return self.graph[site]


@dataclass(frozen=True)
class Advertisement:
    """Stage 0, site -> coordinator -> neighbours: the site's fresh X25519 public keys, signed with its
    certificate key over (job, round, site, c_pk, s_pk); ``cert_pem`` lets neighbours check the signer."""

    site: str
    c_pk: bytes
    s_pk: bytes
    signature: bytes
    cert_pem: bytes


@dataclass(frozen=True)
class EncryptedShare:
    """Stage 1, routed by the coordinator: AES-GCM(nonce || ct || tag) of the owner's two shares for one holder."""

    sender: str
    receiver: str
    ciphertext: bytes


@dataclass(frozen=True)
class ShareCommitment:
    """Stage 1, for the coordinator only: SHA-256 commitments to the two shares one holder received."""

    holder: str
    b_commitment: bytes
    s_commitment: bytes


@dataclass(frozen=True)
class ShareKeys:
    """Stage 1, site -> coordinator: one encrypted bundle per live neighbour, one commitment pair per holder."""

    site: str
    shares: tuple[EncryptedShare, ...]
    commitments: tuple[ShareCommitment, ...]


@dataclass(frozen=True)
class MaskedInput:
    """Stage 2, site -> coordinator: encode(x) + self mask + pairwise masks mod 2**b, bit-packed."""

    site: str
    data: bytes


@dataclass(frozen=True)
class SurvivorSignature:
    """Stage 3, site -> coordinator -> neighbours: signature over (job, round, site, sorted survivors U3)."""

    site: str
    signature: bytes


@dataclass(frozen=True)
class RevealedShare:
    """Stage 4: one share the holder reveals: of ``owner``'s self-mask seed (``b``) or mask key (``s``)."""

    owner: str
    kind: ShareKind
    share: bytes


@dataclass(frozen=True)
class Unmask:
    """Stage 4, site -> coordinator: for each owner it holds shares of, exactly one of the two."""

    site: str
    shares: tuple[RevealedShare, ...]
