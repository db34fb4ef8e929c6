"""Site-level differential privacy over real daemons: clipping, central noise, the accountant and the budget."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import grpc
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

from cohort_cli.admin_client import AdminEndpoint, start_job
from common.privacy.accounting import Accountant, PrivacyEvent
from common.proto.cohort.v1 import cohort_pb2 as pb
from common.tasks.base import load_task
from coordinator.config import PrivacyConfig
from participant.site import Site


def epsilon_after(rounds: int, sigma: float, delta: float) -> float:
    acc = Accountant("pld", delta)
    acc.compose(PrivacyEvent("gaussian", sigma, "full", 1.0, rounds, None))
    return acc.epsilon()


def test_site_update_is_clipped_to_the_norm_bound(site_data: dict[str, Path]) -> None:
    task = load_task("breast_cancer")
    site = Site(task, task.load_data(site_data[SITES[0]]))
    base = {k: v.float() for k, v in task.build_model(seed=0).state_dict().items()}
    params = pb.TrainParams(local_epochs=3, batch_size=8, learning_rate=1.0, seed=1)
    raw = site.train(base, params)
    raw_norm = math.sqrt(sum(float((v.double() ** 2).sum()) for v in _tensors(raw.update).values()))
    bound = raw_norm / 100  # the site's update is 100 times the bound
    clipped = site.train(base, params, clip_norm=bound)
    norm = math.sqrt(sum(float((v.double() ** 2).sum()) for v in _tensors(clipped.update).values()))
    assert norm == pytest.approx(bound, rel=1e-5)
    assert clipped.result.extra["clip_bit"] == -1.0  # its norm was above the bound; the norm itself stays home


def _tensors(enc: object) -> dict[str, torch.Tensor]:
    from common.serde import EncodedTensors, decode

    assert isinstance(enc, EncodedTensors)
    return decode(enc.specs, enc.data)


async def test_budget_allows_exactly_k_rounds(
    pki: Pki,
    site_data: dict[str, Path],
    tmp_path: Path,
    coordinator_factory: CoordinatorFactory,
    participant_factory: ParticipantFactory,
) -> None:
    sigma, delta, k = 2.0, 1e-5, 3
    # A budget between what k and k + 1 rounds spend: the job must run exactly k rounds, then stop.
    target = (epsilon_after(k, sigma, delta) + epsilon_after(k + 1, sigma, delta)) / 2
    privacy = PrivacyConfig(
        unit="site", target_epsilon=target, delta=delta, noise_multiplier=sigma, clip_norm=0.5, refuse_over_budget=False
    )
    sites = SITES[:3]
    job = replace(job_config(rounds=10, min_sites=3, evaluate_every=0), privacy=privacy)
    coord = await coordinator_factory(coordinator_config(pki, tmp_path / "state", sites=sites, job=job))
    for site in sites:
        await participant_factory(participant_config(pki.site(site), coord.address, site_data[site]))
    runner = runner_of(coord)
    await poll_until(lambda: runner.state != "running", timeout=120, what="the job to stop")
    assert runner.state == "budget_exhausted", runner.detail
    assert f"after {k} rounds" in runner.detail
    done = [r for r in coord.coordinator.store.rounds(runner.job_id) if r.state == "completed"]
    assert [r.round for r in done] == list(range(1, k + 1))
    eps = [r.epsilon for r in done]
    assert eps == pytest.approx([epsilon_after(i, sigma, delta) for i in range(1, k + 1)], abs=0.01)
    assert eps[-1] is not None
    assert eps[-1] <= target
    [job_row] = coord.coordinator.store.jobs()
    assert job_row["epsilon"] == pytest.approx(eps[-1])
    assert [e["kind"] for e in coord.coordinator.store.audit_events("budget_stop")] == ["budget_stop"]


async def test_job_whose_plan_exceeds_the_budget_is_refused(
    pki: Pki, tmp_path: Path, coordinator_factory: CoordinatorFactory
) -> None:
    coord = await coordinator_factory(coordinator_config(pki, tmp_path / "state"))
    spec = pb.JobSpec(
        task="breast_cancer",
        rounds=50,
        min_sites=2,
        privacy=pb.PrivacySpec(unit="site", target_epsilon=1.0, delta=1e-5, noise_multiplier=0.5, clip_norm=1.0),
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await start_job(AdminEndpoint(address=coord.address, tls=pki.admin), spec)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "privacy plan" in (info.value.details() or "")
    assert coord.coordinator.store.jobs() == []


async def test_distributed_site_level_dp_over_many_sites_with_secure_aggregation(
    tmp_path: Path, coordinator_factory: CoordinatorFactory, participant_factory: ParticipantFactory
) -> None:
    """Site-level DP with Skellam noise added by the sites under SecAgg: 50 digits sites over mutual TLS."""
    from support import tls

    from common.ca import init_federation
    from common.datasets import load_source, split_sites, write_site_folders
    from coordinator.config import CoordinatorConfig, FederationConfig, SecureAggregationConfig, ServerConfig

    n = 50
    names = tuple(f"site-{i:02d}" for i in range(n))
    ids = init_federation(tmp_path / "certs", sites=names, admins=("admin",))
    x, y, schema = load_source("digits")
    folders = write_site_folders(tmp_path / "data", split_sites(x, y, names, alpha=None, seed=3), schema)
    privacy = PrivacyConfig(unit="site", delta=1e-5, noise_multiplier=1.0, clip_norm=0.5)
    secagg = SecureAggregationConfig(enabled=True, bits=32, stage_timeout_s=60)
    job = replace(
        job_config(task="digits", rounds=2, min_sites=n - 5, min_available_sites=n, evaluate_every=0),
        privacy=privacy,
        secure_aggregation=secagg,
    )
    config = CoordinatorConfig(
        federation=FederationConfig(name="cohort", sites=names),  # init_federation's default federation
        server=ServerConfig(listen="127.0.0.1:0", tls=tls(ids["coordinator"]), heartbeat_interval_s=2.0),
        state_dir=tmp_path / "state",
        job=job,
    )
    coord = await coordinator_factory(config)
    for name in names:
        await participant_factory(participant_config(ids[f"site:{name}"], coord.address, folders[name], task="digits"))
    runner = runner_of(coord)
    await poll_until(lambda: runner.state != "running", timeout=240, what="the private secure job to finish")
    assert runner.state == "finished", runner.detail
    done = [r for r in coord.coordinator.store.rounds(runner.job_id) if r.state == "completed"]
    assert [len(r.reported) for r in done] == [n, n]
    eps = [r.epsilon for r in done]
    assert eps[0] is not None
    assert eps[1] is not None
    assert 0 < eps[0] < eps[1]
    # The accountant used the Skellam RDP bound of each round's parameters.
    expected = runner.privacy._new_accountant()
    ev = runner.privacy.event(n)
    assert ev.mechanism == "skellam"
    expected.compose(replace(ev, count=2))
    assert eps[1] == pytest.approx(expected.epsilon(), rel=1e-6)


async def test_record_level_dp_with_secure_aggregation_reports_each_sites_epsilon(
    pki: Pki,
    site_data: dict[str, Path],
    tmp_path: Path,
    coordinator_factory: CoordinatorFactory,
    participant_factory: ParticipantFactory,
) -> None:
    """breast_cancer, DP-SGD at every site, secure aggregation on; each site stops at its own budget."""
    from coordinator.config import SecureAggregationConfig
    from participant.config import RecordPrivacyConfig
    from participant.record_dp import SiteBudget

    job = replace(
        job_config(rounds=3, min_sites=2, min_available_sites=3, evaluate_every=0),
        privacy=PrivacyConfig(unit="record", delta=1e-5),
        secure_aggregation=SecureAggregationConfig(enabled=True, clip=1.0, weight_cap=1000, stage_timeout_s=30),
    )
    coord = await coordinator_factory(coordinator_config(pki, tmp_path / "state", job=job))
    sites = SITES[:3]
    for i, site in enumerate(sites):
        # The third site's budget allows two rounds only: it refuses the third, which completes without it.
        budget = 1.0e9 if i < 2 else 0.0
        cfg = participant_config(pki.site(site), coord.address, site_data[site])
        privacy = RecordPrivacyConfig(
            enabled=True,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            delta=1e-5,
            target_epsilon=budget or 1.0,
            state_file=tmp_path / f"{site}.json",
        )
        daemon_cfg = replace(cfg, privacy=privacy)
        if i == 2:
            # Two rounds' worth, computed with the site's own accountant.
            probe = SiteBudget(1e9, 1e-5)
            from common.tasks.base import load_task
            from participant.record_dp import planned_training

            n = len(load_task("breast_cancer").load_data(site_data[site]).train)  # type: ignore[arg-type]
            plan = planned_training(n, job.params.batch_size, job.params.local_epochs)
            two = probe.epsilon_after(plan.steps, plan.sample_rate, 1.0)
            probe.record(plan.steps, plan.sample_rate, 1.0)
            two = probe.epsilon_after(plan.steps, plan.sample_rate, 1.0)
            three = SiteBudget(1e9, 1e-5)
            for _ in range(3):
                three.record(plan.steps, plan.sample_rate, 1.0)
            daemon_cfg = replace(daemon_cfg, privacy=replace(privacy, target_epsilon=(two + three.epsilon()) / 2))
        await participant_factory(daemon_cfg)
    runner = runner_of(coord)
    await poll_until(lambda: runner.state != "running", timeout=120, what="the job to finish")
    assert runner.state == "finished", runner.detail
    done = [r for r in coord.coordinator.store.rounds(runner.job_id) if r.state == "completed"]
    assert [sorted(r.reported) for r in done][:2] == [sorted(sites)] * 2
    assert sorted(done[-1].reported) == sorted(sites[:2])  # the third site kept its budget
    [row] = coord.coordinator.store.jobs()
    import json

    site_eps = json.loads(row["site_epsilon"])
    assert set(site_eps) == set(sites)
    assert all(e > 0 for e in site_eps.values())
    assert row["epsilon"] == pytest.approx(max(site_eps.values()))


async def test_adaptive_clipping_moves_the_bound_toward_the_target_quantile(
    pki: Pki,
    site_data: dict[str, Path],
    tmp_path: Path,
    coordinator_factory: CoordinatorFactory,
    participant_factory: ParticipantFactory,
) -> None:
    """C starts far above every site's update norm; with target quantile 0.5 it must shrink round after round."""
    privacy = PrivacyConfig(
        unit="site",
        delta=1e-5,
        noise_multiplier=0.5,
        clip_norm=100.0,
        adaptive_clipping=True,
        target_quantile=0.5,
        clip_learning_rate=0.5,
        # The noised below-bound count moves C by exp(-lr * (count/n - q)) each round. With 3 sites always below C,
        # the drift over 4 rounds is -1 and the noise's spread is lr * std * 2 / 3: std 1.0 went the wrong way about
        # once in 700 runs (a 3-sigma draw); 0.6 makes it a 5-sigma draw, still exercising the noised count (and
        # needs noise_multiplier < 2 * 0.6 for the update's share of the noise).
        count_noise_std=0.6,
    )
    sites = SITES[:3]
    job = replace(job_config(rounds=4, min_sites=3, evaluate_every=0), privacy=privacy)
    coord = await coordinator_factory(coordinator_config(pki, tmp_path / "state", sites=sites, job=job))
    for site in sites:
        await participant_factory(participant_config(pki.site(site), coord.address, site_data[site]))
    runner = runner_of(coord)
    await poll_until(lambda: runner.state != "running", timeout=120, what="the job to finish")
    assert runner.state == "finished", runner.detail
    moves = coord.coordinator.store.audit_events("clip_adapted")
    assert len(moves) == 4
    clips = [100.0] + [m["detail"]["new"] for m in moves]
    assert clips[-1] < clips[0]  # all norms are far below 100: C goes down
    assert runner.privacy.clip_norm == pytest.approx(clips[-1])
