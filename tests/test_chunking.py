"""A model of more than 8 million float32 parameters goes down and up in ~1 MiB chunks, intact."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from big_task import STEP, WIDTH
from support import (
    SITES,
    CoordinatorFactory,
    ParticipantFactory,
    Pki,
    coordinator_config,
    job_config,
    participant_config,
    poll_until,
    runner_of,
)

from common.serde import CHUNK_BYTES

pytestmark = pytest.mark.slow


async def test_large_model_round_trip_through_chunked_streams(
    pki: Pki,
    site_data: dict[str, Path],
    tmp_path: Path,
    coordinator_factory: CoordinatorFactory,
    participant_factory: ParticipantFactory,
) -> None:
    job = job_config(task="big_task:TASK", rounds=1, min_sites=1, evaluate_every=0)
    coord = await coordinator_factory(coordinator_config(pki, tmp_path / "state", job=job))
    runner = runner_of(coord)
    base_version = runner.global_model.version
    base = {k: v.clone() for k, v in runner.global_tensors.items()}
    assert sum(v.numel() for v in base.values()) >= 8_000_000
    assert len(runner.global_model.data) > 30 * CHUNK_BYTES  # it really takes many chunks

    site = SITES[0]
    await participant_factory(participant_config(pki.site(site), coord.address, site_data[site], task="big_task:TASK"))
    await poll_until(lambda: runner.state != "running", timeout=120, what="the job to finish")
    assert runner.state == "finished", runner.detail

    [record] = [r for r in coord.coordinator.store.rounds(runner.job_id) if r.state == "completed"]
    assert record.base_version == base_version
    [upload] = coord.coordinator.store.uploads(runner.job_id, 1, 0)
    assert upload["site"] == site
    final = coord.coordinator.models.load(record.model_version)  # verifies the stored file's digest too
    assert final["weight"].shape == (WIDTH, WIDTH)
    for name, tensor in base.items():
        # One site: the new model is exactly base + its update; the update is exactly STEP everywhere.
        torch.testing.assert_close(final[name], tensor + STEP, rtol=0, atol=1e-6)
