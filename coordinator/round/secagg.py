"""The coordinator's side of a secure-aggregation round, around :class:`common.secagg.protocol.SecAggServer`.

The library holds the cryptographic state; this module adds what the network needs: who is still expected in the
current stage (so a stage closes as soon as everyone answered, or at its deadline), routing each stage's output to
the sites as work items, and folding a spooled masked input into the running sum mod 2**b.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509

from common import failpoints
from common.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from common.privacy.skellam import SkellamParams, decode_private
from common.proto.cohort.v1 import cohort_pb2 as pb
from common.secagg import protocol as sa
from common.secagg.encoding import EncodingParams, F64Array, check_padding, decode_mean, packed_len
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


def load_ca_certs(path: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(path.read_bytes())


@dataclass(eq=False)
class SecAggRound:
    """One attempt of one round under secure aggregation."""

    job_id: str
    number: int
    attempt: int
    params: sa.RoundParams
    enc: EncodingParams
    config: SecureAggregationConfig
    server: sa.SecAggServer
    skellam: SkellamParams | None = None  # site-level DP: distributed Skellam noise, rotation seed below
    rotation_seed: bytes = b""
    expected: set[str] = field(default_factory=set)
    answered: set[str] = field(default_factory=set)
    stage_done: asyncio.Event = field(default_factory=asyncio.Event)
    site_abort: str | None = None

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
    ) -> SecAggRound:
        # One extra lane carries the weight total; under distributed DP the rotated, padded vector is summed with
        # uniform weights instead (the survivor count is public).
        dim = model_numel + 1 if skellam is None else skellam.padded_dim
        params = sa.RoundParams.create(
            job_id,
            secagg_round_no(number, attempt),
            cohort,
            dim=dim,
            bits=config.bits,
            dropout_rate=config.dropout_rate,
            corruption_rate=config.corruption_rate,
            full_graph_max=config.full_graph_max,
        )
        if skellam is None:
            enc = EncodingParams.choose(max_n=len(cohort), clip=config.clip, bits=config.bits)
        else:
            enc = skellam.encoding()
        server = sa.SecAggServer(params, ca_certs)
        seed = hashlib.sha256(f"cohort-rotation-v1/{job_id}/{number}/{attempt}".encode()).digest()
        rnd = cls(job_id, number, attempt, params, enc, config, server, skellam, seed if skellam else b"")
        rnd.expect(set(cohort))
        return rnd

    def setup(self) -> pb.SecAggSetup:
        return setup_to_proto(self.params, self.enc, self.config.weight_cap)

    @property
    def masked_spec(self) -> Spec:
        return Spec(MASKED_TENSOR, pb.DTYPE_UINT8, (packed_len(self.params.dim, self.params.bits),))

    # -- stage bookkeeping ---------------------------------------------------------------------------------------
    def expect(self, sites: set[str]) -> None:
        self.expected, self.answered = set(sites), set()
        self.stage_done = asyncio.Event()
        self._check_done()

    def _check_done(self) -> None:
        if self.expected <= self.answered or self.site_abort is not None:
            self.stage_done.set()

    def site_lost(self, site: str) -> None:
        self.expected.discard(site)
        self._check_done()

    def _step(self, **stage: object) -> pb.WorkItem:
        step = pb.SecAggStep(job_id=self.job_id, round=self.number, attempt=self.attempt, **stage)  # type: ignore[arg-type]
        return pb.WorkItem(secagg=step)

    # -- messages from sites ------------------------------------------------------------------------------------
    def receive(self, site: str, msg: pb.SecAggMessage) -> None:
        """Apply one site message to the server state machine; raises the library's errors unchanged."""
        if msg.job_id != self.job_id or msg.round != self.number or msg.attempt != self.attempt:
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
            failpoints.hit("coordinator.unmasking", round=self.number)
        elif kind == "abort_reason":
            self.site_abort = f"site {site!r} aborted: {msg.abort_reason[:500]}"
        else:
            raise InvalidArgument("secure-aggregation message has no stage payload")
        self.answered.add(site)
        self._check_done()

    # -- stage transitions (the job runner calls these when a stage is done or its deadline passed) -------------
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

    def finish(self) -> tuple[F64Array, float, int]:
        """The FedAvg mean of the survivors' updates (decoded), their weight total and their number."""
        total = self.server.finish()
        n = len(self.server.u3)
        if self.skellam is not None:
            noisy_sum = decode_private(total, self.skellam, n, self.rotation_seed)
            return noisy_sum / n, float(n), n
        mean, weight_total = decode_mean(total, self.enc, n)
        return mean, weight_total, n

    # -- masked input ---------------------------------------------------------------------------------------------
    def fold_masked_file(self, site: str, path: Path) -> None:
        """Fold a spooled, digest-checked masked input into the running sum mod 2**b, block by block."""

        def blocks() -> Iterator[bytes]:
            with path.open("rb") as f:
                while block := f.read(CHUNK_BYTES):
                    yield block

        # Checked before any of it is added: bad padding found after the fold would leave the sum unusable.
        with path.open("rb") as f:
            f.seek(-1, 2)
            check_padding(f.read(1)[0], self.params.dim, self.params.bits)
        self.server.receive_masked_chunks(site, blocks())


# -- the stages around the masked-input upload, as the job runner drives them ------------------------------------

Send = Callable[[str, pb.WorkItem], bool]
Wait = Callable[[asyncio.Event, float], Awaitable[bool]]


async def _run_stage(rnd: SecAggRound, wait: Wait, timeout: float, closed: asyncio.Event | None = None) -> None:
    """Wait until every expected site answered, the stage deadline passed, or the round closed."""
    if closed is None:
        await wait(rnd.stage_done, timeout)
        return
    either = asyncio.Event()
    waiters = [asyncio.ensure_future(e.wait()) for e in (rnd.stage_done, closed)]
    for w in waiters:
        w.add_done_callback(lambda _: either.set())
    try:
        await wait(either, timeout)
    finally:
        for w in waiters:
            w.cancel()


def _route(items: dict[str, pb.WorkItem], send: Send, rnd: SecAggRound) -> None:
    for site, item in items.items():
        if not send(site, item):
            rnd.site_lost(site)


def _stage_timeout(rnd: SecAggRound, deadline: float, stages_left: int = 1) -> float:
    """A stage waits at most stage_timeout_s, never past the round's deadline, and leaves the stages after it their
    share of the time that is left (a site that hangs in one stage must not starve the next)."""
    return max(0.0, min(rnd.config.stage_timeout_s, (deadline - time.time()) / stages_left))


async def key_stages(
    rnd: SecAggRound, send: Send, wait: Wait, round_closed: asyncio.Event, deadline: float
) -> str | None:
    """Stages 0 (advertise keys) and 1 (share keys), before ``deadline`` (the upload deadline). Returns why the round
    must fail, or None."""
    try:
        # Before the upload deadline: advertise, share keys, then the masked inputs (training) take what is left.
        await _run_stage(rnd, wait, _stage_timeout(rnd, deadline, stages_left=3), round_closed)
        if rnd.site_abort:
            return rnd.site_abort
        _route(rnd.close_advertise(), send, rnd)
        await _run_stage(rnd, wait, _stage_timeout(rnd, deadline, stages_left=2), round_closed)
        if rnd.site_abort:
            return rnd.site_abort
        _route(rnd.close_share_keys(), send, rnd)
    except sa.SecAggAborted as exc:
        return f"secure aggregation: {exc}"
    return None


async def unmask_stages(rnd: SecAggRound, send: Send, wait: Wait, deadline: float) -> tuple[F64Array, float, int] | str:
    """Stages 3 (consistency check) and 4 (unmask) after the masked inputs, before the round's ``deadline``; the
    decoded mean, or why it failed."""
    try:
        _route(rnd.close_masked_input(), send, rnd)
        await _run_stage(rnd, wait, _stage_timeout(rnd, deadline, stages_left=2))
        if rnd.site_abort:
            return rnd.site_abort
        _route(rnd.close_consistency(), send, rnd)
        await _run_stage(rnd, wait, _stage_timeout(rnd, deadline))
        if rnd.site_abort:
            return rnd.site_abort
        return await asyncio.to_thread(rnd.finish)
    except (sa.SecAggAborted, InvalidArgument) as exc:
        return f"secure aggregation: {exc}"
