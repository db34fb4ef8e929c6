"""Fixed-point encoding into Z_2^b (round trip within the documented bound, no wrap-around at the extremes,
unbiased rounding) and bit packing (exact size, round trip for every b in 16..32, streaming)."""

from __future__ import annotations

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.errors import InvalidArgument
from common.secagg.encoding import (
    EncodingParams,
    Unpacker,
    decode_mean,
    decode_sum,
    encode,
    encode_with_weight_lane_into,
    pack,
    packed_len,
    unpack,
    weight_of,
    with_weight_lane,
)
from common.secagg.prg import BLOCK

bits_st = st.integers(16, 32)


@st.composite
def ring_values(draw: st.DrawFn) -> tuple[int, np.ndarray]:
    bits = draw(bits_st)
    d = draw(st.integers(0, 300))
    values = draw(hnp.arrays(np.uint64, d, elements=st.integers(0, (1 << bits) - 1)))
    return bits, values.astype(np.uint32)


@settings(max_examples=200, deadline=None)
@given(ring_values(), st.integers(1, 64), st.integers(1, 100))
def test_pack_round_trip_and_size(case: tuple[int, np.ndarray], chunk: int, block: int) -> None:
    bits, values = case
    data = pack(values, bits)
    assert len(data) == packed_len(len(values), bits) == -(-len(values) * bits // 8)
    np.testing.assert_array_equal(unpack(data, len(values), bits), values)
    # The same bytes fed in arbitrary chunks, unpacked in pieces of at most `block` values (rounded to 8).
    unpacker, out = Unpacker(len(values), bits, block), np.zeros(len(values), np.uint32)
    for i in range(0, len(data), chunk):
        for start, piece in unpacker.feed(data[i : i + chunk]):
            assert len(piece) <= max(8, block)
            out[start : start + len(piece)] = piece
    unpacker.close()
    np.testing.assert_array_equal(out, values)


@pytest.mark.parametrize("bits", range(16, 33))
def test_pack_layout_is_little_endian_bit_stream(bits: int) -> None:
    values = np.random.default_rng(bits).integers(0, 1 << bits, 37, dtype=np.uint64).astype(np.uint32)
    stream = sum(int(v) << (i * bits) for i, v in enumerate(values))
    assert pack(values, bits) == stream.to_bytes(packed_len(37, bits), "little")


def test_pack_and_unpack_refuse_bad_input() -> None:
    with pytest.raises(InvalidArgument, match="does not fit in 20 bits"):
        pack(np.array([1 << 20], np.uint32), 20)
    with pytest.raises(InvalidArgument, match="take 3 bytes"):
        unpack(b"\x00\x00", 1, 20)
    with pytest.raises(InvalidArgument, match="padding"):
        unpack(b"\x00\x00\xf0", 1, 20)
    with pytest.raises(InvalidArgument, match="bits must be"):
        pack(np.zeros(3, np.uint32), 15)
    unpacker = Unpacker(8, 20)
    with pytest.raises(InvalidArgument, match="longer"):
        unpacker.feed(bytes(21))
    short = Unpacker(8, 20)
    assert list(short.feed(bytes(19))) == []  # not even one 8-value group yet
    with pytest.raises(InvalidArgument, match="ended early"):
        short.close()


@settings(max_examples=100, deadline=None)
@given(
    st.integers(1, 64),
    st.sampled_from([16, 20, 24, 32]),
    st.floats(0.01, 100.0),
    st.lists(st.floats(-1e6, 1e6, width=32), min_size=1, max_size=50),
    st.floats(0.0, 1.0),
    st.data(),
)
def test_encode_decode_within_bound(
    max_n: int, bits: int, clip: float, xs: list[float], weight: float, data: st.DataObject
) -> None:
    if ((1 << (bits - 1)) - 1) // max_n < 1:
        return
    params = EncodingParams.choose(max_n, clip, bits)
    n = data.draw(st.integers(1, max_n))
    x = np.array(xs, np.float32)
    total = np.zeros(len(x), np.int64)
    for _ in range(n):
        total += encode(x, params, weight)
    decoded = decode_sum((total & ((1 << bits) - 1)).astype(np.uint32), params, n)
    exact = n * weight * np.clip(x.astype(np.float64), -params.clip, params.clip)
    assert np.all(np.abs(decoded - exact) < params.error_bound(n) * (1 + 1e-9))


@pytest.mark.parametrize("bits", [16, 24, 32])
def test_no_wrap_at_the_extremes(bits: int) -> None:
    params = EncodingParams.choose(50, 2.0, bits)
    for sign in (1.0, -1.0):
        x = np.full(10, sign * 1e9, np.float32)  # clipped to +-c
        total = sum(encode(x, params).astype(np.int64) for _ in range(50))
        decoded = decode_sum((np.asarray(total) & ((1 << bits) - 1)).astype(np.uint32), params, 50)
        np.testing.assert_allclose(decoded, sign * 100.0)


def test_default_bits_and_scale() -> None:
    small = EncodingParams.choose(64, 1.0)
    assert small.bits == 24
    assert small.levels >= 1 << 16
    assert small.max_n * small.levels <= (1 << 23) - 1
    assert EncodingParams.choose(100_000, 1.0).bits == 32  # not enough room for 16 bits of precision: use all 32
    with pytest.raises(InvalidArgument, match="cannot hold"):
        EncodingParams.choose(1 << 16, 1.0, 16)
    with pytest.raises(InvalidArgument, match="wrap"):
        EncodingParams(bits=16, clip=1.0, max_n=10, levels=4000)
    headroom = EncodingParams.choose(64, 1.0, 24, headroom=1000)
    assert headroom.levels == small.levels - 1000


def test_stochastic_rounding_is_unbiased() -> None:
    params = EncodingParams(bits=32, clip=1.0, max_n=1, levels=10)
    x = np.full(200_000, 0.03, np.float32)  # 0.3 of a unit: rounds to 1 with probability 0.3
    values = decode_sum(encode(x, params), params, 1) * params.scale
    assert set(np.unique(values)) == {0.0, 1.0}
    assert abs(values.mean() - 0.3) < 0.005  # 0.3 +- 5 standard deviations of ~0.001


def test_weights_and_the_weight_lane() -> None:
    assert weight_of(50, 100) == 0.5
    assert weight_of(500, 100) == 1.0
    params = EncodingParams.choose(8, 1.0, 32)
    xs = [np.full(4, 0.5, np.float32), np.full(4, -0.25, np.float32)]
    ws = [1.0, 0.5]
    total = sum(encode(with_weight_lane(x, params), params, w).astype(np.int64) for x, w in zip(xs, ws, strict=True))
    mean, weight_total = decode_mean((np.asarray(total) & 0xFFFFFFFF).astype(np.uint32), params, 2)
    assert abs(weight_total - 1.5) < params.error_bound(2)
    np.testing.assert_allclose(mean, (0.5 - 0.125) / 1.5, atol=params.mean_error_bound(2, weight_total))


def test_encode_refuses_non_finite_and_bad_weights() -> None:
    params = EncodingParams.choose(8, 1.0)
    with pytest.raises(InvalidArgument, match="NaN"):
        encode(np.array([np.nan], np.float32), params)
    with pytest.raises(InvalidArgument, match="weight"):
        encode(np.zeros(2, np.float32), params, 1.5)


@pytest.mark.parametrize("bits", [16, 17, 21, 24, 31, 32])
def test_pack_across_blocks_is_the_blocks_packed_one_after_another(bits: int) -> None:
    # pack works a cache-sized block at a time; BLOCK values take a whole number of bytes, so the stream is the
    # blocks' own streams back to back, and it unpacks (whole and chunked) to the same values.
    d = 3 * BLOCK + 13
    values = np.random.default_rng(bits).integers(0, 1 << bits, d, dtype=np.uint64).astype(np.uint32)
    data = pack(values, bits)
    assert data == b"".join(pack(values[i : i + BLOCK], bits) for i in range(0, d, BLOCK))
    np.testing.assert_array_equal(unpack(data, d, bits), values)
    unpacker, out = Unpacker(d, bits), np.zeros(d, np.uint32)
    for i in range(0, len(data), 1 << 20):
        for start, piece in unpacker.feed(data[i : i + (1 << 20)]):
            out[start : start + len(piece)] = piece
    unpacker.close()
    np.testing.assert_array_equal(out, values)


def test_encode_into_with_the_weight_lane_over_many_blocks() -> None:
    params = EncodingParams.choose(4, 1.0)
    rng = np.random.default_rng(7)
    xs = [rng.normal(0.0, 0.6, 2 * BLOCK + 101).astype(np.float32) for _ in range(3)]
    ws = [1.0, 0.25, 0.5]
    total = np.zeros(len(xs[0]) + 1, np.int64)
    for x, w in zip(xs, ws, strict=True):
        out = np.empty(len(x) + 1, np.uint32)
        encode_with_weight_lane_into(x, params, w, out)
        assert out.max() < 1 << params.bits
        total += out
    mean, weight_total = decode_mean((total & ((1 << params.bits) - 1)).astype(np.uint32), params, 3)
    assert abs(weight_total - sum(ws)) < params.error_bound(3) / params.clip
    exact = sum(w * np.clip(x.astype(np.float64), -1.0, 1.0) for x, w in zip(xs, ws, strict=True)) / sum(ws)
    assert np.all(np.abs(mean - exact) <= params.mean_error_bound(3, weight_total))


def test_encode_into_refuses_a_non_finite_value_in_a_later_block_and_a_wrong_size() -> None:
    params = EncodingParams.choose(4, 1.0)
    x = np.zeros(2 * BLOCK, np.float32)
    x[-1] = np.inf
    with pytest.raises(InvalidArgument, match="NaN or infinite"):
        encode(x, params)
    with pytest.raises(InvalidArgument, match="weight lane"):
        encode_with_weight_lane_into(np.zeros(5, np.float32), params, 1.0, np.empty(5, np.uint32))
