"""Who shares keys with whom: the SecAgg+ neighbour graph, and the choice of its degree k and threshold t.

Classic SecAgg (Bonawitz et al. 2017) has every site mask with and share secrets among all n-1 others: O(n) work
per site and O(n**2) at the coordinator. SecAgg+ (Bell et al. 2020) uses a sparse random k-regular graph instead.
Here it is the circulant (Harary) graph: the cohort is put in a random ring order and each site is joined to the k/2
sites on either side. The order is drawn from public per-round randomness (SHA-256 of job, round and cohort), so
every site recomputes the whole graph itself and a coordinator cannot hand a victim a neighbourhood of its choosing.
For n <= ``full_graph_max`` (64) the graph is complete: the cost is small there and it is Bonawitz's protocol.

**Holders and threshold.** A site's two secrets (its mask key and its self-mask seed) are t-of-(k+1) Shamir-shared
among its k neighbours and itself. The coordinator needs t shares to remove a survivor's self mask or a dropped site's
pairwise masks. Conditions (c = how many of a site's k neighbours may be corrupt, colluding with the coordinator):

* **Privacy against collusion and a malicious coordinator: t > (k + 1 + c) / 2.** To unmask one honest site the
  coordinator needs t shares of *both* secrets. An honest holder reveals at most one of the two for any site (never
  both; the site itself never reveals its mask key), corrupt holders may reveal both, so it gets at most
  (k + 1 - c) + 2c = k + 1 + c shares in all, fewer than 2t. This also gives t > c: colluders alone learn nothing.
* **Robustness: the round survives while every site whose secret is needed keeps >= t live holders.** A survivor
  counts itself; a dropped site needs t live neighbours. So up to k + 1 - t holders may drop.
* **SecAgg+ only, connectivity.** If the honest survivors' graph split into parts, the coordinator could learn the
  sum of each part. In the ring order, the circulant graph stays connected unless k/2 consecutive sites are all
  dropped or corrupt; by a union bound over the n starting places that happens with probability <= n * (d + g)**(k/2)
  for dropout rate d and corruption rate g.

**Concrete rule** (:func:`choose_k_and_t`). Full graph: k = n - 1, c = min(k, ceil(g * n)) (a worst-case count),
t = floor((k + 1 + c) / 2) + 1. SecAgg+: the smallest even k for which, with sites dropping with probability d and
corrupt with probability g independently (Bell et al.'s model),

* c = the smallest integer with n * P[Binomial(k, g) > c] <= 2**-sigma (sigma = 40: privacy failure),
* t = floor((k + 1 + c) / 2) + 1,
* n * P[Binomial(k, 1 - d) < t] <= 2**-eta (eta = 20: a round aborting for lack of shares), and
* n * (d + g)**(k/2) <= 2**-sigma;

if no k < n - 1 qualifies, the full graph. k grows like O(log n), as in Bell et al.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence

from common.errors import InvalidArgument
from common.secagg.keys import canonical

FULL_GRAPH_MAX = 64
SIGMA = 40  # -log2 of the tolerated probability of a privacy failure
ETA = 20  # -log2 of the tolerated probability that a round aborts for lack of shares


def graph_seed(job_id: str, round_no: int, cohort: Sequence[str]) -> bytes:
    """The public randomness of a round's graph: SHA-256 over job, round and the sorted cohort."""
    return hashlib.sha256(canonical("cohort-secagg-graph-v1", job_id, round_no, *sorted(cohort))).digest()


def _u64_stream(seed: bytes) -> Iterator[int]:
    counter = 0
    while True:
        block = hashlib.sha256(seed + counter.to_bytes(8, "big")).digest()
        for i in range(0, 32, 8):
            yield int.from_bytes(block[i : i + 8], "big")
        counter += 1


def ring_order(cohort: Sequence[str], seed: bytes) -> list[str]:
    """A uniformly random order of the sorted cohort (Fisher-Yates with rejection sampling, so no modulo bias)."""
    order = sorted(cohort)
    draws = _u64_stream(seed)
    for i in range(len(order) - 1, 0, -1):
        bound = i + 1
        limit = (2**64 // bound) * bound
        r = next(draws)
        while r >= limit:
            r = next(draws)
        j = r % bound
        order[i], order[j] = order[j], order[i]
    return order


def neighbours(cohort: Sequence[str], k: int, seed: bytes) -> dict[str, frozenset[str]]:
    """Each site's neighbours: the complete graph if k >= n - 1, else the k-regular circulant graph (k even)."""
    n = len(cohort)
    if len(set(cohort)) != n:
        raise InvalidArgument("the cohort lists a site twice")
    if k >= n - 1:
        everyone = frozenset(cohort)
        return {s: everyone - {s} for s in cohort}
    if k < 2 or k % 2:
        raise InvalidArgument(f"a sparse SecAgg+ graph needs an even degree k >= 2, got {k}")
    order = ring_order(cohort, seed)
    half = k // 2
    return {
        site: frozenset(order[(i + off) % n] for off in range(-half, half + 1) if off) for i, site in enumerate(order)
    }


def _log_binom_pmf(k: int, i: int, p: float) -> float:
    return math.lgamma(k + 1) - math.lgamma(i + 1) - math.lgamma(k - i + 1) + i * math.log(p) + (k - i) * math.log1p(-p)


def binom_tail_above(k: int, p: float, c: int) -> float:
    """P[Binomial(k, p) > c], summed in log space so large k do not overflow."""
    if c >= k:
        return 0.0
    if c < 0:
        return 1.0
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    logs = [_log_binom_pmf(k, i, p) for i in range(c + 1, k + 1)]
    top = max(logs)
    return min(1.0, math.exp(top) * sum(math.exp(v - top) for v in logs))


def _check_rates(dropout_rate: float, corruption_rate: float) -> None:
    for name, value in (("dropout_rate", dropout_rate), ("corruption_rate", corruption_rate)):
        if not 0.0 <= value < 1.0:
            raise InvalidArgument(f"{name} must be in [0, 1), got {value!r}")
    if dropout_rate + corruption_rate >= 1.0:
        raise InvalidArgument("dropout_rate + corruption_rate must be below 1")


def threshold(k: int, corrupt: int) -> int:
    """The smallest t with t > (k + 1 + corrupt) / 2: the privacy condition for k neighbours plus the site itself."""
    return (k + 1 + corrupt) // 2 + 1


def choose_k_and_t(
    n: int,
    dropout_rate: float,
    corruption_rate: float,
    *,
    full_graph_max: int = FULL_GRAPH_MAX,
    sigma: int = SIGMA,
    eta: int = ETA,
) -> tuple[int, int]:
    """The neighbour count k and Shamir threshold t for a round of ``n`` sites (rules in the module docstring)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise InvalidArgument(f"secure aggregation needs at least 2 sites, got {n!r}")
    _check_rates(dropout_rate, corruption_rate)
    if n > full_graph_max:
        priv, fail = 2.0**-sigma / n, 2.0**-eta / n
        bad = dropout_rate + corruption_rate
        for k in range(2, n - 1, 2):
            if bad > 0 and (k // 2) * math.log2(bad) > math.log2(priv):
                continue  # the ring could break into pieces
            corrupt = next(c for c in range(k + 1) if binom_tail_above(k, corruption_rate, c) <= priv)
            t = threshold(k, corrupt)
            # Fewer than t live neighbours means more than k - t of them dropped.
            if t <= k and binom_tail_above(k, dropout_rate, k - t) <= fail:
                return k, t
    k = n - 1
    corrupt = min(k, math.ceil(corruption_rate * n))
    return k, threshold(k, corrupt)
