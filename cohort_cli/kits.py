"""Startup kits: the federation file, and what goes into each identity's kit (configs, units, compose, README).

The federation file (YAML, read strictly like every Cohort config; documented in docs/CONFIG.md) names the
coordinator, the sites and the admins and where things live on their hosts. From it, ``cohort kit build`` writes
one folder and tarball per identity (cohort_cli/kit_cmd.py). This module renders the kits' text files; the configs
are validated with the daemons' own config classes before they are written, so a kit never carries a config its
daemon would refuse.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from common import config as loader
from common.ca import COORDINATOR_NAME
from common.certs import validate_name
from common.errors import ConfigError
from common.names import RULE, is_name
from common.settings import HttpConfig, parse_address
from coordinator.config import CoordinatorConfig
from participant.config import ParticipantConfig

CertificateFlow = Literal["csr", "issued"]
VENV_COHORT = "/opt/cohort/venv/bin/cohort"
IMAGE = "cohort:local"
# In the image, owned by its user (uid 10001): a fresh volume mounted there inherits that owner.
CONTAINER_STATE = Path("/var/lib/cohort/state")


def _absolute(path: Path, where: str) -> None:
    if not path.is_absolute():
        raise ConfigError(f"{where}: must be an absolute path (the daemons' working directory is their state dir)")


@dataclass(frozen=True)
class CoordinatorEntry:
    """The coordinator's host: how sites reach it and where its files live there."""

    address: str  # host:port the sites and admins dial; the host goes on the coordinator's certificate
    dns_names: tuple[str, ...] = ()  # more names or IPs for its certificate (a load balancer, an internal name)
    listen: str = "0.0.0.0:50051"
    http_listen: str = "0.0.0.0:9100"  # /healthz, /readyz; "" turns it off
    certificate: CertificateFlow = "csr"
    config_dir: Path = Path("/etc/cohort")
    state_dir: Path = Path("/var/lib/cohort/state")
    settings: dict[str, Any] = field(default_factory=dict)  # more coordinator config (server.*, job, ...)

    def check(self, path: str) -> None:
        parse_address(self.address, f"{path}.address")
        parse_address(self.listen, f"{path}.listen")
        HttpConfig(self.http_listen).check(f"{path}.http_listen")
        _absolute(self.config_dir, f"{path}.config_dir")
        _absolute(self.state_dir, f"{path}.state_dir")

    @property
    def host(self) -> str:
        return parse_address(self.address, "coordinator.address")[0]


@dataclass(frozen=True)
class SiteEntry:
    """One participant site: its id (its certificate's CN) and where its files live on its host."""

    name: str
    certificate: CertificateFlow = "csr"
    config_dir: Path = Path("/etc/cohort")
    data_dir: Path = Path("/var/lib/cohort/data")
    state_dir: Path = Path("/var/lib/cohort/state")  # the working directory; the privacy ledger lives here
    http_listen: str = "127.0.0.1:9100"  # /healthz, /readyz on the site's own loopback; "" turns it off
    settings: dict[str, Any] = field(default_factory=dict)  # more participant config (training, privacy, ...)

    def check(self, path: str) -> None:
        if not is_name(self.name):
            raise ConfigError(f"{path}.name: {self.name!r} is not a valid site id (use {RULE})")
        HttpConfig(self.http_listen).check(f"{path}.http_listen")
        for key in ("config_dir", "data_dir", "state_dir"):
            _absolute(getattr(self, key), f"{path}.{key}")


@dataclass(frozen=True)
class AdminEntry:
    """An operator with an admin certificate (``cohort status``, ``cohort job ...``)."""

    name: str
    certificate: CertificateFlow = "csr"
    config_dir: Path | None = None  # where the kit is unpacked; none: admin.env names the kit's tls/ relatively

    def check(self, path: str) -> None:
        validate_name(self.name, f"{path}.name")
        if self.config_dir is not None:
            _absolute(self.config_dir, f"{path}.config_dir")


@dataclass(frozen=True)
class FederationFile:
    federation: str  # the certificates' O and the coordinator's federation.name
    task: str  # what every site runs: a built-in task or package.module:ATTR installed at the sites
    coordinator: CoordinatorEntry
    sites: tuple[SiteEntry, ...]
    admins: tuple[AdminEntry, ...] = ()
    participant_settings: dict[str, Any] = field(default_factory=dict)  # every site's, under its own settings

    def check(self, path: str) -> None:
        if not self.sites:
            raise ConfigError("sites: list at least one site")
        names = [s.name for s in self.sites]
        if len(set(names)) != len(names):
            raise ConfigError("sites: a site name is listed twice")
        admins = [a.name for a in self.admins]
        if len(set(admins)) != len(admins):
            raise ConfigError("admins: an admin name is listed twice")
        if COORDINATOR_NAME in names:
            raise ConfigError(f"sites: {COORDINATOR_NAME!r} is the coordinator's name, not a site's")


def load_federation(path: Path) -> FederationFile:
    return loader.load(FederationFile, path)


# -- configs --------------------------------------------------------------------------------------------------


def _merge(base: dict[str, Any], extra: dict[str, Any], where: str) -> dict[str, Any]:
    """``extra`` deep-merged into a copy of ``base``; a key both set is an error (the kit's values are not
    negotiable: they follow from the federation file)."""
    out = dict(base)
    for key, value in extra.items():
        path = f"{where}.{key}"
        if key in out and isinstance(out[key], dict) and isinstance(value, dict):
            out[key] = _merge(out[key], value, path)
        elif key in out:
            raise ConfigError(f"{path}: set by the kit from the federation file; change it there")
        else:
            out[key] = value
    return out


def _overlay(defaults: dict[str, Any], own: dict[str, Any]) -> dict[str, Any]:
    """``own`` deep-merged over ``defaults``: where both set a key, ``own`` wins."""
    out = dict(defaults)
    for key, value in own.items():
        both = isinstance(out.get(key), dict) and isinstance(value, dict)
        out[key] = _overlay(out[key], value) if both else value
    return out


def _tls(config_dir: Path) -> dict[str, str]:
    tls = config_dir / "tls"
    return {"ca": str(tls / "ca.crt"), "cert": str(tls / "tls.crt"), "key": str(tls / "tls.key")}


def coordinator_config(fed: FederationFile) -> dict[str, Any]:
    """The coordinator's config: the allow-list, an empty deny-list, TLS files, state dir, health endpoint."""
    c = fed.coordinator
    tree: dict[str, Any] = {
        "federation": {
            "name": fed.federation,
            "sites": [s.name for s in fed.sites],
            "deny_list": str(c.config_dir / "deny-list.yaml"),
        },
        "server": {"listen": c.listen, "tls": _tls(c.config_dir)},
        "state_dir": str(c.state_dir),
        "http": {"listen": c.http_listen},
    }
    tree = _merge(tree, c.settings, "coordinator.settings")
    try:
        loader.build(CoordinatorConfig, tree)
    except ConfigError as exc:
        raise ConfigError(f"the coordinator's config would not load: {exc}") from None
    return tree


def participant_config(fed: FederationFile, site: SiteEntry) -> dict[str, Any]:
    """A site's config: the coordinator's address, its TLS files, data and state, the federation's task."""
    tree: dict[str, Any] = {
        "coordinator": {"address": fed.coordinator.address},
        "tls": _tls(site.config_dir),
        "data_dir": str(site.data_dir),
        "task": fed.task,
        "http": {"listen": site.http_listen},
    }
    where = f"sites[{site.name}].settings"
    tree = _merge(tree, _overlay(fed.participant_settings, site.settings), where)
    if isinstance(tree.get("privacy"), dict):
        tree["privacy"].setdefault("state_file", str(site.state_dir / "privacy.json"))
    try:
        loader.build(ParticipantConfig, tree)
    except ConfigError as exc:
        raise ConfigError(f"site {site.name}'s config would not load: {exc}") from None
    return tree


def yaml_text(header: str, tree: dict[str, Any]) -> str:
    comment = "".join(f"# {line}".rstrip() + "\n" for line in header.splitlines())
    return comment + yaml.safe_dump(tree, sort_keys=False, default_flow_style=False)


# -- systemd units, compose services, scripts -----------------------------------------------------------------


def systemd_unit(template: str, *, role: str, config: Path, state_dir: Path, who: str) -> str:
    """The repository's unit (deploy/systemd) with this host's config path and state directory."""
    lines = [f"# Generated by `cohort kit build` for {who} from deploy/systemd/cohort-{role}.service."]
    for line in template.splitlines():
        key = line.partition("=")[0]
        if key == "ExecStart":
            line = f"ExecStart={VENV_COHORT} {role} --config {config}"
        elif key in ("WorkingDirectory", "ReadWritePaths"):
            line = f"{key}={state_dir}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def _service(role: str, config: Path, state_dir: Path) -> dict[str, Any]:
    return {
        "image": IMAGE,
        "command": [role, "--config", str(config)],
        "init": True,
        "restart": "unless-stopped",
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges:true"],
        "stop_signal": "SIGTERM",
        "stop_grace_period": "30s",
        "working_dir": str(state_dir),
    }


def coordinator_compose(fed: FederationFile) -> dict[str, Any]:
    """The coordinator as one compose service: the kit folder as its config dir, a volume for its state."""
    c = fed.coordinator
    port = parse_address(c.listen, "coordinator.listen")[1]
    svc = _service("coordinator", c.config_dir / "coordinator.yaml", c.state_dir)
    svc["ports"] = [f"{port}:{port}"]  # the gRPC port only (mutual TLS); the health port stays inside
    svc["volumes"] = [f".:{c.config_dir}:ro", f"state:{c.state_dir}"]
    return {"name": "cohort-coordinator", "services": {"coordinator": svc}, "volumes": {"state": {}}}


def participant_compose(site: SiteEntry) -> dict[str, Any]:
    """One site as one compose service: no published port (it only dials out), its data read-only."""
    svc = _service("participant", site.config_dir / "participant.yaml", site.state_dir)
    svc["volumes"] = [f".:{site.config_dir}:ro", f"{site.data_dir}:{site.data_dir}:ro", f"state:{site.state_dir}"]
    return {"name": f"cohort-{site.name}", "services": {"participant": svc}, "volumes": {"state": {}}}


def csr_script(name: str, role: str, tls_dir: Path | str) -> str:
    out = shlex.quote(str(tls_dir))
    return (
        "#!/bin/sh\n"
        f"# Run on the {role}'s own host, as the user that runs Cohort: makes this identity's private key (it never\n"
        "# leaves this host) and the certificate request to send to the federation operator.\n"
        "set -eu\n"
        'cd "$(dirname "$0")"\n'
        f"cohort certs csr --out {out} --name {shlex.quote(name)} --role {role}\n"
        f'echo "Send {tls_dir}/tls.csr to the federation operator; put the tls.crt you get back into {tls_dir}/."\n'
    )


def admin_env(fed: FederationFile, admin: AdminEntry) -> str:
    tls = admin.config_dir / "tls" if admin.config_dir is not None else Path("tls")
    return (
        f"# Admin {admin.name} of federation {fed.federation}: `set -a; . ./admin.env; set +a` then `cohort status`.\n"
        f"COHORT_ADMIN_COORDINATOR={fed.coordinator.address}\n"
        f"COHORT_ADMIN_TLS_DIR={tls}\n"
    )


def deny_list_text() -> str:
    return (
        "# Revoked identities (docs/CONFIG.md, deny-list). The coordinator re-reads this file when it changes.\n"
        "sites: []\nserials: []\nfingerprints: []\n"
    )
