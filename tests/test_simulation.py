"""``cohort simulate`` (simulation/): the same job gives the same model as a real federation over mutual TLS, the same
epsilon under DP, runs secure aggregation's full protocol, and spreads its sites over two Ray nodes.

Needs Ray (``pip install 'cohort[sim]'``); skipped with that reason where it is not installed."""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
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
    wait_until,
)
from support import participant_config as site_config

from coordinator.config import JobConfig, PrivacyConfig, SecureAggregationConfig, StandardizeConfig
from coordinator.state.model_store import ModelStore

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'cohort[sim]' (the simulation's extra)")

from simulation import data as site_data  # noqa: E402
from simulation.engine import Outcome, Simulation  # noqa: E402
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
    """The demo's settings (the statistics phase, SecAgg+ with record-level DP budgets at the sites) over more sites
    than the demo has."""
    from common.tasks.base import load_task
    from common.tasks.standardize import FeatureScaling
    from participant.config import RecordPrivacyConfig

    folders, plan = site_data.split_on_the_fly(
        tmp_path / "data", "breast_cancer", load_task("breast_cancer").schema, 12, alpha=None, quantity_skew=0.5, seed=1
    )
    assert plan.kind == "resampled"
    secure = SecureAggregationConfig(enabled=True, bits=32, clip=1.0, weight_cap=1000, stage_timeout_s=30)
    job = job_config(
        rounds=2,
        secure_aggregation=secure,
        privacy=PrivacyConfig(unit="record"),
        standardize=StandardizeConfig(enabled=True),
    )
    site_privacy = RecordPrivacyConfig(enabled=True, noise_multiplier=2.0, target_epsilon=50.0)
    outcome = await simulate(job, folders, tmp_path / "state", site_privacy=site_privacy)
    rounds = outcome.store.rounds(outcome.runner.job_id)
    assert [r.state for r in rounds] == ["completed", "completed"]
    assert all(len(r.reported) == 12 for r in rounds)
    row = outcome.store.job(outcome.runner.job_id)
    assert row is not None
    assert row["test_samples"] > 0
    assert len(row["site_epsilon"]) > 2  # each site published its own record-level epsilon
    # The statistics phase ran over the virtual sites' secure sum: the scaling derived from it is on the job row.
    scaling = FeatureScaling.from_dict(row["feature_scaling"] or {})
    assert scaling is not None
    assert scaling.features == len(load_task("breast_cancer").schema.features)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def ray_cluster_env() -> dict[str, str]:
    """The environment of every process of the test's cluster and of its driver: Ray 2.60's token authentication on
    (RAY_AUTH_MODE=token) with a fresh token of this test's own, so nothing reads or writes ~/.ray/auth_token."""
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
    }


@pytest.fixture
def two_node_cluster(ray_cluster_env: dict[str, str]) -> Iterator[str]:
    """A Ray head and a second Ray node, each its own process tree with one CPU, started here and stopped here."""
    # Ray's Unix sockets live under its temp dir, whose path must stay short (pytest's tmp_path is too long).
    temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    ray_bin = str(Path(sys.executable).parent / "ray")
    port = _free_port()
    address = f"127.0.0.1:{port}"
    env = ray_cluster_env
    common = ["--block", "--num-cpus=1", "--disable-usage-stats", "--node-ip-address=127.0.0.1"]

    def start(*args: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [ray_bin, "start", f"--dashboard-agent-listen-port={_free_port()}", *args, *common],
            env=env,
            cwd=ROOT,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    procs = [start("--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={temp}")]
    try:
        poll_sync(
            lambda: (
                subprocess.run(
                    [ray_bin, "status", f"--address={address}"], env=env, capture_output=True, check=False
                ).returncode
                == 0
            ),
            "the Ray head",
        )
        procs.append(start(f"--address={address}"))
        poll_sync(lambda: _alive(ray_bin, address, env) == 2, "two alive Ray nodes")
        yield address
    finally:
        for proc in reversed(procs):
            os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            proc.wait(timeout=90)
        shutil.rmtree(temp, ignore_errors=True)


def _alive(ray_bin: str, address: str, env: dict[str, str]) -> int:
    """How many nodes the cluster's head counts as alive (``ray status``' "Active:" section)."""
    out = subprocess.run([ray_bin, "status", f"--address={address}"], env=env, capture_output=True, text=True)
    if out.returncode != 0 or "Active:" not in out.stdout:
        return 0
    active = out.stdout.split("Active:", 1)[1].split("Pending:", 1)[0]
    return sum(1 for line in active.splitlines() if line.strip().startswith("1 node_"))


def poll_sync(ready: Callable[[], bool], what: str, timeout: float = 90) -> None:
    """Poll a subprocess-backed condition until it holds (a deadline, not a bare sleep)."""
    wait_until(ready, timeout, what, interval=0.5)


def test_virtual_sites_run_on_two_ray_nodes(
    two_node_cluster: str, ray_cluster_env: dict[str, str], tmp_path: Path
) -> None:
    """``cohort simulate --address`` (a driver process of its own) on a two-node cluster: the sites' data, training and
    evaluation tasks are scheduled on both nodes, and the run writes the usual summary."""
    run_dir = tmp_path / "run"
    job = ROOT / "deploy" / "demo" / "coordinator.yaml"
    plain = ["rounds=2", "standardize.enabled=false", "secure_aggregation.enabled=false", "privacy.unit=none"]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cohort_cli",
            "simulate",
            str(job),
            "--sites",
            "8",
            "--data",
            "breast_cancer",
            "--address",
            two_node_cluster,
            "--max-in-flight",
            "8",
            "--run-dir",
            str(run_dir),
            *(f"--set={item}" for item in plain),
        ],
        env=ray_cluster_env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Ray: 2 node(s)" in proc.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["state"] == "finished"
    assert summary["rounds"] == 2
    assert Path(summary["report"]).is_file()  # the run report a coordinator writes at job end
    nodes = summary["ray_nodes"]
    assert len(nodes) == 2, nodes
    assert all(count > 0 for count in nodes.values()), nodes


def runner_rounds(state: Path) -> list[tuple[int, list[str], int | None]]:
    from coordinator.state.store import SqliteStore

    store = SqliteStore(state / "coordinator.db")
    try:
        (job,) = store.jobs()
        return [(r.round, r.reported, r.train_samples) for r in store.rounds(job["job_id"])]
    finally:
        store.close()


async def test_fedbuff_with_secure_aggregation_over_virtual_sites(local_ray: None, tmp_path: Path) -> None:
    """Asynchronous rounds with secure aggregation (coordinator/round/buffered.py) and record-level DP at the sites:
    each version is one secure instance over a buffer of 3 of the 6 virtual sites; the sites keep their updates
    until then, so nothing is in the clear but their own epsilon and the coordinator's staleness count."""
    from common.tasks.base import load_task
    from coordinator.strategy.config import StrategyConfig
    from participant.config import RecordPrivacyConfig

    folders, _ = site_data.split_on_the_fly(
        tmp_path / "data", "breast_cancer", load_task("breast_cancer").schema, 6, alpha=None, quantity_skew=0.5, seed=1
    )
    job = job_config(
        rounds=3,
        evaluate_every=0,
        secure_aggregation=SecureAggregationConfig(enabled=True, clip=1.0, weight_cap=1000, stage_timeout_s=30),
        privacy=PrivacyConfig(unit="record"),
        strategy=StrategyConfig(mode="async", buffer_size=3, max_staleness=2),
    )
    site_privacy = RecordPrivacyConfig(enabled=True, noise_multiplier=2.0, target_epsilon=50.0)
    outcome = await simulate(job, folders, tmp_path / "state", site_privacy=site_privacy)
    store, job_id = outcome.store, outcome.runner.job_id
    completed = [r for r in store.rounds(job_id) if r.state == "completed"]
    assert [r.round for r in completed] == [1, 2, 3]
    for r in completed:
        ups = store.uploads(job_id, r.round, r.attempt)
        assert len(ups) == 3
        assert all(set(u["metrics"]) <= {"staleness", "dp_epsilon", "dp_delta"} for u in ups)
    row = store.job(job_id)
    assert row is not None
    assert row["state"] == "finished"
    assert len(row["site_epsilon"]) >= 3
