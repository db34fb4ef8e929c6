"""Streaming FedAvg: the running sum is exact, refuses bad streams without side effects, and holds O(model)."""

from __future__ import annotations

import os
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from common.errors import InvalidArgument
from common.serde import CHUNK_BYTES, decode, encode, new_hasher
from coordinator.round.aggregation import Float32Values, RunningSum, SpoolWriter, UpdateSpool
from coordinator.round.runner import step_model
from coordinator.strategy.config import StrategyConfig
from coordinator.strategy.server_opt import OptimizerState


def _spool(tmp_path: Path, name: str, tensors: dict[str, torch.Tensor]) -> Path:
    enc = encode(tensors)
    spool = UpdateSpool(tmp_path / name, enc.specs, len(enc.data), enc.sha256, max_chunk=4 << 20)
    for chunk in enc.chunks():
        spool.write(bytes(chunk))
    return spool.finish()


def test_running_sum_is_the_weighted_mean(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(300, 70, generator=gen), "b": torch.randn(70, generator=gen)}
    updates = [{k: torch.randn(v.shape, generator=gen) for k, v in base.items()} for _ in range(4)]
    weights = [10.0, 3.0, 250.0, 1.0]
    running = RunningSum(encode(base).specs)
    for i, (u, w) in enumerate(zip(updates, weights, strict=True)):
        running.add_file(_spool(tmp_path, f"u{i}", u), w)
    result = running.apply_to(base)
    for k in base:
        expected = base[k].double() + sum(w * u[k].double() for u, w in zip(updates, weights, strict=True)) / sum(
            weights
        )
        torch.testing.assert_close(result[k].double(), expected, rtol=0, atol=1e-6)


def test_spool_refuses_tampering_and_leaves_nothing(tmp_path: Path) -> None:
    enc = encode({"w": torch.ones(1000)})
    spool = UpdateSpool(tmp_path / "x", enc.specs, len(enc.data), enc.sha256, max_chunk=4 << 20)
    spool.write(bytes(enc.data[:-4]) + b"\x00\x00\x80\x7f")  # last value replaced by +Inf
    with pytest.raises(InvalidArgument, match="digest mismatch"):
        spool.finish()
    spool.discard()
    assert list(tmp_path.iterdir()) == []

    spool = UpdateSpool(tmp_path / "y", enc.specs, len(enc.data), enc.sha256, max_chunk=4 << 20)
    with pytest.raises(InvalidArgument, match="more than"):
        spool.write(bytes(enc.data) + b"1234")
    spool.discard()
    spool = UpdateSpool(tmp_path / "z", enc.specs, len(enc.data), enc.sha256, max_chunk=4 << 20)
    spool.write(bytes(enc.data[:100]))
    with pytest.raises(InvalidArgument, match="ended after"):
        spool.finish()
    spool.discard()
    assert list(tmp_path.iterdir()) == []


def test_non_finite_updates_are_refused_while_spooling(tmp_path: Path) -> None:
    enc = encode({"w": torch.tensor([1.0, 3.0, float("nan"), 2.0])})
    spool = UpdateSpool(tmp_path / "nan", enc.specs, len(enc.data), enc.sha256, 4 << 20, Float32Values())
    spool.write(bytes(enc.data[:6]))  # the NaN is split across two chunks
    with pytest.raises(InvalidArgument, match="NaN or Inf"):
        spool.write(bytes(enc.data[6:]))
    spool.discard()
    assert list(tmp_path.iterdir()) == []


def test_values_are_checked_in_the_same_pass_as_the_digest(tmp_path: Path) -> None:
    """Finite check and L2 norm come from the bytes as they stream in, whatever the chunk boundaries."""
    x = torch.randn(1001)
    enc = encode({"w": x})
    for cut in (1, 3, 4, 7, 2000):
        values = Float32Values()
        spool = UpdateSpool(tmp_path / f"u{cut}", enc.specs, len(enc.data), enc.sha256, 4 << 20, values)
        for i in range(0, len(enc.data), cut):
            spool.write(bytes(enc.data[i : i + cut]))
        spool.finish()
        assert values.l2_norm == pytest.approx(float(x.double().norm()), rel=1e-12)


def _block(upload: int, start: int, numel: int) -> np.ndarray:
    """Chunk ``start`` of upload ``upload``, regenerated on demand so the test never holds a whole update."""
    n = min(CHUNK_BYTES // 4, numel - start)
    return np.random.default_rng([upload, start]).standard_normal(n, dtype=np.float32)


@pytest.mark.slow
def test_aggregator_memory_is_one_running_sum_not_the_list_of_updates(tmp_path: Path) -> None:
    """50 uploads of a 1M-parameter model through the real spool + fold path: peak traced memory < 3x one update."""
    numel = 1_000_000
    update_bytes = numel * 4
    specs = encode({"w": torch.zeros(numel)}).specs
    starts = range(0, numel, CHUNK_BYTES // 4)
    tracemalloc.start()
    try:
        running = RunningSum(specs)
        for i in range(50):
            hasher = new_hasher(specs)
            for start in starts:
                hasher.update(_block(i, start, numel).tobytes())
            spool = UpdateSpool(tmp_path / f"u{i}", specs, update_bytes, hasher.hexdigest(), max_chunk=4 << 20)
            for start in starts:  # the chunks as the gRPC stream delivers them
                spool.write(_block(i, start, numel).tobytes())
            path = spool.finish()
            running.add_file(path, 1.0 + i % 3)
            path.unlink()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert running.count == 50
    assert peak < 3 * update_bytes, f"peak {peak / 2**20:.1f} MiB for updates of {update_bytes / 2**20:.1f} MiB"
    # And the sum is right (checked after tracing, chunk by chunk).
    mean = running.mean()
    for start in starts:
        total = np.zeros(len(_block(0, start, numel)))
        for i in range(50):
            total += (1.0 + i % 3) * _block(i, start, numel).astype(np.float64)
        expected = total / sum(1.0 + i % 3 for i in range(50))
        np.testing.assert_allclose(mean[start : start + len(expected)], expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("server_lr", [1.0, 0.7])
def test_the_fedavg_step_reads_the_sum_block_by_block_and_gives_the_same_bits(tmp_path: Path, server_lr: float) -> None:
    """The commit's plain-FedAvg path (no model-sized float64 copies) makes exactly the model that
    ``float32(float64(base) + eta * float64(sum) / total_weight)`` gives, and it is its own wire encoding."""
    gen = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(300, 700, generator=gen), "b": torch.randn(3, generator=gen), "c": torch.randn(70001)}
    specs = encode(base).specs
    running = RunningSum(specs)
    for i, w in enumerate([2.0, 7.0, 0.5]):
        running.add_file(
            _spool(tmp_path, f"u{i}", {k: torch.randn(v.shape, generator=gen) for k, v in base.items()}), w
        )
    strategy = StrategyConfig(server_lr=server_lr)
    delta = running.mean()  # the whole-array path, as the server optimizers use it
    new, state, ref = step_model(strategy, running, OptimizerState(4), base, specs, None, {})
    assert (state.step, ref) == (5, {"step": 5})
    offset = 0
    for name, tensor in decode(new.specs, new.data).items():
        n = tensor.numel()
        want = (base[name].double().reshape(-1) + server_lr * torch.from_numpy(delta[offset : offset + n])).float()
        assert torch.equal(tensor.reshape(-1), want), name
        offset += n
    assert new.version == encode(decode(new.specs, new.data)).version
    via_array, _, _ = step_model(strategy, delta, OptimizerState(4), base, specs, None, {})
    assert via_array.data == new.data


def test_the_fedavg_step_allocates_the_new_model_and_small_blocks_only(tmp_path: Path) -> None:
    numel = 2_000_000
    base = {"w": torch.randn(numel)}
    specs = encode(base).specs
    running = RunningSum(specs)
    running.add_file(_spool(tmp_path, "u", {"w": torch.randn(numel)}), 3.0)
    tracemalloc.start()
    try:
        new, _, _ = step_model(StrategyConfig(), running, OptimizerState(), base, specs, None, {})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(new.data) == numel * 4
    # The new model is the sum's own buffer; the model-sized float64 mean alone was 2x the model (4x while divided).
    assert peak < 0.2 * numel * 4, f"peak {peak / 2**20:.1f} MiB for a model of {numel * 4 / 2**20:.1f} MiB"


async def test_the_threaded_spool_writer_keeps_order_refuses_and_leaves_nothing(tmp_path: Path) -> None:
    x = torch.randn(50_000)
    enc = encode({"w": x})
    writer = SpoolWriter(UpdateSpool(tmp_path / "ok", enc.specs, len(enc.data), enc.sha256, 4 << 20, Float32Values()))
    for i in range(0, len(enc.data), 4099):  # odd chunk sizes: values split across chunks, digest over the order
        await writer.write(bytes(enc.data[i : i + 4099]))
    path = await writer.finish()
    assert path.read_bytes() == enc.data

    bad = encode({"w": torch.tensor([1.0, float("inf")] * 5000)})
    writer = SpoolWriter(UpdateSpool(tmp_path / "bad", bad.specs, len(bad.data), bad.sha256, 4 << 20, Float32Values()))

    async def stream_it() -> None:
        for i in range(0, len(bad.data), 1000):
            await writer.write(bytes(bad.data[i : i + 1000]))
        await writer.finish()

    with pytest.raises(InvalidArgument, match="NaN or Inf"):
        await stream_it()
    writer.discard()
    assert sorted(os.listdir(tmp_path)) == ["ok"]
