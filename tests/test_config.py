"""Strict configuration: errors name the bad key; every shipped example config loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from common import config as loader
from common.errors import ConfigError
from coordinator.config import CoordinatorConfig, JobConfig, ServerConfig
from participant.config import ParticipantConfig

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


COORD = """
federation: {name: f, sites: [a, b]}
server: {tls: {ca: ca.crt, cert: tls.crt, key: tls.key}}
job: {task: breast_cancer, rounds: 3, min_sites: 2}
"""


def test_valid_config_and_layers(tmp_path: Path) -> None:
    path = write(tmp_path, COORD)
    cfg = loader.load(CoordinatorConfig, path)
    assert cfg.federation.sites == ("a", "b")
    assert cfg.job is not None
    assert cfg.job.rounds == 3
    assert cfg.server.listen == ServerConfig().listen  # the default
    env = {"COHORT_COORDINATOR_SERVER__LISTEN": "0.0.0.0:6000", "COHORT_COORDINATOR_JOB__ROUNDS": "5"}
    cfg = loader.load(CoordinatorConfig, path, env=env, env_prefix="COHORT_COORDINATOR_", overrides=["job.rounds=7"])
    assert cfg.server.listen == "0.0.0.0:6000"  # environment beats the file
    assert cfg.job is not None
    assert cfg.job.rounds == 7  # the command line beats the environment


@pytest.mark.parametrize(
    ("text", "named"),
    [
        (COORD + "extra: 1\n", "extra: unknown key"),
        (COORD.replace("rounds: 3", "rounds: three"), "job.rounds: expected an integer"),
        (COORD.replace("rounds: 3", "roundz: 3"), "job.roundz: unknown key"),
        (COORD.replace("rounds: 3", "rounds: 0"), "job.rounds: must be between"),
        (COORD.replace("sites: [a, b]", "sites: [a, 'B C']"), "federation.sites[1]"),
        (COORD.replace("ca: ca.crt, ", ""), "server.tls.ca: required key is missing"),
        (COORD.replace("min_sites: 2", "min_sites: 3"), "job.min_sites"),
        (COORD + "server: {listen: nowhere}\n", "server.listen"),
        (COORD.replace("{task: breast_cancer, ", "{task: breast_cancer, fraction: 2, "), "job.fraction"),
        ("- just\n- a list\n", "top level must be a mapping"),
        ("federation: [\n", "not valid YAML"),
    ],
)
def test_errors_name_the_bad_key(tmp_path: Path, text: str, named: str) -> None:
    with pytest.raises(ConfigError) as info:
        loader.load(CoordinatorConfig, write(tmp_path, text))
    assert named in str(info.value)


def test_environment_and_override_errors_name_their_origin(tmp_path: Path) -> None:
    path = write(tmp_path, COORD)
    with pytest.raises(ConfigError, match=r"job\.rounds: expected an integer"):
        loader.load(
            CoordinatorConfig,
            path,
            env={"COHORT_COORDINATOR_JOB__ROUNDS": "many"},
            env_prefix="COHORT_COORDINATOR_",
        )
    with pytest.raises(ConfigError, match=r"expected key\.path=value"):
        loader.load(CoordinatorConfig, path, overrides=["job.rounds"])
    with pytest.raises(ConfigError, match="bogus: unknown key"):
        loader.load(CoordinatorConfig, path, overrides=["bogus=1"])


def test_participant_requires_its_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data_dir: required key is missing"):
        loader.load(ParticipantConfig, write(tmp_path, "task: x\ntls: {ca: a, cert: b, key: c}\n"))
    with pytest.raises(ConfigError, match=r"coordinator\.address"):
        loader.load(
            ParticipantConfig,
            write(tmp_path, "task: x\ndata_dir: d\ntls: {ca: a, cert: b, key: c}\ncoordinator: {address: x}\n"),
        )


def test_every_shipped_config_loads() -> None:
    files = sorted(DEPLOY.rglob("*.yaml"))
    kinds = {
        "coordinator": CoordinatorConfig,
        "hospital": ParticipantConfig,
        "bank": ParticipantConfig,
        "participant": ParticipantConfig,
        "job": JobConfig,
    }
    loaded = 0
    for path in files:
        if "compose" in path.name:
            continue
        kind = next((cls for prefix, cls in kinds.items() if path.name.startswith(prefix)), None)
        assert kind is not None, f"{path} is not a known kind of config; name it coordinator*, participant*, ..."
        loader.load(kind, path)
        loaded += 1
    assert loaded >= 12


def test_job_spec_survives_the_admin_wire() -> None:
    """`cohort job start` sends a JobConfig as a JobSpec; the coordinator must rebuild the same job."""
    from coordinator.jobspec import from_proto as job_config_from_proto
    from coordinator.jobspec import to_proto as job_spec_to_proto

    demo = loader.load(CoordinatorConfig, DEPLOY / "demo" / "coordinator.yaml")
    assert demo.job is not None
    digits = loader.load(JobConfig, DEPLOY / "demo" / "job-digits.yaml")
    for job in (demo.job, digits):
        assert job_config_from_proto(job_spec_to_proto(job)) == job
