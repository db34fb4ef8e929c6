"""Masks (AES-CTR PRG) cancel exactly in the sum; keys are bound to job, round, pair and purpose; the neighbour
graph is k-regular, symmetric and reproducible; k and t meet the documented conditions."""

from __future__ import annotations

import math
from fractions import Fraction

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.errors import InvalidArgument
from common.secagg import keys
from common.secagg.graph import binom_tail_above, choose_k_and_t, graph_seed, neighbours, threshold
from common.secagg.prg import MaskStream, apply_mask, apply_masks, mask_of

seeds = st.binary(min_size=32, max_size=32)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(16, 32),
    st.lists(seeds, min_size=2, max_size=6, unique=True),
    hnp.arrays(np.uint64, st.integers(1, 3000), elements=st.integers(0, 2**32 - 1)),
)
def test_pairwise_masks_cancel_in_the_sum(bits: int, site_seeds: list[bytes], raw: np.ndarray) -> None:
    low = (1 << bits) - 1
    n, d = len(site_seeds), len(raw)
    inputs = [((raw + i * 7919) & low).astype(np.uint32) for i in range(n)]
    total = np.zeros(d, np.uint32)
    for i in range(n):
        y = inputs[i].copy()
        # Pair seed from the two sites' seeds; i < j adds, i > j subtracts, as in the protocol.
        pairs = [
            (keys.derive(site_seeds[min(i, j)] + site_seeds[max(i, j)], "mask", "j", 1, "a", "b"), 1 if i < j else -1)
            for j in range(n)
            if j != i
        ]
        apply_masks(y, pairs, bits)
        assert int(y.max()) <= low
        total += y
    expected = sum(x.astype(np.int64) for x in inputs) & low
    np.testing.assert_array_equal(total & low, expected)


@settings(max_examples=30, deadline=None)
@given(seeds, st.integers(1, 5000), st.integers(1, 700))
def test_mask_is_independent_of_the_block_size(seed: bytes, d: int, block: int) -> None:
    big, small = np.zeros(d, np.uint32), np.zeros(d, np.uint32)
    MaskStream().apply(big, [(seed, 1)], 32)
    MaskStream(block).apply(small, [(seed, 1)], 32)
    np.testing.assert_array_equal(big, small)
    apply_mask(small, seed, -1, 32)
    assert not small.any()


def test_mask_bits_and_errors() -> None:
    m = mask_of(bytes(32), 10_000, 17)
    assert int(m.max()) < 1 << 17
    assert int(m.max()) > 1 << 16
    with pytest.raises(InvalidArgument, match="32 bytes"):
        apply_mask(np.zeros(3, np.uint32), b"short", 1, 24)
    with pytest.raises(InvalidArgument, match="uint32"):
        apply_mask(np.zeros(3, np.int64), bytes(32), 1, 24)
    with pytest.raises(InvalidArgument, match="sign"):
        apply_mask(np.zeros(3, np.uint32), bytes(32), 2, 24)


def test_derived_keys_differ_by_job_round_pair_and_purpose() -> None:
    shared = bytes(range(32))
    base = keys.derive(shared, "mask", "job", 1, "a", "b")
    assert base == keys.derive(shared, "mask", "job", 1, "b", "a")  # the pair is unordered
    others = [
        keys.derive(shared, "share-enc", "job", 1, "a", "b"),
        keys.derive(shared, "mask", "job2", 1, "a", "b"),
        keys.derive(shared, "mask", "job", 2, "a", "b"),
        keys.derive(shared, "mask", "job", 1, "a", "c"),
    ]
    assert len({base, *others}) == 5
    with pytest.raises(InvalidArgument):
        keys.derive(shared, "other", "job", 1, "a", "b")


def test_canonical_encoding_is_injective_on_tricky_cases() -> None:
    assert keys.canonical("ab", "c") != keys.canonical("a", "bc")
    assert keys.canonical("1") != keys.canonical(1)
    assert keys.canonical(b"x") != keys.canonical("x")


SITES = tuple(f"s{i:03d}" for i in range(100))


@pytest.mark.parametrize(("n", "k"), [(10, 4), (50, 8), (100, 34), (100, 99), (7, 6)])
def test_graph_is_k_regular_symmetric_and_reproducible(n: int, k: int) -> None:
    cohort = SITES[:n]
    seed = graph_seed("job", 3, cohort)
    graph = neighbours(cohort, k, seed)
    assert graph == neighbours(list(reversed(cohort)), k, seed)  # depends on the set, not the order given
    for site, nb in graph.items():
        assert len(nb) == min(k, n - 1)
        assert site not in nb
        assert all(site in graph[j] for j in nb)
    if k < n - 1:
        assert graph != neighbours(cohort, k, graph_seed("job", 4, cohort))  # fresh each round


def test_graph_refuses_odd_sparse_degree() -> None:
    with pytest.raises(InvalidArgument, match="even"):
        neighbours(SITES[:10], 3, bytes(32))


@pytest.mark.parametrize("n", [2, 3, 5, 10, 20, 64])
def test_full_graph_threshold(n: int) -> None:
    k, t = choose_k_and_t(n, 0.1, 0.0)
    assert (k, t) == (n - 1, n // 2 + 1)
    k, t = choose_k_and_t(n, 0.1, 0.2)
    corrupt = -(-n * 2 // 10)
    assert k == n - 1
    assert 2 * t > k + 1 + min(corrupt, k)


@pytest.mark.parametrize(("n", "dropout", "corrupt"), [(100, 0.1, 0.0), (1000, 0.1, 0.05), (5000, 0.05, 0.01)])
def test_sparse_k_and_t_meet_the_documented_conditions(n: int, dropout: float, corrupt: float) -> None:
    k, t = choose_k_and_t(n, dropout, corrupt)
    assert k < n - 1
    assert k % 2 == 0
    c = next(c for c in range(k + 1) if n * binom_tail_above(k, corrupt, c) <= 2**-40)
    assert t == threshold(k, c)
    assert 2 * t > k + 1 + c
    assert n * binom_tail_above(k, dropout, k - t) <= 2**-20
    assert n * (dropout + corrupt) ** (k // 2) <= 2**-40
    assert k <= 100  # O(log n), not O(n)


def test_rates_are_checked() -> None:
    with pytest.raises(InvalidArgument):
        choose_k_and_t(10, 0.6, 0.5)
    with pytest.raises(InvalidArgument):
        choose_k_and_t(1, 0.1, 0.0)


def exact_tail_above(k: int, p: Fraction, c: int) -> Fraction:
    """P[Binomial(k, p) > c] in exact rational arithmetic (no floating point, no log space)."""
    return sum((math.comb(k, i) * p**i * (1 - p) ** (k - i) for i in range(c + 1, k + 1)), Fraction(0))


def rule_holds_without_corruption(n: int, k: int, dropout: Fraction) -> bool:
    """The module docstring's conditions for a sparse k with no corrupt sites (c = 0), checked exactly."""
    t = threshold(k, 0)
    connected = n * dropout ** (k // 2) <= Fraction(1, 2**40)
    robust = t <= k and n * exact_tail_above(k, dropout, k - t) <= Fraction(1, 2**20)
    return connected and robust


def test_the_demo_job_at_1000_sites_gets_k_84() -> None:
    """deploy/demo/coordinator.yaml: dropout_rate 0.2, corruption_rate 0 (the default). At n = 1,000 the smallest even k
    that meets the rule is 84 (t = 43), checked here exactly; 194 is what the rule gives with a 5 % corruption rate."""
    assert choose_k_and_t(1000, 0.2, 0.0) == (84, 43)
    assert rule_holds_without_corruption(1000, 84, Fraction(1, 5))
    assert not any(rule_holds_without_corruption(1000, k, Fraction(1, 5)) for k in range(2, 84, 2))
    assert choose_k_and_t(1000, 0.2, 0.05) == (194, 119)
