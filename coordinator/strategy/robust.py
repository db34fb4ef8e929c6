"""Robust aggregation over the round's spooled plaintext updates: rules that a few malicious sites cannot steer.

Every rule returns the round's aggregated update as one flat float64 array (the model's tensors in spec order) and
a report for the round record (which sites were clipped, which Krum kept).

- ``norm_bound`` (with any rule): an update whose L2 norm exceeds the bound is scaled down to it first.
- ``mean``: the sample-weighted mean (FedAvg).
- ``median``: the coordinate-wise median (Yin et al. 2018), unweighted.
- ``trimmed_mean``: per coordinate, drop the ``floor(trim_fraction * n)`` largest and smallest values, average the
  rest (Yin et al. 2018), unweighted.
- ``krum``: the one update with the smallest sum of squared distances to its ``n - f - 2`` nearest neighbours
  (Blanchard et al. 2017); ``multi_krum``: the sample-weighted mean of the ``m`` best-scoring updates.

Memory: the order statistics need every site's value of a coordinate at once. The updates are already on disk (the
round's spool), so the rules read them in blocks of coordinates: ``n`` files x ``block`` values, with the block sized
so the working set stays near ``budget_bytes`` (default 64 MiB) whatever n and the model size are; only Krum's n x n
distance matrix grows with n (8 n^2 bytes: 8 MB at 1,000 sites). The cost is reading each update once per pass
(norms, then the rule; Krum a third time to average what it kept), against one pass for the plain mean.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.errors import InvalidArgument
from coordinator.strategy.config import StrategyConfig

BUDGET_BYTES = 64 << 20


@dataclass(frozen=True)
class RobustResult:
    delta: np.ndarray
    report: dict[str, object] = field(default_factory=dict)


class Updates:
    """The round's accepted updates: one spooled float32 file per site, each of ``numel`` values."""

    def __init__(self, files: Mapping[str, Path], weights: Mapping[str, float], numel: int) -> None:
        self.sites = sorted(files)
        self.files, self.weights, self.numel = dict(files), dict(weights), numel
        self.scale = dict.fromkeys(self.sites, 1.0)

    def block(self, site: str, start: int, count: int) -> np.ndarray:
        with self.files[site].open("rb") as f:
            f.seek(4 * start)
            raw = f.read(4 * count)
        if len(raw) != 4 * count:
            raise InvalidArgument(f"site {site}'s spooled update is shorter than the model ({self.numel} values)")
        return np.frombuffer(raw, dtype="<f4").astype(np.float64) * self.scale[site]

    def blocks(self, budget: int = BUDGET_BYTES) -> list[tuple[int, int]]:
        per = max(1024, budget // (8 * max(1, len(self.sites))))
        return [(s, min(per, self.numel - s)) for s in range(0, self.numel, per)]

    def matrix(self, start: int, count: int) -> np.ndarray:
        """Rows: sites (sorted); columns: coordinates ``[start, start + count)``."""
        return np.stack([self.block(site, start, count) for site in self.sites])


def aggregate(cfg: StrategyConfig, updates: Updates, budget: int = BUDGET_BYTES) -> RobustResult:
    if not updates.sites:
        raise ValueError("no update was accepted")
    report: dict[str, object] = {}
    if cfg.norm_bound > 0:
        clipped = bound_norms(updates, cfg.norm_bound, budget)
        report["norm_bound"] = cfg.norm_bound
        report["clipped_sites"] = clipped
    rule = cfg.aggregation
    if rule == "mean":
        return RobustResult(weighted_mean(updates, updates.sites, budget), report)
    if rule in ("median", "trimmed_mean"):
        trim = math.floor(cfg.trim_fraction * len(updates.sites)) if rule == "trimmed_mean" else 0
        out = np.empty(updates.numel, dtype=np.float64)
        for start, count in updates.blocks(budget):
            values = updates.matrix(start, count)
            if rule == "median":
                out[start : start + count] = np.median(values, axis=0)
            else:
                ordered = np.sort(values, axis=0)
                out[start : start + count] = ordered[trim : len(updates.sites) - trim].mean(axis=0)
        if rule == "trimmed_mean":
            report["trimmed_per_side"] = trim
        return RobustResult(out, report)
    kept = krum(updates, cfg.byzantine_sites, budget)
    keep = 1 if rule == "krum" else (cfg.multi_krum_keep or len(updates.sites) - cfg.byzantine_sites)
    chosen = sorted(kept[:keep])
    report["krum_selected"] = chosen
    return RobustResult(weighted_mean(updates, chosen, budget), report)


def bound_norms(updates: Updates, bound: float, budget: int = BUDGET_BYTES) -> list[str]:
    """Scale every update whose L2 norm exceeds ``bound`` down to it; the sites so scaled."""
    squares = dict.fromkeys(updates.sites, 0.0)
    for start, count in updates.blocks(budget):
        for site in updates.sites:
            values = updates.block(site, start, count)
            squares[site] += float(values @ values)
    clipped = []
    for site, sq in squares.items():
        norm = math.sqrt(sq)
        if norm > bound:
            updates.scale[site] = bound / norm
            clipped.append(site)
    return clipped


def weighted_mean(updates: Updates, sites: list[str], budget: int = BUDGET_BYTES) -> np.ndarray:
    total = sum(updates.weights[s] for s in sites)
    if total <= 0:
        raise ValueError("the kept updates carry no weight")
    out = np.zeros(updates.numel, dtype=np.float64)
    for start, count in updates.blocks(budget):
        for site in sites:
            out[start : start + count] += updates.weights[site] * updates.block(site, start, count)
    return out / total


def krum(updates: Updates, f: int, budget: int = BUDGET_BYTES) -> list[str]:
    """Sites ordered by Krum score, best first (ties by site id)."""
    n = len(updates.sites)
    if n < 2 * f + 3:
        raise InvalidArgument(f"Krum tolerating {f} malicious sites needs at least {2 * f + 3} updates, got {n}")
    dist = np.zeros((n, n), dtype=np.float64)
    for start, count in updates.blocks(budget):
        x = updates.matrix(start, count)
        sq = np.einsum("ij,ij->i", x, x)
        dist += sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)
    np.maximum(dist, 0.0, out=dist)
    neighbours = n - f - 2
    scores = []
    for i, site in enumerate(updates.sites):
        others = np.delete(dist[i], i)
        scores.append((float(np.sort(others)[:neighbours].sum()), site))
    return [site for _, site in sorted(scores)]
