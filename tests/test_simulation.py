"""``cohort simulate`` (simulation/): the same job gives the same model as a real federation over mutual TLS, the same
epsilon under DP, runs secure aggregation's full protocol, and spreads its sites over two Ray nodes.

Needs Ray (``pip install 'cohort[sim]'``); skipped with that reason where it is not installed."""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import (
    SITES,
    CoordinatorFactory,
    ParticipantFactory,
    Pki,
    coordinator_config,
    job_config,
    poll_until,
    runner_of,
)
from support import participant_config as site_config

from coordinator.config import JobConfig, PrivacyConfig, SecureAggregationConfig
from coordinator.state.model_store import ModelStore

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'cohort[sim]' (the simulation's extra)")

from simulation import data as site_data  # noqa: E402
from simulation.engine import Outcome, Resources, Simulation  # noqa: E402
from simulation.run import start_ray  # noqa: E402

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def local_ray() -> Iterator[None]:
    started = start_ray(None, 2)
    yield
    if started:
        ray.shutdown()


async def simulate(job: JobConfig, folders: dict[str, Path], state: Path, **kw: object) -> Outcome:
    outcome = await Simulation(job, folders, state, **kw).run()  # type: ignore[arg-type]
    assert outcome.runner.state == "finished", outcome.runner.detail
    return outcome


async def real_federation(
    job: JobConfig,
    pki: Pki,
    site_data: dict[str, Path],
    state: Path,
    coordinator_factory: CoordinatorFactory,
    participant_factory: ParticipantFactory,
) -> tuple[str, dict[str, Any]]:
    coord = await coordinator_factory(coordinator_config(pki, state, job=job))
    for site in SITES:
        await participant_factory(site_config(pki.site(site), coord.address, site_data[site]))
    runner = runner_of(coord)
    await poll_until(lambda: runner.state != "running", timeout=180, what="the job to finish")
    assert runner.state == "finished", runner.detail
    row = runner.store.job(runner.job_id)
    assert row is not None
    return str(row["model_version"]), row


@pytest.mark.parametrize("dp", [False, True], ids=["fedavg", "site-dp"])
async def test_the_simulator_and_a_real_federation_agree(
    dp: bool,
    local_ray: None,
    pki: Pki,
    site_data: dict[str, Path],
    tmp_path: Path,
    coordinator_factory: CoordinatorFactory,
    participant_factory: ParticipantFactory,
) -> None:
    """Plaintext FedAvg with fixed seeds: the same model after the rounds, bit for bit (its digest); under
    site-level DP (central noise, fresh randomness on each side) the same epsilon."""
    job = job_config(rounds=2, min_available_sites=len(SITES))  # every round with all five (as in the simulation)
    if dp:
        privacy = PrivacyConfig(unit="site", noise_multiplier=1.0, clip_norm=1.0, refuse_over_budget=False)
        job = dataclasses.replace(job, privacy=privacy)
    version, row = await real_federation(
        job, pki, site_data, tmp_path / "real", coordinator_factory, participant_factory
    )
    outcome = await simulate(job, dict(site_data), tmp_path / "sim")
    sim_row = outcome.store.job(outcome.runner.job_id)
    assert sim_row is not None
    assert outcome.sites == sorted(SITES)
    if dp:
        assert row["epsilon"] > 0
        assert sim_row["epsilon"] == row["epsilon"]
    else:
        assert sim_row["model_version"] == version
        sim_model = ModelStore(tmp_path / "sim" / "models").load(version)
        real_model = ModelStore(tmp_path / "real" / "models").load(version)
        assert all(bool((sim_model[k] == real_model[k]).all()) for k in real_model)
        assert sim_row["test_accuracy"] == row["test_accuracy"]
    real_rounds = runner_rounds(tmp_path / "real")
    assert [(r.round, r.reported, r.train_samples) for r in outcome.store.rounds(outcome.runner.job_id)] == real_rounds


async def test_secure_aggregation_runs_the_full_protocol_over_virtual_sites(local_ray: None, tmp_path: Path) -> None:
    """The demo's settings (SecAgg+ with record-level DP budgets at the sites) over more sites than the demo has."""
    from common.tasks.base import load_task
    from participant.config import RecordPrivacyConfig

    folders, plan = site_data.split_on_the_fly(
        tmp_path / "data", "breast_cancer", load_task("breast_cancer").schema, 12, alpha=None, quantity_skew=0.5, seed=1
    )
    assert plan.kind == "resampled"
    secure = SecureAggregationConfig(enabled=True, bits=32, clip=1.0, weight_cap=1000, stage_timeout_s=30)
    job = job_config(rounds=2, secure_aggregation=secure, privacy=PrivacyConfig(unit="record"))
    site_privacy = RecordPrivacyConfig(enabled=True, noise_multiplier=2.0, target_epsilon=50.0)
    outcome = await simulate(job, folders, tmp_path / "state", site_privacy=site_privacy)
    rounds = outcome.store.rounds(outcome.runner.job_id)
    assert [r.state for r in rounds] == ["completed", "completed"]
    assert all(len(r.reported) == 12 for r in rounds)
    row = outcome.store.job(outcome.runner.job_id)
    assert row is not None
    assert row["test_samples"] > 0
    assert len(row["site_epsilon"]) > 2  # each site published its own record-level epsilon


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def two_node_cluster() -> Iterator[str]:
    """A Ray head and a second Ray node, each its own process tree with one CPU, started here and stopped here."""
    # Ray's Unix sockets live under its temp dir, whose path must stay short (pytest's tmp_path is too long).
    temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    ray_bin = str(Path(sys.executable).parent / "ray")
    port = _free_port()
    address = f"127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    common = ["--block", "--num-cpus=1", "--disable-usage-stats"]
    procs = [
        subprocess.Popen(
            [
                ray_bin,
                "start",
                "--head",
                f"--port={port}",
                "--node-ip-address=127.0.0.1",
                "--include-dashboard=false",
                f"--dashboard-agent-listen-port={_free_port()}",
                f"--temp-dir={temp}",
                *common,
            ],
            env=env,
            cwd=ROOT,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    ]
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            probe = subprocess.run(
                [ray_bin, "status", f"--address={address}"], env=env, capture_output=True, check=False
            )
            if probe.returncode == 0:
                break
            time.sleep(0.5)  # polling a subprocess with a deadline
        procs.append(
            subprocess.Popen(
                [
                    ray_bin,
                    "start",
                    f"--address={address}",
                    "--node-ip-address=127.0.0.1",
                    f"--dashboard-agent-listen-port={_free_port()}",
                    *common,
                ],
                env=env,
                cwd=ROOT,
                start_new_session=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        yield address
    finally:
        for proc in reversed(procs):
            os.killpg(proc.pid, 15)
        for proc in procs:
            proc.wait(timeout=90)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.skip(
    reason="open: Ray 2.60's cluster token authentication refuses the test's driver (InvalidAuthToken) on the cluster "
    "this test starts; the token must be handed to the driver before this test can run"
)
async def test_virtual_sites_run_on_two_ray_nodes(two_node_cluster: str, tmp_path: Path) -> None:
    ray.init(address=two_node_cluster, logging_level="ERROR", log_to_driver=False)
    try:
        await poll_until(lambda: len([n for n in ray.nodes() if n["Alive"]]) == 2, timeout=60, what="two Ray nodes")
        from common.tasks.base import load_task

        folders, _ = site_data.split_on_the_fly(
            tmp_path / "data",
            "breast_cancer",
            load_task("breast_cancer").schema,
            8,
            alpha=None,
            quantity_skew=0,
            seed=2,
        )
        job = job_config(rounds=2, evaluate_every=0)
        outcome = await simulate(job, folders, tmp_path / "state", resources=Resources(max_in_flight=8))
    finally:
        ray.shutdown()
    assert len(outcome.nodes) == 2, outcome.nodes
    assert all(count > 0 for count in outcome.nodes.values())


def runner_rounds(state: Path) -> list[tuple[int, list[str], int | None]]:
    from coordinator.state.store import SqliteStore

    store = SqliteStore(state / "coordinator.db")
    try:
        (job,) = store.jobs()
        return [(r.round, r.reported, r.train_samples) for r in store.rounds(job["job_id"])]
    finally:
        store.close()
