"""The fixed-point running sum (coordinator/round/accumulator.py): exact, so arrival order, chunking and an undone
upload leave no trace; checks in the same pass; the new model written over the sum's own memory."""

from __future__ import annotations

import itertools
import math

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.errors import InvalidArgument
from coordinator.round.accumulator import BLOCK, FixedPointSum, Grid, UploadFold

FINITE = st.floats(-1000, 1000, width=32, allow_nan=False, allow_infinity=False)


@st.composite
def uploads(draw: st.DrawFn) -> tuple[int, list[tuple[np.ndarray, int]]]:
    d = draw(st.integers(1, 40))
    n = draw(st.integers(1, 6))
    ups = [(draw(hnp.arrays(np.float32, d, elements=FINITE)), draw(st.integers(1, 1000))) for _ in range(n)]
    return d, ups


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` split at the given byte offsets (anywhere, also inside a float32)."""
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


def feed(fold: UploadFold, chunks: list[bytes]) -> None:
    for chunk in chunks:
        fold.add(chunk)


def fold_all(d: int, grid: Grid, ups: list[tuple[np.ndarray, int]], cuts: list[int]) -> FixedPointSum:
    total = FixedPointSum(d, grid)
    for values, weight in ups:
        fold = UploadFold(total, weight)
        feed(fold, chunked(values.tobytes(), cuts))
        fold.commit()
    return total


@settings(max_examples=80, deadline=None)
@given(case=uploads(), order=st.randoms(use_true_random=False), cuts=st.lists(st.integers(0, 400), max_size=6))
def test_any_arrival_order_and_chunking_gives_the_same_bits(
    case: tuple[int, list[tuple[np.ndarray, int]]], order: object, cuts: list[int]
) -> None:
    d, ups = case
    grid = Grid.choose(max_uploads=8, max_weight=1000)
    first = fold_all(d, grid, ups, [])
    shuffled = list(ups)
    order.shuffle(shuffled)  # type: ignore[attr-defined]
    second = fold_all(d, grid, shuffled, cuts)
    assert np.array_equal(first.acc, second.acc)
    assert first.total_weight == second.total_weight == sum(w for _, w in ups)
    base = np.linspace(-1, 1, d, dtype=np.float32)
    assert bytes(first.finish(base)) == bytes(second.finish(base))


@settings(max_examples=60, deadline=None)
@given(case=uploads())
def test_the_mean_is_within_the_grid_step_of_the_exact_one(case: tuple[int, list[tuple[np.ndarray, int]]]) -> None:
    d, ups = case
    grid = Grid.choose(max_uploads=8, max_weight=1000)
    total = fold_all(d, grid, ups, [])
    weight = sum(w for _, w in ups)
    exact = sum(values.astype(np.float64) * w for values, w in ups) / weight
    # Each term is rounded to the grid (at most half a step), then divided by the weight total.
    bound = len(ups) * 0.5 / (2.0**grid.frac_bits * weight) + 1e-12 * float(np.max(np.abs(exact), initial=1.0))
    assert float(np.max(np.abs(total.mean() - exact))) <= bound


def test_checks_come_from_the_same_pass() -> None:
    values = np.array([3.0, -4.0, 0.5, 0.0] * 1000, dtype=np.float32)
    fold = UploadFold(FixedPointSum(len(values), Grid.choose(2, 1)), 1)
    fold.add(values.tobytes())
    assert fold.max_abs == 4.0
    assert fold.l2_norm == pytest.approx(float(np.linalg.norm(values.astype(np.float64))), rel=1e-12)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, 2.0**16])
def test_a_refused_upload_is_undone_exactly(bad: float) -> None:
    d = 3 * BLOCK + 17  # several blocks: the bad value sits in the third
    rng = np.random.default_rng(5)
    grid = Grid.choose(max_uploads=4, max_weight=50)
    total = FixedPointSum(d, grid)
    good = rng.standard_normal(d).astype(np.float32)
    kept = UploadFold(total, 7)
    kept.add(good.tobytes())
    kept.commit()
    before = total.acc.copy()

    broken = rng.standard_normal(d).astype(np.float32)
    broken[2 * BLOCK + 5] = bad
    data = broken.tobytes()
    fold = UploadFold(total, 3)
    chunks = [data[start : start + 100_003] for start in range(0, len(data), 100_003)]  # chunks that split values
    with pytest.raises(InvalidArgument, match=r"NaN or Inf|beyond the aggregation range"):
        feed(fold, chunks)  # refused part of the way through the stream
    assert 0 < fold.folded <= 2 * BLOCK + 5  # it got part of the way before the bad block was refused
    fold.undo(data[i : i + 65_537] for i in range(0, len(data), 65_537))
    assert np.array_equal(total.acc, before)
    assert (total.count, total.total_weight) == (1, 7)


def test_a_committed_upload_can_be_taken_back() -> None:
    grid = Grid.choose(max_uploads=4, max_weight=10)
    total = FixedPointSum(5, grid)
    values = np.arange(5, dtype=np.float32) / 3
    fold = UploadFold(total, 2)
    fold.add(values.tobytes())
    fold.commit()
    fold.undo([values.tobytes()])
    assert not total.acc.any()
    assert (total.count, total.total_weight) == (0, 0)


def test_an_upload_of_the_wrong_length_is_not_committed() -> None:
    total = FixedPointSum(4, Grid.choose(2, 1))
    fold = UploadFold(total, 1)
    fold.add(np.ones(3, dtype=np.float32).tobytes() + b"\x00\x00")
    with pytest.raises(InvalidArgument, match="holds 3 values"):
        fold.commit()
    with pytest.raises(InvalidArgument, match="more than the model"):
        fold.add(np.ones(2, dtype=np.float32).tobytes())


def test_finish_writes_the_new_model_over_the_sum() -> None:
    d = 2 * BLOCK + 3
    rng = np.random.default_rng(1)
    grid = Grid.choose(max_uploads=3, max_weight=100)
    ups = [(rng.standard_normal(d).astype(np.float32), w) for w in (10, 30, 60)]
    total = fold_all(d, grid, ups, [])
    base = rng.standard_normal(d).astype(np.float32)
    expected = (base.astype(np.float64) + total.mean()).astype(np.float32)
    model = np.frombuffer(total.finish(base), dtype=np.float32)
    assert np.array_equal(model, expected)
    with pytest.raises(RuntimeError, match="finished"):
        UploadFold(total, 1).add(np.ones(4, dtype=np.float32).tobytes())


def test_a_fixed_denominator_for_dp_fedavg() -> None:
    total = fold_all(2, Grid.choose(4, 1), [(np.array([1.0, -2.0], dtype=np.float32), 1)] * 2, [])
    model = np.frombuffer(total.finish(np.zeros(2, dtype=np.float32), denominator=4.0), dtype=np.float32)
    assert model.tolist() == [0.5, -1.0]


def test_the_grid_leaves_no_room_for_overflow() -> None:
    grid = Grid.choose(max_uploads=20, max_weight=1000)
    assert grid.frac_bits == 62 - 5 - 10 - 16
    # The largest term times the number of uploads stays below 2**62.
    assert grid.max_uploads * grid.limit * grid.max_weight * 2.0**grid.frac_bits < 2.0**62
    assert Grid.choose(max_uploads=20, max_weight=1).frac_bits == 40
    with pytest.raises(ValueError, match="fraction bits"):
        Grid.choose(max_uploads=1 << 20, max_weight=1 << 28)
    total = FixedPointSum(1, Grid.choose(1, 5))
    with pytest.raises(InvalidArgument, match="weight 6"):
        UploadFold(total, 6).add(np.ones(1, dtype=np.float32).tobytes())
    fold = UploadFold(total, 5)
    fold.add(np.full(1, 2.0**16 - 1, dtype=np.float32).tobytes())  # the largest value in range
    fold.commit()
    with pytest.raises(InvalidArgument, match="at most 1 uploads"):
        total.commit(1)
