"""SecAgg rounds end to end in one process, with real federation certificates: exact sums under dropouts at every
stage up to the tolerance, clean aborts beyond it, SecAgg+ sparse graphs, and FedAvg within the documented bound.

The helpers here (:class:`Federation`, :func:`make_round`) are shared with the other ``test_secagg_*`` modules."""

from __future__ import annotations

import datetime as dt
import functools
from dataclasses import dataclass

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from common.ca import create_ca, issue_certificate, new_private_key
from common.certs import Role
from common.errors import AlreadyExists, InvalidArgument
from common.secagg.encoding import EncodingParams, decode_mean, encode, weight_of, with_weight_lane
from common.secagg.local import DropPoint, run_local_round
from common.secagg.prg import U32Array
from common.secagg.protocol import RoundParams, SecAggAborted, SecAggClient, SecAggServer

JOB = "job-secagg"
DIM = 1000
BITS = 24
MAX_N = 64
NOW = dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class Identity:
    key: ec.EllipticCurvePrivateKey
    cert_pem: bytes


class Federation:
    """A federation CA and participant certificates for sites s00, s01, ..., made on first use."""

    def __init__(self, name: str = "test") -> None:
        self.ca, self._ca_key = create_ca(name, 30)
        self._ids: dict[tuple[str, Role], Identity] = {}

    def identity(self, site: str, role: Role = Role.PARTICIPANT, *, expired: bool = False) -> Identity:
        if (site, role) not in self._ids or expired:
            key = new_private_key()
            start = NOW - dt.timedelta(days=10 if expired else 1)
            cert = issue_certificate(
                self.ca,
                self._ca_key,
                name=site,
                role=role,
                public_key=key.public_key(),
                not_before=start,
                not_after=NOW - dt.timedelta(days=1) if expired else NOW + dt.timedelta(days=10),
                federation="test",
            )
            ident = Identity(key, cert.public_bytes(serialization.Encoding.PEM))
            if expired:
                return ident
            self._ids[(site, role)] = ident
        return self._ids[(site, role)]

    @property
    def cas(self) -> list[x509.Certificate]:
        return [self.ca]


@functools.cache
def federation() -> Federation:
    return Federation()


# Made now, with NOW: the CA's validity starts a few minutes before it is created (CLOCK_SKEW), and every test checks
# certificates at NOW, however late in a long run it first asks for the federation.
federation()


def site_names(n: int) -> tuple[str, ...]:
    return tuple(f"s{i:02d}" for i in range(n))


def make_round(params: RoundParams, fed: Federation | None = None) -> tuple[SecAggServer, dict[str, SecAggClient]]:
    fed = fed or federation()
    clients = {}
    for site in params.cohort:
        ident = fed.identity(site)
        clients[site] = SecAggClient(params, site, ident.key, ident.cert_pem, fed.cas, now=NOW)
    return SecAggServer(params, fed.cas, now=NOW), clients


def full_params(n: int, *, job: str = JOB, round_no: int = 1, dim: int = DIM) -> RoundParams:
    return RoundParams.create(job, round_no, site_names(n), dim=dim, bits=BITS, dropout_rate=0.1, corruption_rate=0.0)


@dataclass
class Inputs:
    """Each site's float update, sample count and encoding."""

    enc: EncodingParams
    updates: dict[str, np.ndarray]
    weights: dict[str, float]
    encoded: dict[str, U32Array]


def make_inputs(sites: tuple[str, ...], dim: int = DIM, seed: int = 0) -> Inputs:
    rng = np.random.default_rng(seed)
    enc = EncodingParams.choose(MAX_N, 0.5, BITS)
    updates = {s: (rng.standard_normal(dim - 1) * 0.3).astype(np.float32) for s in sites}
    weights = {s: weight_of(int(rng.integers(1, 2000)), 1000) for s in sites}
    encoded = {s: encode(with_weight_lane(updates[s], enc), enc, weights[s]) for s in sites}
    return Inputs(enc, updates, weights, encoded)


def check_result(total: U32Array, survivors: tuple[str, ...], inputs: Inputs) -> None:
    """The sum is exact, and decodes to FedAvg over the survivors within the documented bound."""
    expected = sum((inputs.encoded[s].astype(np.int64) for s in survivors), np.zeros(DIM, np.int64))
    np.testing.assert_array_equal(total, expected & ((1 << BITS) - 1))
    n = len(survivors)
    mean, weight_total = decode_mean(total, inputs.enc, n)
    c = inputs.enc.clip
    w = np.array([inputs.weights[s] for s in survivors])
    plain = sum(inputs.weights[s] * np.clip(inputs.updates[s].astype(np.float64), -c, c) for s in survivors)
    plain = plain / w.sum()
    assert abs(weight_total - w.sum()) < inputs.enc.error_bound(n) / c
    assert np.abs(mean - plain).max() < inputs.enc.mean_error_bound(n, weight_total)


def tolerance(params: RoundParams) -> int:
    # Full graph: every site holds shares of every other, so up to n - t may drop.
    return params.k + 1 - params.t


STAGES = list(DropPoint)
GONE_BEFORE_INPUT = {DropPoint.ADVERTISE, DropPoint.SHARE_KEYS, DropPoint.MASKED_INPUT}


@pytest.mark.parametrize("stage", STAGES, ids=[s.value for s in STAGES])
@pytest.mark.parametrize("n", [3, 5, 10, pytest.param(20, marks=pytest.mark.slow)])
def test_exact_sum_with_dropouts_up_to_tolerance(n: int, stage: DropPoint) -> None:
    params = full_params(n)
    sites = params.cohort
    inputs = make_inputs(sites, seed=n)
    assert params.k == n - 1
    assert tolerance(params) >= 1
    rng = np.random.default_rng(n * 31 + STAGES.index(stage))
    for m in range(tolerance(params) + 1):
        dropped = [str(s) for s in rng.choice(sites, size=m, replace=False)]
        server, clients = make_round(params)
        total = run_local_round(server, clients, inputs.encoded, dict.fromkeys(dropped, stage))
        survivors = tuple(s for s in sites if s not in dropped or stage not in GONE_BEFORE_INPUT)
        assert server.survivors == survivors, m
        check_result(total, survivors, inputs)


@pytest.mark.parametrize("stage", STAGES, ids=[s.value for s in STAGES])
@pytest.mark.parametrize("n", [3, 5, 10])
def test_one_dropout_beyond_tolerance_aborts(n: int, stage: DropPoint) -> None:
    params = full_params(n)
    server, clients = make_round(params)
    drops = dict.fromkeys(params.cohort[: tolerance(params) + 1], stage)
    with pytest.raises(SecAggAborted, match="aborted"):
        run_local_round(server, clients, make_inputs(params.cohort).encoded, drops)


def test_dropouts_at_every_stage_in_one_round() -> None:
    params = full_params(10)  # t = 6: four of ten may drop
    sites = params.cohort
    drops = {
        sites[1]: DropPoint.ADVERTISE,
        sites[3]: DropPoint.SHARE_KEYS,
        sites[5]: DropPoint.MASKED_INPUT,
        sites[7]: DropPoint.UNMASK,
    }
    assert len(drops) == tolerance(params)
    inputs = make_inputs(sites)
    server, clients = make_round(params)
    total = run_local_round(server, clients, inputs.encoded, drops)
    survivors = tuple(s for s in sites if s not in (sites[1], sites[3], sites[5]))
    assert server.survivors == survivors
    check_result(total, survivors, inputs)


@pytest.mark.parametrize(("n", "k"), [(12, 4), (30, 6)])
def test_sparse_graph_rounds(n: int, k: int) -> None:
    params = RoundParams(JOB, 2, site_names(n), k=k, t=k // 2 + 1, bits=BITS, dim=DIM)
    inputs = make_inputs(params.cohort, seed=k)
    rng = np.random.default_rng(k)
    for stage in STAGES:
        # One dropout leaves every site with >= t holders when t = k/2 + 1.
        dropped = str(rng.choice(params.cohort))
        server, clients = make_round(params)
        total = run_local_round(server, clients, inputs.encoded, {dropped: stage})
        gone = stage in GONE_BEFORE_INPUT
        check_result(total, tuple(s for s in params.cohort if s != dropped or not gone), inputs)


def test_sparse_graph_aborts_when_a_neighbourhood_empties() -> None:
    params = RoundParams(JOB, 2, site_names(12), k=4, t=3, bits=BITS, dim=DIM)
    victim = params.cohort[0]
    neighbours = sorted(params.neighbours_of(victim))
    # Three of the victim's four neighbours stop after sharing keys: it keeps 2 holders (with itself), t = 3.
    drops = dict.fromkeys(neighbours[:3], DropPoint.MASKED_INPUT)
    server, clients = make_round(params)
    with pytest.raises(SecAggAborted, match=f"holders of the self-mask seed of '{victim}'"):
        run_local_round(server, clients, make_inputs(params.cohort).encoded, drops)


def test_sparse_graph_chosen_by_the_rule() -> None:
    params = RoundParams.create(JOB, 5, site_names(70), dim=200, bits=BITS, dropout_rate=0.05, corruption_rate=0.0)
    assert params.k < params.n - 1
    assert all(len(nb) == params.k for nb in params.graph.values())
    sites = params.cohort
    rng = np.random.default_rng(5)
    encoded = {s: rng.integers(0, 1 << BITS, 200, dtype=np.uint64).astype(np.uint32) for s in sites}
    drops = {sites[0]: DropPoint.MASKED_INPUT, sites[1]: DropPoint.UNMASK, sites[2]: DropPoint.ADVERTISE}
    server, clients = make_round(params)
    total = run_local_round(server, clients, encoded, drops)
    expected = sum(encoded[s].astype(np.int64) for s in sites[1:] if s != sites[2])
    np.testing.assert_array_equal(total, np.asarray(expected) & ((1 << BITS) - 1))


def test_chunked_upload_folds_like_a_whole_one_and_retries_are_idempotent() -> None:
    params = full_params(3)
    sites = params.cohort
    inputs = make_inputs(sites)
    server, clients = make_round(params)
    for s in sites:
        ad = clients[s].advertise()
        server.receive_advertisement(s, ad)
        server.receive_advertisement(s, ad)  # a retried message changes nothing
    server.close_advertise()
    for s in sites:
        server.receive_share_keys(s, clients[s].share_keys(server.advertisements_for(s)))
    server.close_share_keys()
    for s in sites:
        clients[s].receive_shares(server.shares_for(s))
        data = clients[s].masked_input(inputs.encoded[s]).data
        chunks = [data[i : i + 37] for i in range(0, len(data), 37)]
        server.receive_masked_chunks(s, chunks)
        server.receive_masked_chunks(s, iter(chunks))  # retry: same bytes, no double counting
        with pytest.raises(AlreadyExists):
            server.receive_masked_chunks(s, [bytes(len(data))])
    u3 = server.close_masked_input()
    for s in sites:
        server.receive_survivor_signature(s, clients[s].consistency_check(u3))
    server.close_consistency()
    for s in sites:
        server.receive_unmask(s, clients[s].unmask(server.signatures_for(s)))
    check_result(server.finish(), sites, inputs)


def test_masked_input_of_wrong_length_is_refused_without_touching_the_sum() -> None:
    params = full_params(3)
    server, clients = make_round(params)
    inputs = make_inputs(params.cohort)
    for s in params.cohort:
        server.receive_advertisement(s, clients[s].advertise())
    server.close_advertise()
    for s in params.cohort:
        server.receive_share_keys(s, clients[s].share_keys(server.advertisements_for(s)))
    server.close_share_keys()
    s0 = params.cohort[0]
    clients[s0].receive_shares(server.shares_for(s0))
    msg = clients[s0].masked_input(inputs.encoded[s0])
    with pytest.raises(InvalidArgument, match="bytes"):
        server.receive_masked_input(s0, type(msg)(s0, msg.data[:-1]))
    server.receive_masked_input(s0, msg)  # the real one is still accepted


def test_sparse_site_left_with_too_few_neighbours_is_left_out() -> None:
    params = RoundParams(JOB, 2, site_names(12), k=4, t=3, bits=BITS, dim=DIM)
    victim = params.cohort[0]
    # Three of the victim's four neighbours never advertise: it could never be unmasked, so the coordinator leaves
    # it out of the round, and any site that leaves short of neighbours in turn; the rest completes.
    drops = dict.fromkeys(sorted(params.neighbours_of(victim))[:3], DropPoint.ADVERTISE)
    inputs = make_inputs(params.cohort)
    server, clients = make_round(params)
    total = run_local_round(server, clients, inputs.encoded, drops)
    assert victim not in server.u1
    assert server.survivors == tuple(sorted(server.u1))
    assert len(server.u1) >= params.n // 2
    assert all(len(params.neighbours_of(s) & server.u1) + 1 >= params.t for s in server.u1)
    check_result(total, server.survivors, inputs)


def test_stream_that_breaks_off_after_folding_aborts_the_round() -> None:
    params = full_params(3)
    inputs = make_inputs(params.cohort)
    server, clients = make_round(params)
    for s in params.cohort:
        server.receive_advertisement(s, clients[s].advertise())
    server.close_advertise()
    for s in params.cohort:
        server.receive_share_keys(s, clients[s].share_keys(server.advertisements_for(s)))
    server.close_share_keys()
    s0 = params.cohort[0]
    clients[s0].receive_shares(server.shares_for(s0))
    data = clients[s0].masked_input(inputs.encoded[s0]).data
    with pytest.raises(SecAggAborted, match="broke off"):
        server.receive_masked_chunks(s0, [data[:1500]])  # too short: part of it is already in the sum
