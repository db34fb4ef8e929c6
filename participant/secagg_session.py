"""A site's side of one secure-aggregation round, around :class:`common.secagg.protocol.SecAggClient`.

The daemon creates a session when a train task carries a ``secagg`` setup, sends the signed advertisement at once
(while training runs), answers each step the coordinator routes to it, and masks its update once the neighbours'
shares have arrived. Any tampering the library detects aborts the session: the site reveals nothing more and tells
the coordinator why.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from common.certs import TlsFiles
from common.errors import CertificateError, InvalidArgument
from common.privacy.skellam import SkellamParams, privatize
from common.proto.cohort.v1 import cohort_pb2 as pb
from common.secagg import protocol as sa
from common.secagg.encoding import EncodingParams, encode_with_weight_lane_into, weight_of
from common.secagg.lanes import LaneLayout
from common.secagg.prg import U32Array
from common.secagg_wire import (
    MASKED_TENSOR,
    ad_from_proto,
    ad_to_proto,
    setup_from_proto,
    share_from_proto,
    share_keys_to_proto,
    signature_from_proto,
    signature_to_proto,
    unmask_to_proto,
)
from common.serde import EncodedTensors, Spec, new_hasher


@dataclass(frozen=True)
class SiteKeys:
    """The site's certificate, its private key (signs this round's keys) and the federation CA certificates."""

    key: ec.EllipticCurvePrivateKey
    cert_pem: bytes
    ca_certs: tuple[x509.Certificate, ...]

    @classmethod
    def load(cls, files: TlsFiles) -> SiteKeys:
        key = serialization.load_pem_private_key(files.key.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CertificateError(f"{files.key}: secure aggregation needs an ECDSA certificate key")
        return cls(key, files.cert.read_bytes(), tuple(x509.load_pem_x509_certificates(files.ca.read_bytes())))


@dataclass(eq=False)
class SecAggSession:
    """One secure-aggregation instance at a site: a round's training (a TrainTask) or a secure evaluation (an
    EvaluateTask, ``split`` "val"/"test")."""

    task: pb.TrainTask | pb.EvaluateTask
    params: sa.RoundParams
    enc: EncodingParams | None
    lanes: LaneLayout | None
    weight_cap: int
    client: sa.SecAggClient
    shares_ready: asyncio.Event = field(default_factory=asyncio.Event)
    aborted: str | None = None

    @property
    def split(self) -> str:
        return self.task.split if isinstance(self.task, pb.EvaluateTask) else ""

    @classmethod
    def start(cls, task: pb.TrainTask | pb.EvaluateTask, site: str, keys: SiteKeys) -> SecAggSession:
        split = task.split if isinstance(task, pb.EvaluateTask) else ""
        params, enc, lanes = setup_from_proto(task.job_id, task.round, task.attempt, task.secagg, split)
        client = sa.SecAggClient(params, site, keys.key, keys.cert_pem, keys.ca_certs)
        return cls(task, params, enc, lanes, int(task.secagg.weight_cap), client)

    def message(self, **stage: object) -> pb.SecAggMessage:
        t = self.task
        return pb.SecAggMessage(
            job_id=t.job_id,
            round=t.round,
            attempt=t.attempt,
            split=self.split,
            **stage,  # type: ignore[arg-type]
        )

    def advertise(self) -> pb.SecAggMessage:
        return self.message(advertisement=ad_to_proto(self.client.advertise()))

    def on_step(self, step: pb.SecAggStep) -> pb.SecAggMessage | None:
        """Run the client stage a coordinator step calls for; the reply to send, if any. Raises SecAggAborted."""
        kind = step.WhichOneof("stage")
        if kind == "advertisements":
            ads = [ad_from_proto(a) for a in step.advertisements.advertisements]
            return self.message(share_keys=share_keys_to_proto(self.client.share_keys(ads)))
        if kind == "shares":
            self.client.receive_shares([share_from_proto(e) for e in step.shares.shares])
            self.shares_ready.set()
            return None
        if kind == "survivors":
            sig = self.client.consistency_check(list(step.survivors.sites))
            return self.message(survivor_signature=signature_to_proto(sig))
        if kind == "signatures":
            unmask = self.client.unmask([signature_from_proto(s) for s in step.signatures.signatures])
            return self.message(unmask=unmask_to_proto(unmask))
        return None

    def masked_update(
        self, update: EncodedTensors, num_samples: int, lane_values: Mapping[str, float] | None = None
    ) -> EncodedTensors:
        """The update, clipped, weighted, encoded, then the metadata lanes; masked and bit-packed: one uint8 tensor."""
        assert isinstance(self.task, pb.TrainTask)
        assert self.enc is not None
        flat = np.frombuffer(update.data, dtype="<f4")
        privacy = self.task.privacy
        lanes = self._lanes(lane_values or {})
        vector = np.empty(self.params.dim, dtype=np.uint32)  # encoded update, then the metadata lanes; masked in place
        head = vector[: self.params.dim - len(lanes)]
        if privacy.mode == "distributed":
            # Site-level DP: the (already L2-clipped) update is rotated with the round's public seed, encoded and
            # given this site's share of Skellam noise before it is masked; uniform weights.
            params = SkellamParams.from_dict(json.loads(privacy.skellam_json))
            private = privatize(flat.astype(np.float64), params, privacy.rotation_seed)
            _check_size(len(private) + len(lanes), self.params.dim)
            head[:] = private
        else:
            # A buffer's instance (asynchronous rounds): the weight times the public staleness weight the coordinator
            # sent, applied before masking, so the sum is the staleness-weighted one and so is its weight lane.
            weight = weight_of(num_samples, self.weight_cap)
            if self.task.buffered:
                weight *= self.task.staleness_weight
            _check_size(len(flat) + 1 + len(lanes), self.params.dim)
            encode_with_weight_lane_into(flat, self.enc, weight, head)
        vector[len(head) :] = lanes
        return self._masked(vector, in_place=True)

    def masked_lanes(self, lane_values: Mapping[str, float]) -> EncodedTensors:
        """A secure evaluation's input: its lanes only, masked and bit-packed."""
        return self._masked(self._lanes(lane_values))

    def _lanes(self, values: Mapping[str, float]) -> U32Array:
        if self.lanes is None:
            return np.zeros(0, dtype=np.uint32)
        return self.lanes.encode(values)

    def _masked(self, encoded: U32Array, *, in_place: bool = False) -> EncodedTensors:
        _check_size(len(encoded), self.params.dim)
        data = self.client.masked_input(encoded.astype(np.uint32, copy=False), in_place=in_place).data
        spec = Spec(MASKED_TENSOR, pb.DTYPE_UINT8, (len(data),))
        h = new_hasher([spec])
        h.update(data)
        return EncodedTensors((spec,), data, h.hexdigest())


def _check_size(size: int, dim: int) -> None:
    if size != dim:
        raise InvalidArgument(f"the input has {size} elements; the round sums {dim}")
