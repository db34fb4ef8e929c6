"""Secure aggregation end to end: real daemons over mutual TLS, sites dropping out before and after their masked
input, and a model that equals FedAvg over the survivors within the documented quantisation bound."""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
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

from common.proto.cohort.v1 import cohort_pb2 as pb
from common.secagg.encoding import weight_of
from common.serde import encode
from common.tasks.base import TrainSettings, load_task, round_seed
from coordinator.config import SecureAggregationConfig

SECAGG = SecureAggregationConfig(enabled=True, clip=1.0, weight_cap=1000, stage_timeout_s=30)


def fedavg_over(
    sites: list[str], site_data: dict[str, Path], base: dict[str, torch.Tensor], seed: int, job: Any
) -> tuple[np.ndarray, float]:
    """The exact (clipped, capped-weight) FedAvg of the given sites' updates, computed independently."""
    task = load_task("breast_cancer")
    settings = TrainSettings(
        local_epochs=job.params.local_epochs,
        batch_size=job.params.batch_size,
        learning_rate=job.params.learning_rate,
        seed=seed,
    )
    total = None
    weight_total = 0.0
    for site in sites:
        model = task.build_model(seed=0)
        model.load_state_dict(base)
        result = task.train(model, task.load_data(site_data[site]), settings)
        delta = {k: v.float() - base[k] for k, v in model.state_dict().items()}
        flat = np.frombuffer(encode(delta).data, dtype="<f4").astype(np.float64)
        w = weight_of(result.num_samples, SECAGG.weight_cap)
        contrib = w * np.clip(flat, -SECAGG.clip, SECAGG.clip)
        total = contrib if total is None else total + contrib
        weight_total += w
    assert total is not None
    return total / weight_total, weight_total


async def test_secure_round_with_dropouts_before_and_after_masked_input(
    pki: Pki,
    site_data: dict[str, Path],
    tmp_path: Path,
    coordinator_factory: CoordinatorFactory,
    participant_factory: ParticipantFactory,
) -> None:
    job = replace(job_config(rounds=1, min_sites=3, min_available_sites=5, evaluate_every=0), secure_aggregation=SECAGG)
    coord = await coordinator_factory(coordinator_config(pki, tmp_path / "state", job=job))
    runner = runner_of(coord)
    base = {k: v.clone() for k, v in runner.global_tensors.items()}
    daemons = {
        site: await participant_factory(participant_config(pki.site(site), coord.address, site_data[site]))
        for site in SITES
    }
    before, after = SITES[0], SITES[1]

    # `before` freezes in training (it has advertised and shared its keys, but never sends its masked input).
    site_before = daemons[before].site
    assert site_before is not None
    real_train = site_before.train
    gate = threading.Event()

    def hang(*args: Any) -> Any:
        gate.wait(timeout=60)
        return real_train(*args)

    site_before.train = hang  # type: ignore[method-assign,assignment]
    # `after` sends its masked input, then dies before the consistency check.
    sessions = daemons[after].secagg
    assert sessions is not None
    real_step = sessions.on_step

    async def deaf_after_upload(step: pb.SecAggStep) -> None:
        if step.WhichOneof("stage") in ("survivors", "signatures"):
            return
        await real_step(step)

    sessions.on_step = deaf_after_upload  # type: ignore[method-assign]
    try:

        def keys_shared() -> bool:
            rnd = runner.current_round
            return rnd is not None and rnd.secagg is not None and before in rnd.secagg.u2

        await poll_until(keys_shared, timeout=60, what="stage 1 to close with every site")
        await daemons[before].close("killed before its masked input")
        store = coord.coordinator.store
        await poll_until(
            lambda: any(u["site"] == after for u in store.uploads(runner.job_id, 1, 0)),
            timeout=60,
            what="the masked input of the site that dies after it",
        )
        await daemons[after].close("killed after its masked input")
        await poll_until(lambda: runner.state != "running", timeout=90, what="the job to finish")
    finally:
        gate.set()
    assert runner.state == "finished", runner.detail
    [record] = [r for r in coord.coordinator.store.rounds(runner.job_id) if r.state == "completed"]
    survivors = sorted(record.reported)
    assert before not in survivors
    assert after in survivors  # its masked input is in the sum although it never unmasked
    assert len(survivors) == 4

    expected, weight_total = fedavg_over(survivors, site_data, base, round_seed(job.params.seed, 1), job)
    final = coord.coordinator.models.load(record.model_version)
    got = np.concatenate([(final[k].double() - base[k].double()).reshape(-1).numpy() for k in base])
    from common.secagg.encoding import EncodingParams

    enc = EncodingParams.choose(max_n=5, clip=SECAGG.clip, bits=SECAGG.bits)
    bound = enc.mean_error_bound(len(survivors), weight_total) + 1e-6  # + float32 rounding of the stored model
    err = float(np.abs(got - expected).max())
    assert err <= bound, f"max error {err} exceeds the documented bound {bound}"
    # The coordinator never stored a site's update in the clear: the only upload tensors were masked bytes.
    events = [e["kind"] for e in coord.coordinator.store.audit_events()]
    assert "secagg_aborted" not in events


async def test_substituted_key_makes_sites_abort_and_the_round_is_retried(
    pki: Pki,
    site_data: dict[str, Path],
    tmp_path: Path,
    coordinator_factory: CoordinatorFactory,
    participant_factory: ParticipantFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A coordinator that swaps one site's advertised mask key (to unmask it later) is caught by the sites."""
    from coordinator.round.secagg import SecAggRound

    real_close = SecAggRound.close_advertise
    tampered: list[int] = []

    def substitute_key(self: SecAggRound) -> dict[str, pb.WorkItem]:
        items = real_close(self)
        if not tampered:  # only the first attempt: the retry runs honestly
            tampered.append(self.attempt)
            for item in items.values():
                for ad in item.secagg.advertisements.advertisements:
                    if ad.site == SITES[0]:
                        ad.s_pk = bytes(32)  # not what hospital A signed
        return items

    monkeypatch.setattr(SecAggRound, "close_advertise", substitute_key)
    job = replace(job_config(rounds=1, min_sites=3, min_available_sites=3, evaluate_every=0), secure_aggregation=SECAGG)
    coord = await coordinator_factory(coordinator_config(pki, tmp_path / "state", job=job))
    runner = runner_of(coord)
    for site in SITES[:3]:
        await participant_factory(participant_config(pki.site(site), coord.address, site_data[site]))
    await poll_until(lambda: runner.state != "running", timeout=90, what="the job to finish")
    assert runner.state == "finished", runner.detail
    rounds = coord.coordinator.store.rounds(runner.job_id)
    assert [(r.attempt, r.state) for r in rounds] == [(0, "failed"), (1, "completed")]
    # The sites that saw the substituted key aborted, so they were dropouts of the attempt: too few were left.
    assert any(text in rounds[0].detail for text in ("shared their keys", "dropped out")), rounds[0].detail
    aborts = coord.coordinator.store.audit_events("secagg_site_abort")
    assert aborts, "the sites did not report the tampering"
    assert all(e["detail"]["round"] == 1 for e in aborts)
    assert any(SITES[0] in e["detail"]["reason"] for e in aborts)
