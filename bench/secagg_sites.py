"""One SecAgg+ instance over n virtual sites in one process: what the simulator's driver pays per secure instance.

Not a test: numbers go into bench/results/secagg_sites.md and the README. Every site and the coordinator run in this
process with real certificates (a throwaway CA, as ``cohort simulate`` makes), the demo job's secure-aggregation
settings (b = 32, dropout_rate 0.2, corruption_rate 0: k and t from :func:`common.secagg.graph.choose_k_and_t`) and
the breast-cancer model's size (31 parameters plus the metadata lanes). No site drops out.

Two paths, timed apart (certificates and keys are made before the clock starts):

* ``bare``: the library alone, :func:`common.secagg.local.run_local_round` on its dataclasses;
* ``wire``: what the simulator runs per instance: the coordinator's :class:`coordinator.round.secagg.SecAggRound`
  (protobuf work items out, protobuf messages in) and each site's :class:`participant.secagg_session.SecAggSession`
  (the instance's setup parsed once and shared, as :mod:`simulation.engine` does), the masked training input of every
  site folded into the running sum, and the unmasked FedAvg mean checked.

    .venv/bin/python -m bench.secagg_sites [--sites 100 300 1000] [--paths bare wire] [--profile out.prof]
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import os
import resource
import time
from collections.abc import Callable

import numpy as np

from common.proto.cohort.v1 import cohort_pb2 as pb
from common.secagg.encoding import EncodingParams, encode
from common.secagg.lanes import train_lane_values
from common.secagg.local import run_local_round
from common.secagg.messages import MaskedInput
from common.secagg.protocol import RoundParams, SecAggClient, SecAggServer
from common.secagg_wire import setup_from_proto
from common.serde import EncodedTensors, Spec, new_hasher
from coordinator.config import SecureAggregationConfig
from coordinator.round.secagg import SecAggRound
from participant.secagg_session import SecAggSession, SiteKeys
from simulation.keys import simulation_keys

JOB = "bench-secagg-sites"
MODEL = 31  # the breast-cancer task's logistic regression: 30 weights and a bias
CONFIG = SecureAggregationConfig(enabled=True, bits=32, clip=1.0, weight_cap=1000, dropout_rate=0.2)


def site_names(n: int) -> list[str]:
    return [f"site-{i:05d}" for i in range(n)]


def bare(n: int, keys: dict[str, SiteKeys], now: dt.datetime) -> float:
    """run_local_round over n sites; returns its seconds (params, clients and server included)."""
    sites = site_names(n)
    ca = next(iter(keys.values())).ca_certs
    enc = EncodingParams.choose(n, CONFIG.clip, CONFIG.bits)
    t0 = time.perf_counter()
    params = RoundParams.create(
        JOB, 1, sites, dim=MODEL + 1, bits=CONFIG.bits, dropout_rate=CONFIG.dropout_rate, corruption_rate=0.0
    )
    encoded = encode(np.linspace(-0.5, 0.5, MODEL + 1, dtype=np.float32), enc)
    clients = {s: SecAggClient(params, s, keys[s].key, keys[s].cert_pem, ca, now=now) for s in sites}
    server = SecAggServer(params, ca, now=now)
    total = run_local_round(server, clients, dict.fromkeys(sites, encoded))
    seconds = time.perf_counter() - t0
    expected = (encoded.astype(np.int64) * n) & ((1 << CONFIG.bits) - 1)
    if not np.array_equal(total, expected):
        raise RuntimeError("the unmasked sum is wrong")
    return seconds


def _update(values: np.ndarray) -> EncodedTensors:
    data = values.astype("<f4").tobytes()
    spec = Spec("w", pb.DTYPE_FLOAT32, (len(values),))
    h = new_hasher([spec])
    h.update(data)
    return EncodedTensors((spec,), data, h.hexdigest())


def wire(n: int, keys: dict[str, SiteKeys], now: dt.datetime) -> float:
    """A training instance as the simulator runs it (SecAggRound <-> SecAggSession over protobuf); its seconds."""
    sites = site_names(n)
    ca = list(next(iter(keys.values())).ca_certs)
    t0 = time.perf_counter()
    rnd = SecAggRound.create(JOB, 1, 0, sites, MODEL, CONFIG, ca, now=now.timestamp())
    task = pb.TrainTask(job_id=JOB, round=1, attempt=0, model_version="v", secagg=rnd.setup())
    params, enc, lanes = setup_from_proto(task.job_id, task.round, task.attempt, task.secagg)  # shared, as the engine
    sessions = {
        s: SecAggSession(
            task, params, enc, lanes, int(task.secagg.weight_cap),
            SecAggClient(params, s, keys[s].key, keys[s].cert_pem, keys[s].ca_certs, now=now),
        )
        for s in sites
    }  # fmt: skip

    def deliver(items: dict[str, pb.WorkItem]) -> None:
        for site, item in items.items():
            reply = sessions[site].on_step(item.secagg)
            if reply is not None:
                rnd.receive(site, reply)

    for s in sites:
        rnd.receive(s, sessions[s].advertise())
    deliver(rnd.close_advertise())
    deliver(rnd.close_share_keys())
    update = _update(np.linspace(-0.5, 0.5, MODEL, dtype=np.float32))
    lane_values = train_lane_values(10, 0.5, 0.9, 1.0)
    for s in sites:
        masked = sessions[s].masked_update(update, 10, lane_values)
        rnd.server.receive_masked_input(s, MaskedInput(s, bytes(masked.data)))
    deliver(rnd.close_masked_input())
    deliver(rnd.close_consistency())
    out = rnd.finish()
    seconds = time.perf_counter() - t0
    want = np.linspace(-0.5, 0.5, MODEL, dtype=np.float32)
    if out.mean is None or out.survivors != n or not np.allclose(out.mean[:MODEL], want, atol=1e-3):
        raise RuntimeError("the unmasked mean is wrong")
    return seconds


PATHS: dict[str, Callable[[int, dict[str, SiteKeys], dt.datetime], float]] = {"bare": bare, "wire": wire}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, nargs="+", default=[100, 300, 1000])
    parser.add_argument("--paths", nargs="+", choices=sorted(PATHS), default=["bare", "wire"])
    parser.add_argument("--profile", help="write a cProfile of the last run here")
    args = parser.parse_args()
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    _, keys = simulation_keys(site_names(max(args.sites)))
    now = dt.datetime.now(dt.UTC)
    print(f"{'path':>5} {'n':>5} {'k':>4} {'t':>4} {'seconds':>8}")
    for n in args.sites:
        k_t = RoundParams.create(JOB, 1, site_names(n), dim=1, bits=32, dropout_rate=0.2, corruption_rate=0.0)
        for path in args.paths:
            prof = cProfile.Profile() if args.profile else None
            if prof:
                prof.enable()
            seconds = PATHS[path](n, keys, now)
            if prof:
                prof.disable()
                prof.dump_stats(args.profile)
            print(f"{path:>5} {n:>5} {k_t.k:>4} {k_t.t:>4} {seconds:>8.2f}", flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {peak:.0f} MiB; load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
