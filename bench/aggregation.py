"""Coordinator aggregation cost: time and peak memory of spool + verify + fold for n uploads of a d-parameter model.

Shows that peak memory does not grow with the number of sites (one float32 running sum plus small buffers), and
how fast the fold runs. Not a test: numbers go into the README.

    .venv/bin/python bench/aggregation.py [--params 1000000] [--sites 10 50 200]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch

from common.serde import CHUNK_BYTES, encode, new_hasher
from coordinator.round.aggregation import Float32Values, RunningSum, UpdateSpool


def run(params: int, sites: int, workdir: Path) -> tuple[float, float, float]:
    specs = encode({"w": torch.zeros(params)}).specs
    rng = np.random.default_rng(0)
    chunk = rng.standard_normal(CHUNK_BYTES // 4, dtype=np.float32).tobytes()
    n_full, rest = divmod(params * 4, CHUNK_BYTES)
    parts = [chunk] * n_full + ([chunk[:rest]] if rest else [])
    hasher = new_hasher(specs)
    for p in parts:
        hasher.update(p)
    sha = hasher.hexdigest()
    tracemalloc.start()
    t0 = time.perf_counter()
    running = RunningSum(specs)
    for i in range(sites):
        spool = UpdateSpool(workdir / f"u{i}", specs, params * 4, sha, 4 << 20, Float32Values())
        for p in parts:
            spool.write(p)  # size, finiteness, L2 norm and digest in one pass
        path = spool.finish()
        running.add_file(path, 1.0)
        path.unlink()
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return seconds, peak / 2**20, params * 4 * sites / 2**20 / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--sites", type=int, nargs="+", default=[10, 50, 200])
    args = parser.parse_args()
    update_mib = args.params * 4 / 2**20
    print(f"model: {args.params:,} float32 parameters = {update_mib:.1f} MiB per update")
    print(f"{'sites':>6} {'seconds':>8} {'peak MiB':>9} {'peak/update':>12} {'MiB/s':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sites:
            seconds, peak, rate = run(args.params, n, Path(tmp))
            print(f"{n:>6} {seconds:>8.2f} {peak:>9.2f} {peak / update_mib:>12.2f} {rate:>8.0f}")


if __name__ == "__main__":
    main()
