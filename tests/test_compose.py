"""The docker-compose federation for real (deploy/docker-compose.yml): each hospital container sees only its own
certificate and data, publishes no port, the coordinator keeps its state on its volume, and a hospital's privacy budget
survives `docker compose restart hospital-3` and `down` + `up`: epsilon continues, it does not start again.

Needs a Docker engine (and builds ``cohort:local`` with tools/dockerlab.py, a local Debian base where no image
registry answers); skipped with the reason when none answers. ``make compose-demo`` starts one when it is root.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import pytest
from docker_image import ensure_image
from dockerlab import COMPOSE_FILE, Compose, Docker, DockerError, engine_problem
from support import wait_until

from participant.record_dp import LocalTraining, epsilon_of

HOSPITALS = tuple(f"hospital-{i}" for i in range(1, 6))
SITE = "hospital-3"
DELTA = 1e-5
LEDGER = f"/var/lib/cohort/state/{SITE}/privacy.json"
BOOT_ROUNDS = 3

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]


@pytest.fixture(scope="module")
def compose(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Compose]:
    problem = engine_problem()
    if problem is not None:
        pytest.skip(f"needs a Docker engine: {problem}")
    docker = Docker(dict(os.environ))
    tmp = tmp_path_factory.mktemp("compose")
    ensure_image(docker, tmp / "build.log")  # layers are cached: quick unless the code changed
    (tmp / "job.yaml").write_text(
        "name: second-job\ntask: breast_cancer\nrounds: 2\nmin_sites: 3\nmin_available_sites: 5\n"
        "round_timeout_s: 300\nwait_for_sites_s: 300\n"
        "params: {local_epochs: 1, batch_size: 16, learning_rate: 0.5}\n"
        "privacy: {unit: record, delta: 1.0e-5}\n"
        "secure_aggregation: {enabled: true, bits: 32, clip: 1.0, weight_cap: 1000, stage_timeout_s: 60}\n"
    )
    # The test's changes to the demo: no fixed host port, a short boot job, and a second job for the admin to start.
    (tmp / "override.yml").write_text(
        "services:\n"
        "  coordinator:\n"
        "    ports: !reset []\n"
        "    environment:\n"
        f'      COHORT_COORDINATOR_JOB__ROUNDS: "{BOOT_ROUNDS}"\n'
        "  admin:\n"
        "    volumes:\n"
        f"      - {tmp / 'job.yaml'}:/etc/cohort-test/job.yaml:ro\n"
    )
    project = f"cohort-it-{os.getpid()}"
    c = Compose(docker, project, files=(COMPOSE_FILE, tmp / "override.yml"))
    try:
        c("up", "-d", "--no-build")
        yield c
    finally:
        logs = c("logs", "--no-color", "--tail", "30", check=False).stdout
        c("down", "-v", "--remove-orphans", "--timeout", "30", check=False, timeout=300)
        left = c.leftovers()
        assert not any(left.values()), f"down -v left {left}\n{logs[-4000:]}"


def wait_for_job(compose: Compose, number: int, timeout: float = 1200) -> dict[str, Any]:
    """The ``number``-th job (1-based) once it has ended; it must have finished."""
    seen: list[dict[str, Any]] = []

    def ended() -> bool:
        try:
            jobs = compose.status().get("jobs", [])
        except DockerError:  # the coordinator is still starting (after `up`)
            return False
        seen[:] = jobs
        return len(jobs) >= number and jobs[number - 1]["state"] not in ("running", "pending")

    try:
        wait_until(ended, timeout, f"job {number} to end", interval=3)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last status: {seen[-1:]}") from None
    job: dict[str, Any] = seen[number - 1]
    assert job["state"] == "finished", json.dumps(job, indent=1)[-3000:]
    return job


def sh(compose: Compose, service: str, *argv: str) -> str:
    return str(compose("exec", "-T", service, *argv).stdout)


def ledger(compose: Compose) -> list[LocalTraining]:
    data = json.loads(sh(compose, SITE, "cat", LEDGER))
    return [LocalTraining(**event) for event in data["events"]]


def wait_healthy(compose: Compose, service: str, timeout: float = 300) -> None:
    def healthy() -> bool:
        return bool(compose.container(service)["State"].get("Health", {}).get("Status") == "healthy")

    wait_until(healthy, timeout, f"{service} to be healthy", interval=2)


def continued(
    before: list[LocalTraining], eps_before: float, after: list[LocalTraining], job: dict[str, Any], when: str
) -> float:
    """hospital-3's ledger grew from ``before`` and the epsilon it reported in ``job`` counts all of it; returned."""
    assert after[: len(before)] == before, f"{when}: the ledger lost or changed rounds"
    assert len(after) > len(before), f"{when}: hospital-3 trained no round"
    eps: float = job["site_epsilon"][SITE]
    assert eps_before < eps <= epsilon_of(after, DELTA) + 1e-9
    # A budget that had started again would report the new rounds alone.
    assert eps > epsilon_of(after[len(before) :], DELTA) * 1.05, f"{when}: epsilon started again from zero"
    return eps


def volumes(info: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    return {m["Name"]: (m["Destination"], m["RW"]) for m in info["Mounts"] if m["Type"] == "volume"}


def test_isolation_state_and_a_privacy_budget_that_survives_restarts(compose: Compose) -> None:
    p = compose.project
    first = wait_for_job(compose, 1)
    assert len([r for r in first["rounds"] if r["state"] == "completed"]) == BOOT_ROUNDS

    # Isolation: each hospital mounts its own certificate, data (read-only) and state volumes and its own config file,
    # publishes no port, and sees no other identity's files.
    for site in HOSPITALS:
        info = compose.container(site)
        assert volumes(info) == {
            f"{p}_{site}-certs": (f"/var/lib/cohort/certs/sites/{site}", False),
            f"{p}_{site}-data": (f"/var/lib/cohort/data/{site}", False),
            f"{p}_{site}-state": (f"/var/lib/cohort/state/{site}", True),
        }
        binds = [(m["Destination"], m["RW"]) for m in info["Mounts"] if m["Type"] == "bind"]
        assert binds == [(f"/etc/cohort/{site}.yaml", False)]
        assert not info["HostConfig"].get("PortBindings"), f"{site} publishes {info['HostConfig']['PortBindings']}"
        assert not any(info["NetworkSettings"].get("Ports") or {}), f"{site} exposes ports"
        assert info["Config"]["User"] in ("", "cohort")  # the image's non-root user
        assert sh(compose, site, "id", "-u").strip() == "10001"
        certs = sorted(sh(compose, site, "find", "/var/lib/cohort/certs", "-type", "f").split())
        assert certs == [f"/var/lib/cohort/certs/sites/{site}/{f}" for f in ("ca.crt", "tls.crt", "tls.key")]
        data = sorted(sh(compose, site, "find", "/var/lib/cohort/data", "-type", "f").split())
        assert data, f"{site} sees no data"
        assert all(f.startswith(f"/var/lib/cohort/data/{site}/") for f in data), data
        assert info["State"]["Health"]["Status"] == "healthy"  # the image's HEALTHCHECK: /readyz (joined)
    coordinator = compose.container("coordinator")
    assert volumes(coordinator) == {
        f"{p}_coordinator-certs": ("/var/lib/cohort/certs/coordinator", False),
        f"{p}_coordinator-state": ("/var/lib/cohort/state", True),
    }
    assert not coordinator["HostConfig"].get("PortBindings")  # the test's override drops the loopback port
    state = sh(compose, "coordinator", "find", "/var/lib/cohort/state", "-maxdepth", "2").split()
    assert "/var/lib/cohort/state/coordinator/coordinator.db" in state
    assert "/var/lib/cohort/state/coordinator/models" in state
    # The CA's key is in no daemon's container.
    for service in ("coordinator", *HOSPITALS):
        assert "ca.key" not in sh(compose, service, "find", "/var/lib/cohort", "/etc/cohort")

    # The privacy budget: what hospital-3 spent in the first job is on its state volume. (The site reports the epsilon
    # of its whole ledger after each round it trains; the ledger may also hold a round whose upload came too late.)
    spent = ledger(compose)
    assert spent, "hospital-3 recorded no DP-SGD round"
    eps1 = first["site_epsilon"][SITE]
    assert 0 < eps1 <= epsilon_of(spent, DELTA) + 1e-9

    # ... it survives a restart of the container, and the next job's epsilon continues from it.
    compose("restart", SITE, timeout=300)
    wait_healthy(compose, SITE)
    assert ledger(compose) == spent
    started = compose.admin("job", "start", "/etc/cohort-test/job.yaml").stdout
    assert "started job" in started, started
    second = wait_for_job(compose, 2)
    after_restart = ledger(compose)
    eps2 = continued(spent, eps1, after_restart, second, "after `restart`")

    # ... and `down` + `up` (containers gone, volumes kept): the coordinator comes back with its jobs, starts its
    # boot job again, and hospital-3 spends on top of everything it spent before.
    compose("down", "--timeout", "30", timeout=300)
    compose("up", "-d", "--no-build")
    third = wait_for_job(compose, 3)
    jobs = compose.status()["jobs"]
    assert [j["job_id"] for j in jobs[:2]] == [first["job_id"], second["job_id"]], "the coordinator lost its state"
    continued(after_restart, eps2, ledger(compose), third, "after `down` + `up`")
    assert third["test_accuracy"] > 0.5
