"""``cohort kit build``: one startup kit (folder and tarball) per identity of a federation.

Layout under ``--out``::

    OPERATOR.md                    what to do with the kits; the exact `cohort certs sign` command per identity
    coordinator/  coordinator.tar.gz
    sites/<id>/   sites/<id>.tar.gz
    admins/<name>/ admins/<name>.tar.gz

A kit holds ``tls/ca.crt`` and, by default, ``request-certificate.sh``: the identity makes its private key on its
own host and sends only the request (CSR flow). With ``certificate: issued`` in the federation file, the kit holds
that identity's own key and certificate instead. A kit never holds another identity's key, and never the CA key:
the CA lives in ``--ca`` (created there when absent), which may not lie inside ``--out``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from cohort_cli import kits
from common import ca
from common.ca import COORDINATOR_NAME
from common.certs import Role, load_certificates
from common.errors import ConfigError

MARKER = "OPERATOR.md"  # a folder holding it was written by this command and may be replaced with --force


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "kit",
        help="build per-site startup kits from a federation file",
        description="Startup kits: one folder and tarball per site, the coordinator and each admin, with its config, "
        "certificate request (or certificate), systemd unit, compose service and README.",
    )
    commands = parser.add_subparsers(dest="kit_command", required=True, metavar="COMMAND")
    build = commands.add_parser("build", help="write the kits of every identity in a federation file")
    build.add_argument("--federation", type=Path, required=True, help="the federation file (YAML, docs/CONFIG.md)")
    build.add_argument("--out", type=Path, required=True, help="folder for the kits")
    build.add_argument(
        "--ca", type=Path, default=Path("pki/ca"), help="CA folder (ca.crt, ca.key); created when absent (%(default)s)"
    )
    build.add_argument("--deploy-dir", type=Path, default=None, help="Cohort's deploy/ folder (for the systemd units)")
    build.add_argument("--days", type=int, default=365, help="validity of issued certificates (default: %(default)s)")
    build.add_argument("--force", action="store_true", help="replace kits an earlier `kit build` wrote to --out")
    build.set_defaults(func=_cmd_build)


def default_deploy_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "deploy"


def _cmd_build(args: argparse.Namespace) -> int:
    fed = kits.load_federation(args.federation)
    out: Path = args.out.resolve()
    ca_dir: Path = args.ca.resolve()
    if ca_dir == out or out in ca_dir.parents:
        raise ConfigError(f"--ca {ca_dir} lies inside --out {out}: the CA key must never travel in a kit")
    deploy = (args.deploy_dir or default_deploy_dir()).resolve()
    units = {role: deploy / "systemd" / f"cohort-{role}.service" for role in ("coordinator", "participant")}
    for unit in units.values():
        if not unit.is_file():
            raise ConfigError(f"{unit} not found: pass --deploy-dir with Cohort's deploy/ folder")
    # Every config the kits will carry, checked before anything is written.
    configs = {COORDINATOR_NAME: kits.coordinator_config(fed)} | {
        s.name: kits.participant_config(fed, s) for s in fed.sites
    }
    _prepare_out(out, args.force)
    if not (ca_dir / "ca.key").exists():
        ca.write_ca(ca_dir, fed.federation, 3650)
        print(f"created the federation CA in {ca_dir} (keep ca.key offline: it can issue any identity)")
    load_certificates(ca_dir / "ca.crt", "CA certificate")
    builder = _Builder(fed, out, ca_dir, args.days, {role: unit.read_text() for role, unit in units.items()}, configs)
    builder.coordinator()
    for site in fed.sites:
        builder.site(site)
    for admin in fed.admins:
        builder.admin(admin)
    (out / MARKER).write_text(builder.operator_notes())
    for line in builder.summary:
        print(line)
    print(f"next: {out / MARKER}")
    return 0


def _prepare_out(out: Path, force: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if not force:
            raise ConfigError(f"{out} is not empty; pass --force to replace the kits an earlier build wrote there")
        if not (out / MARKER).exists():
            raise ConfigError(f"{out} holds files that `cohort kit build` did not write; refusing to replace them")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def _reset_owner(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


class _Builder:
    def __init__(
        self,
        fed: kits.FederationFile,
        out: Path,
        ca_dir: Path,
        days: int,
        units: dict[str, str],
        configs: dict[str, dict[str, Any]],
    ) -> None:
        self.fed, self.out, self.ca_dir, self.days, self.units, self.configs = fed, out, ca_dir, days, units, configs
        self.summary: list[str] = []
        self.signing: list[str] = []

    # -- one identity's files -----------------------------------------------------------------------------------
    def _identity(self, kit: Path, name: str, role: Role, flow: str, tls_dir: Path | str, hosts: list[str]) -> None:
        """tls/ca.crt, and the identity's own key and certificate (issued) or the script to request them (csr)."""
        if flow == "issued":
            ca.issue_identity(self.ca_dir, kit / "tls", name, role, dns_names=hosts, days=self.days)
            return
        (kit / "tls").mkdir(parents=True, mode=0o700)
        shutil.copyfile(self.ca_dir / "ca.crt", kit / "tls" / "ca.crt")
        script = kit / "request-certificate.sh"
        script.write_text(kits.csr_script(name, role.value, tls_dir))
        script.chmod(0o755)
        dns = "".join(f" --dns-name {h}" for h in hosts)
        self.signing.append(
            f"cohort certs sign --ca {self.ca_dir} --csr {name}.csr --out signed/{name}/tls.crt "
            f"--role {role.value}{dns} --days {self.days}"
        )

    def _write(self, kit: Path, files: dict[str, str]) -> None:
        for rel, text in files.items():
            (kit / rel).write_text(text)

    def _pack(self, kit: Path, label: str, flow: str) -> None:
        tarball = kit.with_suffix(".tar.gz")
        # Owner-only where a kit carries a private key (an issued certificate).
        fd = os.open(tarball, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if flow == "issued" else 0o644)
        with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz") as tar:
            tar.add(kit, arcname=kit.name, filter=_reset_owner)
        how = "its key and certificate (keep it secret)" if flow == "issued" else "a certificate request script"
        self.summary.append(f"{label:<26} {kit.relative_to(self.out)}/ and {tarball.name}: {how}")

    # -- the kits -----------------------------------------------------------------------------------------------
    def coordinator(self) -> None:
        fed, c = self.fed, self.fed.coordinator
        kit = self.out / "coordinator"
        kit.mkdir(parents=True)
        hosts = list(dict.fromkeys([c.host, *c.dns_names]))
        self._identity(kit, COORDINATOR_NAME, Role.COORDINATOR, c.certificate, c.config_dir / "tls", hosts)
        header = (
            f"Coordinator of federation {fed.federation}, from `cohort kit build`: the allow-list is federation.sites."
        )
        self._write(
            kit,
            {
                "coordinator.yaml": kits.yaml_text(header, self.configs[COORDINATOR_NAME]),
                "deny-list.yaml": kits.deny_list_text(),
                "cohort-coordinator.service": kits.systemd_unit(
                    self.units["coordinator"],
                    role="coordinator",
                    config=c.config_dir / "coordinator.yaml",
                    state_dir=c.state_dir,
                    who=f"the coordinator of {fed.federation}",
                ),
                "compose.yaml": _compose_text("the coordinator", kits.coordinator_compose(fed)),
                "README.md": _readme(self._context("coordinator", c.config_dir, c.certificate)),
            },
        )
        self._pack(kit, "coordinator", c.certificate)

    def site(self, site: kits.SiteEntry) -> None:
        fed = self.fed
        kit = self.out / "sites" / site.name
        kit.mkdir(parents=True)
        self._identity(kit, site.name, Role.PARTICIPANT, site.certificate, site.config_dir / "tls", [])
        header = f"Site {site.name} of federation {fed.federation}, from `cohort kit build`."
        self._write(
            kit,
            {
                "participant.yaml": kits.yaml_text(header, self.configs[site.name]),
                "cohort-participant.service": kits.systemd_unit(
                    self.units["participant"],
                    role="participant",
                    config=site.config_dir / "participant.yaml",
                    state_dir=site.state_dir,
                    who=f"site {site.name}",
                ),
                "compose.yaml": _compose_text(f"site {site.name}", kits.participant_compose(site)),
                "README.md": _readme(self._context("site", site.config_dir, site.certificate, site)),
            },
        )
        self._pack(kit, f"site {site.name}", site.certificate)

    def admin(self, admin: kits.AdminEntry) -> None:
        kit = self.out / "admins" / admin.name
        kit.mkdir(parents=True)
        tls_dir = admin.config_dir / "tls" if admin.config_dir is not None else "tls"
        self._identity(kit, admin.name, Role.ADMIN, admin.certificate, tls_dir, [])
        self._write(
            kit,
            {
                "admin.env": kits.admin_env(self.fed, admin),
                "README.md": _readme(self._context("admin", admin.config_dir, admin.certificate, name=admin.name)),
            },
        )
        self._pack(kit, f"admin {admin.name}", admin.certificate)

    def _context(
        self,
        kind: str,
        config_dir: Path | None,
        flow: str,
        site: kits.SiteEntry | None = None,
        name: str = "",
    ) -> dict[str, str]:
        c = self.fed.coordinator
        return {
            "kind": kind,
            "name": site.name if site is not None else name or COORDINATOR_NAME,
            "federation": self.fed.federation,
            "address": c.address,
            "port": c.address.rpartition(":")[2],
            "config_dir": str(config_dir) if config_dir is not None else "(this folder)",
            "flow": flow,
            "data_dir": str(site.data_dir) if site is not None else "",
            "state_dir": str(site.state_dir if site is not None else c.state_dir),
            "http": (site.http_listen if site is not None else c.http_listen) if kind != "admin" else "",
            "task": self.fed.task,
        }

    def operator_notes(self) -> str:
        lines = [
            f"# Startup kits of federation {self.fed.federation}",
            "",
            f"The federation CA is in `{self.ca_dir}`: keep `ca.key` offline; no kit contains it.",
            "",
            "Hand each folder's tarball to its own host only. Kits built with `certificate: csr` (the default) make",
            "their private key on their host (`request-certificate.sh`) and send back `tls.csr`; sign each request",
            "as below, check the printed role and name, and send back `tls.crt` (it goes into the kit's `tls/`).",
            "Kits built with `certificate: issued` carry their identity's key: send them over a private channel.",
            "Save each request you receive as `<name>.csr`, then:",
            "",
        ]
        if self.signing:
            lines += ["```sh", *self.signing, "```", ""]
        lines += [f"- {line}" for line in self.summary]
        return "\n".join(lines) + "\n"


def _compose_text(who: str, model: dict[str, object]) -> str:
    header = (
        f"# {who} as a container: `docker compose up -d` in this folder once the certificate is in tls/.\n"
        "# Image: `docker build -f deploy/Dockerfile -t cohort:local .` in Cohort's repository. The container runs\n"
        "# as uid 10001: `chown -R 10001:10001 tls` so it can read its key.\n"
    )
    return header + yaml.safe_dump(model, sort_keys=False, default_flow_style=False)


def _readme(ctx: dict[str, str]) -> str:
    return _READMES[ctx["kind"]](ctx)


def _certificate_step(ctx: dict[str, str]) -> str:
    if ctx["flow"] == "issued":
        return (
            "This kit carries this identity's own private key (`tls/tls.key`) and certificate: keep the tarball\n"
            "secret and delete it once unpacked.\n"
        )
    return (
        "Run `sh request-certificate.sh` here: it makes the private key `tls/tls.key` (it never leaves this host)\n"
        "and `tls/tls.csr`. Send `tls.csr` to the federation operator; put the `tls.crt` you get back into `tls/`.\n"
    )


def _site_readme(ctx: dict[str, str]) -> str:
    return f"""# Cohort startup kit: site {ctx["name"]} of federation {ctx["federation"]}

The participant daemon only dials out, to the coordinator at `{ctx["address"]}`: allow outbound TCP to port
{ctx["port"]}; nothing needs to reach this host. Task: `{ctx["task"]}`.

1. Install Cohort into `/opt/cohort/venv` (Cohort's README), and unpack this kit into `{ctx["config_dir"]}`:
   `mkdir -p {ctx["config_dir"]} && tar -xzf {ctx["name"]}.tar.gz -C {ctx["config_dir"]} --strip-components=1`
2. Certificate. {_certificate_step(ctx)}
3. Data: `train.csv`, `val.csv`, `test.csv` in `{ctx["data_dir"]}` with the task's columns; check them with
   `cohort data describe {ctx["data_dir"]} --task {ctx["task"]}`. They never leave this host.
4. Start, either as a systemd service (runs as user `cohort`; state, including this site's privacy budget,
   in `{ctx["state_dir"]}`):
   `cp cohort-participant.service /etc/systemd/system/ && systemctl daemon-reload`,
   `systemctl enable --now cohort-participant`;
   or as a container: `docker compose up -d` in `{ctx["config_dir"]}` (compose.yaml).
5. Check: `curl -fsS http://{ctx["http"] or "(http.listen)"}/readyz` answers 200 once the site has joined.

Files: `participant.yaml` (the daemon's config), `tls/ca.crt` (the federation CA), `cohort-participant.service`,
`compose.yaml`, this README.
"""


def _coordinator_readme(ctx: dict[str, str]) -> str:
    return f"""# Cohort startup kit: the coordinator of federation {ctx["federation"]}

Sites and admins dial `{ctx["address"]}` (mutual TLS). Open inbound TCP {ctx["port"]} to them; nothing else.
The allow-list is `federation.sites` in `coordinator.yaml`; revoke a site or certificate in `deny-list.yaml`
(re-read while running).

1. Install Cohort into `/opt/cohort/venv` (Cohort's README), and unpack this kit into `{ctx["config_dir"]}`:
   `mkdir -p {ctx["config_dir"]} && tar -xzf coordinator.tar.gz -C {ctx["config_dir"]} --strip-components=1`
2. Certificate. {_certificate_step(ctx)}
3. Start, either as a systemd service (state in `{ctx["state_dir"]}`; a restart resumes the job):
   `cp cohort-coordinator.service /etc/systemd/system/ && systemctl daemon-reload`,
   `systemctl enable --now cohort-coordinator`;
   or as a container: `docker compose up -d` in `{ctx["config_dir"]}` (compose.yaml).
4. Check: `curl -fsS http://{ctx["http"] or "(http.listen)"}/readyz` (200: store open, gRPC listening, not
   draining), and `cohort status` from an admin kit. Kubernetes: Cohort's deploy/k8s.

Files: `coordinator.yaml`, `deny-list.yaml`, `tls/ca.crt`, `cohort-coordinator.service`, `compose.yaml`, this README.
"""


def _admin_readme(ctx: dict[str, str]) -> str:
    return f"""# Cohort startup kit: admin {ctx["name"]} of federation {ctx["federation"]}

1. Install Cohort (Cohort's README) and unpack this kit; its folder: {ctx["config_dir"]}.
2. Certificate. {_certificate_step(ctx)}
3. `set -a; . ./admin.env; set +a` in the kit's folder, then `cohort status`, `cohort job start JOB.yaml`,
   `cohort job watch`, `cohort job stop JOB_ID` against the coordinator at `{ctx["address"]}`.
"""


_READMES: dict[str, Callable[[dict[str, str]], str]] = {
    "site": _site_readme,
    "coordinator": _coordinator_readme,
    "admin": _admin_readme,
}
