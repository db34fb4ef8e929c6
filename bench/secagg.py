"""Secure aggregation cost: client masking speed, coordinator unmasking time and peak memory, upload overhead.

Not a test: numbers go into the README. One process plays every site and the coordinator, all in memory, with real
certificates and the real state machines (:mod:`common.secagg`). Dropouts happen after the keys are shared and before
the masked inputs (the costly case for the coordinator: it must rebuild each dropout's mask key and strip its
pairwise masks from every surviving neighbour's input).

    .venv/bin/python bench/secagg.py [--dim 1000000] [--sites 100] [--dropout 0.1] [--bits 24] [--graph rule full]

``rule`` uses k and t from :func:`common.secagg.graph.choose_k_and_t` (SecAgg+; at n = 100 with the default 10%
dropout and 5% corruption rates that is k = 80), ``full`` the complete graph (classic SecAgg, k = n - 1).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import time
import tracemalloc
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
from cryptography.hazmat.primitives import serialization

from common.ca import create_ca, issue_certificate, new_private_key
from common.certs import Role
from common.secagg.encoding import EncodingParams, encode, packed_len
from common.secagg.graph import choose_k_and_t
from common.secagg.prg import apply_masks
from common.secagg.protocol import RoundParams, SecAggClient, SecAggServer

T = TypeVar("T")


def wire_size(msg: Any) -> int:
    """Bytes of ``msg`` as a protobuf message: per field a 1-byte tag, a varint length and the content."""
    if isinstance(msg, str | bytes):
        data = len(msg.encode() if isinstance(msg, str) else msg)
        return 1 + (data.bit_length() + 6) // 7 + data if data else 0
    if isinstance(msg, tuple):
        return sum(wire_size(m) for m in msg)
    body = sum(wire_size(getattr(msg, f.name)) for f in dataclasses.fields(msg))
    return 1 + (body.bit_length() + 6) // 7 + body


def bench_masking(dim: int, bits: int, masks: int = 10, repeat: int = 5) -> tuple[float, float]:
    """(ms per 10**6 coordinates per mask, ms for the bare keystream of 10**6 coordinates)."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    vec = np.zeros(dim, np.uint32)
    seeds = [(bytes([i]) * 32, 1 if i % 2 else -1) for i in range(masks)]
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        apply_masks(vec, seeds, bits)
        best = min(best, time.perf_counter() - t0)
    zeros, out = bytes(4 * dim), bytearray(4 * dim + 15)
    bare = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        Cipher(algorithms.AES(bytes(32)), modes.CTR(bytes(16))).encryptor().update_into(zeros, out)
        bare = min(bare, time.perf_counter() - t0)
    return best / masks / dim * 1e9, bare / dim * 1e9


class Meter:
    """Time and peak traced memory of the coordinator's calls only."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.peak = 0

    def __call__(self, label: str, fn: Callable[..., T], *args: Any) -> T:
        tracemalloc.reset_peak()
        t0 = time.perf_counter()
        result = fn(*args)
        self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - t0
        self.peak = max(self.peak, tracemalloc.get_traced_memory()[1])
        return result


def bench_round(n: int, dim: int, bits: int, dropout: float, k: int, t: int) -> dict[str, float]:
    ca, ca_key = create_ca("bench", 30)
    now = dt.datetime.now(dt.UTC)
    sites = tuple(f"site-{i:03d}" for i in range(n))
    params = RoundParams("bench", 1, sites, k=k, t=t, bits=bits, dim=dim)
    clients = {}
    for s in sites:
        key = new_private_key()
        cert = issue_certificate(
            ca, ca_key, name=s, role=Role.PARTICIPANT, public_key=key.public_key(),
            not_before=now - dt.timedelta(days=1), not_after=now + dt.timedelta(days=1), federation="bench",
        )  # fmt: skip
        clients[s] = SecAggClient(params, s, key, cert.public_bytes(serialization.Encoding.PEM), [ca], now=now)
    enc = EncodingParams.choose(n, 1.0, bits)
    encoded = encode(np.random.default_rng(0).standard_normal(dim).astype(np.float32), enc)  # one input for all
    dropped = set(sites[: round(dropout * n)])
    upload = dict.fromkeys(sites, 0)
    client_s: dict[str, float] = {}

    def client(label: str, site: str, fn: Callable[..., T], *args: Any) -> T:
        t0 = time.perf_counter()
        msg = fn(*args)
        client_s[label] = client_s.get(label, 0.0) + time.perf_counter() - t0
        upload[site] += wire_size(msg)
        return msg

    tracemalloc.start()
    meter = Meter()
    server = meter("setup", lambda: SecAggServer(params, [ca], now=now))
    for s in sites:
        meter("advertise", server.receive_advertisement, s, client("advertise", s, clients[s].advertise))
    meter("advertise", server.close_advertise)
    for s in sites:
        ads = meter("advertise", server.advertisements_for, s)
        meter("share", server.receive_share_keys, s, client("share_keys", s, clients[s].share_keys, ads))
    meter("share", server.close_share_keys)
    for s in sites:
        if s in dropped:
            continue
        clients[s].receive_shares(meter("share", server.shares_for, s))
        masked = client("masked_input", s, clients[s].masked_input, encoded)
        meter("fold", server.receive_masked_input, s, masked)
        del masked
    u3 = meter("consistency", server.close_masked_input)
    for s in u3:
        meter("consistency", server.receive_survivor_signature, s, client("sign", s, clients[s].consistency_check, u3))
    meter("consistency", server.close_consistency)
    for s in u3:
        sigs = meter("unmask", server.signatures_for, s)
        meter("unmask", server.receive_unmask, s, client("unmask", s, clients[s].unmask, sigs))
    total = meter("finish", server.finish)
    tracemalloc.stop()
    expected = (encoded.astype(np.int64) * len(u3)) & ((1 << bits) - 1)
    assert np.array_equal(total, expected), "the unmasked sum is wrong"
    survivor = u3[0]
    return {
        "k": k,
        "t": t,
        "masked_input_ms": client_s["masked_input"] / len(u3) * 1e3,
        "share_keys_ms": client_s["share_keys"] / n * 1e3,
        "fold_s": meter.seconds["fold"],
        "unmask_s": meter.seconds["unmask"] + meter.seconds["finish"],
        "server_total_s": sum(meter.seconds.values()),
        "peak_mib": meter.peak / 2**20,
        "upload_ratio": upload[survivor] / (dim * bits / 8),
        "overhead_kib": (upload[survivor] - packed_len(dim, bits)) / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=1_000_000)
    parser.add_argument("--sites", type=int, default=100)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--corruption", type=float, default=0.05)
    parser.add_argument("--bits", type=int, default=24)
    parser.add_argument("--graph", nargs="+", choices=["rule", "full"], default=["rule", "full"])
    args = parser.parse_args()

    print(f"client masking, d = {args.dim}, b = {args.bits}")
    per_mask, bare = bench_masking(args.dim, args.bits)
    print(f"  {per_mask:.2f} ms per 10^6 coordinates per neighbour (AES-CTR keystream alone: {bare:.2f} ms)\n")

    header = (
        f"{'graph':>5} {'k':>3} {'t':>3} {'mask/site':>10} {'share/site':>10} {'fold':>7} "
        f"{'unmask':>7} {'server':>7} {'peak MiB':>9} {'upload':>7} {'extra':>8}"
    )
    print(f"round: n = {args.sites}, d = {args.dim}, b = {args.bits}, {args.dropout:.0%} dropout after sharing keys")
    print(header)
    for graph in args.graph:
        if graph == "full":
            k, t = choose_k_and_t(args.sites, args.dropout, args.corruption, full_graph_max=args.sites)
        else:
            k, t = choose_k_and_t(args.sites, args.dropout, args.corruption, full_graph_max=0)
        r = bench_round(args.sites, args.dim, args.bits, args.dropout, k, t)
        print(
            f"{graph:>5} {k:>3} {t:>3} {r['masked_input_ms']:>8.0f}ms {r['share_keys_ms']:>8.0f}ms "
            f"{r['fold_s']:>6.2f}s {r['unmask_s']:>6.2f}s {r['server_total_s']:>6.2f}s {r['peak_mib']:>9.1f} "
            f"{r['upload_ratio']:>7.4f} {r['overhead_kib']:>6.1f}KiB"
        )
    print(
        "\nmask/site, share/site: one site's stage time. fold: coordinator unpacking + adding all masked inputs;"
        "\nunmask: checking shares, Shamir, rebuilding keys and stripping masks. server: every coordinator call."
        "\npeak MiB: traced peak during coordinator calls (includes the shared 4-byte-per-coordinate input and the"
        "\nmasked input being folded). upload: all a site sends in the round, protobuf-sized, over b*d/8."
    )


if __name__ == "__main__":
    main()
