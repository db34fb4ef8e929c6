"""``cohort certs``: create the federation CA and issue certificates from the command line.

Each sub-command is a thin wrapper over :mod:`common.ca` (issuing) or :mod:`common.certs` (reading); errors are
:class:`~common.errors.CohortError` subclasses, which ``cohort_cli.main`` prints as one line with exit code 2.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from cryptography import x509
from cryptography.x509.oid import NameOID

from common import ca, certs
from common.certs import Role, TlsFiles
from common.errors import CertificateError, ConfigError

Handler = Callable[[argparse.Namespace], int]
E = TypeVar("E", bound=x509.ExtensionType)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``certs`` command and its sub-commands to a ``cohort`` argument parser."""
    parser = subparsers.add_parser(
        "certs",
        help="create the federation CA and issue certificates",
        description="Create the federation CA and issue certificates. A site can keep its private key: "
        "it runs `certs csr`, the operator runs `certs sign` on the request and sends the certificate back.",
    )
    commands = parser.add_subparsers(dest="certs_command", required=True, metavar="COMMAND")
    days_help = "validity in days (default: %(default)s; never beyond the CA's own expiry)"

    init = _add(commands, "init", _cmd_init, "create a CA and certificates for coordinator, sites and admins")
    init.add_argument("--out", type=Path, required=True, help="directory to write the federation's files to")
    init.add_argument("--site", action="append", default=[], metavar="ID", help="a site id (repeatable)")
    init.add_argument("--sites", default="", metavar="A,B,C", help="comma-separated site ids")
    init.add_argument("--admin", action="append", metavar="NAME", help="an admin name (repeatable; default: admin)")
    init.add_argument(
        "--coordinator-name",
        action="append",
        default=[],
        metavar="HOST",
        help="DNS name or IP address that sites dial (repeatable; localhost is always included)",
    )
    init.add_argument("--federation", default="cohort", help="federation name, the certificates' O (default: cohort)")
    init.add_argument("--days", type=int, default=365, help=days_help)
    init.add_argument("--ca-days", type=int, default=3650, help="CA validity in days (default: %(default)s)")
    init.add_argument(
        "--force", action="store_true", help="replace an existing CA: every old certificate stops working"
    )

    add = _add(commands, "add", _cmd_add, "issue a key and certificate for one more site or admin")
    add.add_argument("--ca", type=Path, required=True, help="CA directory holding ca.crt and ca.key")
    add.add_argument("--out", type=Path, required=True, help="directory for ca.crt, tls.crt and tls.key")
    add.add_argument("--name", required=True, metavar="ID", help="site id or admin name")
    _add_role(add, Role.PARTICIPANT, Role.ADMIN)
    _add_dns_name(add)
    add.add_argument("--days", type=int, default=365, help=days_help)
    add.add_argument("--force", action="store_true", help="replace an existing key in --out")

    csr = _add(commands, "csr", _cmd_csr, "at a site: create a private key and a certificate signing request")
    csr.add_argument("--out", type=Path, required=True, help="directory for tls.key and tls.csr")
    csr.add_argument("--name", required=True, metavar="ID", help="this site's id (or admin name)")
    _add_role(csr, Role.PARTICIPANT, Role.ADMIN, Role.COORDINATOR)
    csr.add_argument("--force", action="store_true", help="replace an existing tls.key")

    sign = _add(commands, "sign", _cmd_sign, "at the operator: issue a certificate for a site's CSR")
    sign.add_argument("--ca", type=Path, required=True, help="CA directory holding ca.crt and ca.key")
    sign.add_argument("--csr", type=Path, required=True, help="the tls.csr file the site sent")
    sign.add_argument("--out", type=Path, required=True, help="certificate file to write (ca.crt goes beside it)")
    _add_role(sign, Role.PARTICIPANT, Role.ADMIN, Role.COORDINATOR)
    _add_dns_name(sign)
    sign.add_argument("--days", type=int, default=365, help=days_help)

    show = _add(commands, "show", _cmd_show, "print a certificate's role, name, federation, validity and fingerprint")
    show.add_argument("file", type=Path, help="a PEM certificate")


def _add(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], name: str, func: Handler, help_text: str
) -> argparse.ArgumentParser:
    parser = commands.add_parser(name, help=help_text, description=help_text)
    parser.set_defaults(func=func)
    return parser


def _add_role(parser: argparse.ArgumentParser, *roles: Role) -> None:
    choices = [r.value for r in roles]
    parser.add_argument("--role", choices=choices, default=Role.PARTICIPANT.value, help="default: participant")


def _add_dns_name(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dns-name",
        action="append",
        default=[],
        metavar="HOST",
        help="extra DNS name or IP SAN (repeatable)",
    )


def _site_ids(args: argparse.Namespace) -> list[str]:
    # --site and --sites may be combined; empty items ("a,,b", a trailing comma) are ignored.
    return [*args.site, *(s.strip() for s in args.sites.split(",") if s.strip())]


def _print_identity(label: str, files: TlsFiles) -> None:
    print(f"{label:<24} {files.cert.parent}/  (ca.crt, tls.crt, tls.key)")


def _cmd_init(args: argparse.Namespace) -> int:
    result = ca.init_federation(
        args.out,
        sites=_site_ids(args),
        admins=args.admin or ["admin"],
        coordinator_names=args.coordinator_name,
        federation=args.federation,
        days=args.days,
        ca_days=args.ca_days,
        force=args.force,
    )
    ca_dir = args.out / "ca"
    print(f"{'CA':<24} {ca_dir}/  (ca.crt, ca.key: keep ca.key offline, it can issue any identity)")
    for label, files in result.items():
        _print_identity(label, files)
    print("Give each site its own directory only; every directory holds the same ca.crt.")
    return 0


def _cmd_add(args: argparse.Namespace) -> int:
    role = Role(args.role)
    files = ca.issue_identity(
        args.ca, args.out, args.name, role, dns_names=args.dns_name, days=args.days, force=args.force
    )
    _print_identity(f"{role}:{args.name}", files)
    return 0


def _cmd_csr(args: argparse.Namespace) -> int:
    key_path, csr_path = ca.create_csr(args.out, args.name, Role(args.role), force=args.force)
    print(f"private key  {key_path}  (stays here; never send it)")
    print(f"request      {csr_path}  (send this to the federation operator)")
    return 0


def _cmd_sign(args: argparse.Namespace) -> int:
    out = ca.sign_csr(args.ca, args.csr, args.out, role=Role(args.role), days=args.days, dns_names=args.dns_name)
    identity = certs.identity_from_pem(out.read_bytes())
    print(f"certificate  {out}  ({identity.role} {identity.name!r})")
    print(f"CA           {out.parent / 'ca.crt'}")
    print("Send both files back to the site; they go beside its tls.key.")
    return 0


def describe(cert: x509.Certificate, *, now: datetime | None = None) -> list[tuple[str, str]]:
    """Human-readable (field, value) rows for ``certs show``."""
    now = now or datetime.now(UTC)
    constraints = _extension(cert, x509.BasicConstraints)
    if constraints is not None and constraints.ca:
        role, name = "federation CA", _attr(cert, NameOID.COMMON_NAME)
    else:
        identity = certs.identity_of(cert)
        role, name = identity.role.value, identity.name
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    state = "expired" if now > end else "not yet valid" if now < start else f"{(end - now).days} days left"
    rows = [
        ("role", role),
        ("name", name),
        ("federation", _attr(cert, NameOID.ORGANIZATION_NAME)),
        ("valid", f"{start:%Y-%m-%d %H:%M} UTC .. {end:%Y-%m-%d %H:%M} UTC ({state})"),
    ]
    sans = _extension(cert, x509.SubjectAlternativeName)
    if sans is not None:
        rows.append(("names", ", ".join(str(n.value) for n in sans)))
    rows += [("serial", f"{cert.serial_number:x}"), ("sha256", certs.fingerprint(cert))]
    return rows


def _attr(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> str:
    return ", ".join(str(a.value) for a in cert.subject.get_attributes_for_oid(oid)) or "-"


def _extension(cert: x509.Certificate, kind: type[E]) -> E | None:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def _cmd_show(args: argparse.Namespace) -> int:
    path: Path = args.file
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        cert = x509.load_pem_x509_certificates(data)[0]
    except ValueError:
        raise CertificateError(f"{path}: not a PEM certificate") from None
    try:
        rows = describe(cert)
    except CertificateError as exc:
        raise CertificateError(f"{path}: {exc}") from None
    for field, value in rows:
        print(f"{field + ':':<12} {value}")
    return 0
