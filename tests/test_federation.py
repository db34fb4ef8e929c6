"""End-to-end: a real coordinator and participant daemons over mutual TLS on 127.0.0.1, real torch training."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

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

from common.tasks.base import TrainSettings, load_task, round_seed


async def test_fedavg_matches_independent_weighted_mean(
    pki: Pki,
    site_data: dict[str, Path],
    tmp_path: Path,
    coordinator_factory: CoordinatorFactory,
    participant_factory: ParticipantFactory,
) -> None:
    job = job_config(rounds=2, min_sites=3)
    coord = await coordinator_factory(coordinator_config(pki, tmp_path / "state", job=job))
    sites = SITES[:3]
    for site in sites:
        await participant_factory(participant_config(pki.site(site), coord.address, site_data[site]))
    runner = runner_of(coord)
    await poll_until(lambda: runner.state != "running", timeout=120, what="the job to finish")
    assert runner.state == "finished", runner.detail

    store, models = coord.coordinator.store, coord.coordinator.models
    rounds = [r for r in store.rounds(runner.job_id) if r.state == "completed"]
    assert [r.round for r in rounds] == [1, 2]
    task = load_task("breast_cancer")
    for r in rounds:
        assert sorted(r.reported) == sorted(sites)
        base = models.load(r.base_version)
        settings = TrainSettings(
            local_epochs=job.params.local_epochs,
            batch_size=job.params.batch_size,
            learning_rate=job.params.learning_rate,
            seed=round_seed(job.params.seed, r.round),
        )
        weighted: dict[str, torch.Tensor] = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in base.items()}
        total = 0
        for site in sites:
            data = task.load_data(site_data[site])
            model = task.build_model(seed=0)
            model.load_state_dict(base)
            result = task.train(model, data, settings)
            for k, v in model.state_dict().items():
                weighted[k] += result.num_samples * v.to(torch.float64)
            total += result.num_samples
        expected = {k: v / total for k, v in weighted.items()}
        aggregated = models.load(r.model_version)
        err = max(float((aggregated[k].to(torch.float64) - expected[k]).abs().max()) for k in expected)
        assert err <= 1e-6, f"round {r.round}: max abs error {err}"
        assert r.val_samples  # federated evaluation ran on the validation splits
    jobs = store.jobs()
    assert jobs[-1]["test_samples"] > 0
    assert 0.5 < jobs[-1]["test_accuracy"] <= 1.0


async def test_round_survives_a_dropout_and_the_site_rejoins(
    pki: Pki,
    site_data: dict[str, Path],
    tmp_path: Path,
    coordinator_factory: CoordinatorFactory,
    participant_factory: ParticipantFactory,
) -> None:
    job = job_config(rounds=3, min_sites=2, min_available_sites=3, evaluate_every=0)
    coord = await coordinator_factory(coordinator_config(pki, tmp_path / "state", job=job))
    runner = runner_of(coord)
    store = coord.coordinator.store
    a, b, c = SITES[:3]
    for site in (a, b):
        await participant_factory(participant_config(pki.site(site), coord.address, site_data[site]))
    victim = await participant_factory(participant_config(pki.site(c), coord.address, site_data[c]))

    # The victim trains in round 1, then hangs in round 2 (as if its machine froze) until the test releases it.
    release = threading.Event()
    assert victim.site is not None
    real_train = victim.site.train
    calls = 0

    def train_then_hang(*args: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls >= 2:
            release.wait(timeout=60)
        return real_train(*args)

    victim.site.train = train_then_hang  # type: ignore[method-assign,assignment]
    try:
        await poll_until(lambda: calls >= 2, timeout=60, what="the victim to start round 2")
        await victim.close("simulated crash")
        await poll_until(
            lambda: any(r.round == 2 and r.state == "completed" for r in store.rounds(runner.job_id)),
            timeout=60,
            what="round 2 to complete without the victim",
        )
        # The site comes back with a fresh daemon; round 3 waits for three connected sites.
        await participant_factory(participant_config(pki.site(c), coord.address, site_data[c]))
        await poll_until(lambda: runner.state != "running", timeout=60, what="the job to finish")
    finally:
        release.set()
    assert runner.state == "finished", runner.detail
    rounds = {r.round: r for r in store.rounds(runner.job_id) if r.state == "completed"}
    assert sorted(rounds[2].cohort) == [a, b, c]
    assert sorted(rounds[2].reported) == [a, b]
    assert sorted(rounds[3].reported) == [a, b, c]


async def test_each_upload_is_read_from_disk_once_by_the_fold(
    pki: Pki,
    site_data: dict[str, Path],
    tmp_path: Path,
    coordinator_factory: CoordinatorFactory,
    participant_factory: ParticipantFactory,
    monkeypatch: Any,
) -> None:
    """The spool checks size, digest, finiteness and norm while it writes; only the fold reads the update back."""
    reads: dict[str, int] = {}
    real_open = Path.open

    def counting_open(self: Path, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if self.suffix == ".update" and "r" in mode:
            reads[str(self)] = reads.get(str(self), 0) + 1
        return real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", counting_open)
    job = job_config(rounds=1, min_sites=3, evaluate_every=0)
    coord = await coordinator_factory(coordinator_config(pki, tmp_path / "state", job=job))
    for site in SITES[:3]:
        await participant_factory(participant_config(pki.site(site), coord.address, site_data[site]))
    runner = runner_of(coord)
    await poll_until(lambda: runner.state != "running", timeout=120, what="the job to finish")
    assert runner.state == "finished", runner.detail
    assert sorted(Path(p).name for p in reads) == [f"{s}.update" for s in SITES[:3]]
    assert set(reads.values()) == {1}
