"""The coordinator's side of a secure-aggregation round, around :class:`common.secagg.protocol.SecAggServer`.

The library holds the cryptographic state; this module adds what the round needs: who is still expected in the
current stage (so a stage closes as soon as everyone answered), each stage's output as work items for the sites, and
folding a spooled masked input into the running sum mod 2**b. No I/O and no clock: the job's state machine
(:mod:`coordinator.round.machine`) decides when a stage closes, the runner carries the work items.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509

from common.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from common.privacy.skellam import SkellamParams, decode_private
from common.proto.cohort.v1 import cohort_pb2 as pb
from common.secagg import protocol as sa
from common.secagg.encoding import EncodingParams, F64Array, decode_mean, packed_len
from common.secagg.lanes import TRAIN_LANES, Lane, LaneLayout
from common.secagg_wire import (
    MASKED_TENSOR,
    ad_from_proto,
    ad_to_proto,
    secagg_round_no,
    setup_to_proto,
    share_keys_from_proto,
    share_to_proto,
    signature_from_proto,
    signature_to_proto,
    unmask_from_proto,
)
from common.serde import CHUNK_BYTES, Spec
from coordinator.config import SecureAggregationConfig


@dataclass(frozen=True)
class Unmasked:
    """What the coordinator learns from a secure instance: the mean update (training), the weight total, the number
    of survivors, and the lanes' totals."""

    mean: F64Array | None
    weight_total: float
    survivors: int
    totals: dict[str, float]


def load_ca_certs(path: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(path.read_bytes())


@dataclass(eq=False)
class SecAggRound:
    """One secure-aggregation instance: a training attempt of a round (``split`` "") or a secure evaluation of it
    (``split`` "val"/"test", ``attempt`` the instance). Its input is the encoded update (training only) followed by
    the limbs of the metadata ``lanes`` (common/secagg/lanes.py)."""

    job_id: str
    number: int
    attempt: int
    params: sa.RoundParams
    enc: EncodingParams | None  # the update's encoding (None: an evaluation sums lanes only)
    config: SecureAggregationConfig
    server: sa.SecAggServer
    lanes: LaneLayout
    skellam: SkellamParams | None = None  # site-level DP: distributed Skellam noise, rotation seed below
    rotation_seed: bytes = b""
    split: str = ""
    expected: set[str] = field(default_factory=set)
    answered: set[str] = field(default_factory=set)

    @classmethod
    def create(
        cls,
        job_id: str,
        number: int,
        attempt: int,
        cohort: list[str],
        model_numel: int,
        config: SecureAggregationConfig,
        ca_certs: list[x509.Certificate],
        skellam: SkellamParams | None = None,
        now: float | None = None,
        *,
        split: str = "",
        lanes: tuple[Lane, ...] = TRAIN_LANES,
    ) -> SecAggRound:
        layout = LaneLayout(lanes, config.bits, max(2, len(cohort)))
        # One extra lane carries the weight total; under distributed DP the rotated, padded vector is summed with
        # uniform weights instead (the survivor count is public). An evaluation sums its lanes only.
        model_dim = 0 if split else (model_numel + 1 if skellam is None else skellam.padded_dim)
        params = sa.RoundParams.create(
            job_id,
            secagg_round_no(number, attempt, split),
            cohort,
            dim=model_dim + layout.size,
            bits=config.bits,
            dropout_rate=config.dropout_rate,
            corruption_rate=config.corruption_rate,
            full_graph_max=config.full_graph_max,
        )
        enc: EncodingParams | None = None
        if split:
            enc = None
        elif skellam is None:
            enc = EncodingParams.choose(max_n=len(cohort), clip=config.clip, bits=config.bits)
        else:
            enc = skellam.encoding()
        when = None if now is None else datetime.fromtimestamp(now, UTC)  # checks the sites' certificates' validity
        server = sa.SecAggServer(params, ca_certs, now=when)
        seed = hashlib.sha256(f"cohort-rotation-v1/{job_id}/{number}/{attempt}".encode()).digest()
        rnd = cls(
            job_id, number, attempt, params, enc, config, server, layout, skellam, seed if skellam else b"", split
        )
        rnd.expect(set(cohort))
        return rnd

    def setup(self) -> pb.SecAggSetup:
        return setup_to_proto(self.params, self.enc, self.config.weight_cap, self.lanes)

    @property
    def model_dim(self) -> int:
        """The encoded update's length in the input (0 for an evaluation); the lanes' limbs follow it."""
        return self.params.dim - self.lanes.size

    @property
    def masked_spec(self) -> Spec:
        return Spec(MASKED_TENSOR, pb.DTYPE_UINT8, (packed_len(self.params.dim, self.params.bits),))

    # -- stage bookkeeping ---------------------------------------------------------------------------------------
    def expect(self, sites: set[str]) -> None:
        self.expected, self.answered = set(sites), set()

    @property
    def stage_complete(self) -> bool:
        """Everyone the current stage waits for has answered (or dropped out)."""
        return self.expected <= self.answered

    def site_lost(self, site: str) -> None:
        self.expected.discard(site)

    def _step(self, **stage: object) -> pb.WorkItem:
        step = pb.SecAggStep(
            job_id=self.job_id,
            round=self.number,
            attempt=self.attempt,
            split=self.split,
            **stage,  # type: ignore[arg-type]
        )
        return pb.WorkItem(secagg=step)

    # -- messages from sites ------------------------------------------------------------------------------------
    def receive(self, site: str, msg: pb.SecAggMessage) -> None:
        """Apply one site message to the server state machine; raises the library's errors unchanged."""
        if (msg.job_id, msg.round, msg.attempt, msg.split) != (self.job_id, self.number, self.attempt, self.split):
            raise FailedPrecondition(
                f"secure-aggregation message for job {msg.job_id!r} round {msg.round} attempt {msg.attempt}; "
                f"the open round is {self.number} attempt {self.attempt} of job {self.job_id!r}"
            )
        if site not in self.params.cohort:
            raise PermissionDenied(f"site {site!r} is not in the cohort of this round")
        kind = msg.WhichOneof("stage")
        if kind == "advertisement":
            self.server.receive_advertisement(site, ad_from_proto(msg.advertisement))
        elif kind == "share_keys":
            self.server.receive_share_keys(site, share_keys_from_proto(site, msg.share_keys))
        elif kind == "survivor_signature":
            self.server.receive_survivor_signature(site, signature_from_proto(msg.survivor_signature))
        elif kind == "unmask":
            self.server.receive_unmask(site, unmask_from_proto(site, msg.unmask))
        elif kind == "abort_reason":
            self.site_lost(site)  # a dropout from here on (coordinator/round/secure_sum.py)
            return
        else:
            raise InvalidArgument("secure-aggregation message has no stage payload")
        self.answered.add(site)

    # -- stage transitions (the job machine calls these when a stage is done or its deadline passed) -------------
    def close_advertise(self) -> dict[str, pb.WorkItem]:
        u1 = self.server.close_advertise()
        self.expect(set(u1))
        return {
            site: self._step(
                advertisements=pb.SecAggAdvertisements(
                    advertisements=[ad_to_proto(a) for a in self.server.advertisements_for(site)]
                )
            )
            for site in sorted(u1)
        }

    def close_share_keys(self) -> dict[str, pb.WorkItem]:
        u2 = self.server.close_share_keys()
        self.expected, self.answered = set(), set()
        return {
            site: self._step(shares=pb.SecAggShares(shares=[share_to_proto(e) for e in self.server.shares_for(site)]))
            for site in sorted(u2)
        }

    @property
    def u2(self) -> frozenset[str]:
        return self.server.u2

    def close_masked_input(self) -> dict[str, pb.WorkItem]:
        u3 = self.server.close_masked_input()
        self.expect(set(u3))
        item = self._step(survivors=pb.SecAggSurvivors(sites=list(u3)))
        return dict.fromkeys(u3, item)

    def close_consistency(self) -> dict[str, pb.WorkItem]:
        u4 = self.server.close_consistency()
        self.expect(set(u4))
        return {
            site: self._step(
                signatures=pb.SecAggSignatures(
                    signatures=[signature_to_proto(s) for s in self.server.signatures_for(site)]
                )
            )
            for site in sorted(u4)
        }

    def finish(self) -> Unmasked:
        """Unmask the survivors' sum; decode the update's FedAvg mean (training) and the lanes' totals."""
        total = self.server.finish()
        n = len(self.server.u3)
        totals = self.lanes.decode(total[self.model_dim :])
        if self.enc is None:
            return Unmasked(None, 0.0, n, totals)
        model = total[: self.model_dim]
        if self.skellam is not None:
            noisy_sum = decode_private(model, self.skellam, n, self.rotation_seed)
            return Unmasked(noisy_sum / n, float(n), n, totals)
        mean, weight_total = decode_mean(model, self.enc, n)
        return Unmasked(mean, weight_total, n, totals)

    # -- masked input ---------------------------------------------------------------------------------------------
    def fold_masked_file(self, site: str, path: Path) -> None:
        """Fold a spooled, digest-checked masked input into the running sum mod 2**b, block by block."""

        def blocks() -> Iterator[bytes]:
            with path.open("rb") as f:
                while block := f.read(CHUNK_BYTES):
                    yield block

        # The padding bits were checked while the upload was spooled (aggregation.MaskedPadding).
        self.server.receive_masked_chunks(site, blocks())
