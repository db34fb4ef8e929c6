"""The federation PKI (common.ca, common.certs) and the ``cohort certs`` command (cohort_cli.certs_cmd)."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import shutil
import ssl
import stat
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cohort_cli.certs_cmd import register
from common import ca, certs
from common.certs import PeerIdentity, Role, TlsFiles
from common.errors import CertificateError, ConfigError

SITES = ("hospital-a", "hospital-b")
COORDINATOR_NAMES = ("coord.example.org", "10.1.2.3")


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A federation made once for the read-only tests of this module."""
    out = tmp_path_factory.mktemp("fed")
    ca.init_federation(out, sites=SITES, admins=("admin", "ops"), coordinator_names=COORDINATOR_NAMES)
    return out


@pytest.fixture(scope="module")
def foreign(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second, unrelated federation: its certificates must not pass for ours."""
    out = tmp_path_factory.mktemp("foreign")
    ca.init_federation(out, sites=SITES, federation="other")
    return out


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _copy_identity(src: Path, dst: Path) -> TlsFiles:
    shutil.copytree(src, dst)
    return TlsFiles.in_dir(dst)


# --- init_federation: layout, permissions, certificate profile ---------------------------------------------


def test_init_layout_and_permissions(tmp_path: Path) -> None:
    result = ca.init_federation(tmp_path / "fed", sites=SITES, admins=("admin",))
    fed = tmp_path / "fed"
    assert set(result) == {"coordinator", "site:hospital-a", "site:hospital-b", "admin:admin"}
    assert result["site:hospital-a"] == TlsFiles.in_dir(fed / "sites" / "hospital-a")
    assert result["admin:admin"] == TlsFiles.in_dir(fed / "admins" / "admin")
    assert result["coordinator"] == TlsFiles.in_dir(fed / "coordinator")
    assert _mode(fed / "ca" / "ca.key") == 0o600
    assert _mode(fed / "ca" / "ca.crt") == 0o644
    assert _mode(fed / "ca") == 0o700
    ca_pem = (fed / "ca" / "ca.crt").read_bytes()
    for files in result.values():
        assert (_mode(files.key), _mode(files.cert), _mode(files.ca)) == (0o600, 0o644, 0o644)
        assert files.ca.read_bytes() == ca_pem  # each directory can be handed out alone
        assert b"-----BEGIN PRIVATE KEY-----" in files.key.read_bytes()  # PKCS#8, unencrypted
    assert not list(fed.rglob("*.tmp"))


@pytest.mark.parametrize(
    ("directory", "identity"),
    [
        ("coordinator", PeerIdentity(Role.COORDINATOR, "coordinator")),
        ("sites/hospital-a", PeerIdentity(Role.PARTICIPANT, "hospital-a")),
        ("admins/ops", PeerIdentity(Role.ADMIN, "ops")),
    ],
)
def test_identity_round_trip(fed: Path, directory: str, identity: PeerIdentity) -> None:
    files = TlsFiles.in_dir(fed / directory)
    assert certs.identity_from_pem(files.cert.read_bytes()) == identity
    assert certs.check_tls_files(files, expect_role=identity.role) == identity


def test_certificate_profile(fed: Path) -> None:
    ca = _cert(fed / "ca" / "ca.crt")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value == x509.BasicConstraints(True, 0)
    ca_usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ca_usage.key_cert_sign
    assert ca_usage.crl_sign
    assert not ca_usage.digital_signature
    ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    serials = {ca.serial_number}
    now = datetime.now(UTC)
    for directory, role in [("coordinator", Role.COORDINATOR), ("sites/hospital-b", Role.PARTICIPANT)]:
        cert = _cert(fed / directory / "tls.crt")
        serials.add(cert.serial_number)
        assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "cohort"
        assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == role.value
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
        assert constraints.critical
        assert not constraints.value.ca
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        assert usage.digital_signature
        assert not usage.key_cert_sign
        eku = list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
        client_only = [ExtendedKeyUsageOID.CLIENT_AUTH]
        assert eku == ([ExtendedKeyUsageOID.SERVER_AUTH, *client_only] if role is Role.COORDINATOR else client_only)
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        assert aki.key_identifier == ca_ski.digest
        assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
        # Back-dated for clock skew, and valid for the requested 365 days from now.
        assert timedelta(minutes=4) < now - cert.not_valid_before_utc < timedelta(minutes=6)
        assert abs(cert.not_valid_after_utc - (now + timedelta(days=365))) < timedelta(minutes=1)
    assert len(serials) == 3


def test_coordinator_sans(fed: Path) -> None:
    sans = _cert(fed / "coordinator" / "tls.crt").extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert set(sans.value.get_values_for_type(x509.DNSName)) == {"localhost", "coord.example.org"}
    assert set(sans.value.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address(a) for a in ("127.0.0.1", "::1", "10.1.2.3")
    }


# --- the files work with a real TLS stack ------------------------------------------------------------------


def _context(files: TlsFiles, *, server: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(files.cert, files.key)
    ctx.load_verify_locations(files.ca)
    ctx.verify_mode = ssl.CERT_REQUIRED
    # Strict RFC 5280 checks (the default from Python 3.13): catches a missing AKI, a non-critical
    # BasicConstraints and similar profile mistakes.
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    return ctx


def _handshake(client_files: TlsFiles, server_files: TlsFiles, hostname: str) -> dict[str, object]:
    """Run a mutual-TLS handshake in memory (no sockets); return the certificate the server saw."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = _context(client_files, server=False).wrap_bio(c_in, c_out, server_hostname=hostname)
    server = _context(server_files, server=True).wrap_bio(s_in, s_out, server_side=True)
    pending = [client, server]
    for _ in range(10):
        for side in list(pending):
            try:
                side.do_handshake()
                pending.remove(side)
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if not pending:
            break
    assert not pending
    peer = server.getpeercert()
    assert peer is not None
    return dict(peer)


@pytest.mark.parametrize("directory", ["coordinator", "sites/hospital-a", "admins/admin"])
def test_ssl_context_loads_chain(fed: Path, directory: str) -> None:
    for server in (True, False):
        _context(TlsFiles.in_dir(fed / directory), server=server)


@pytest.mark.parametrize("hostname", ["localhost", "127.0.0.1", "coord.example.org", "10.1.2.3"])
def test_mutual_tls_handshake(fed: Path, hostname: str) -> None:
    peer = _handshake(TlsFiles.in_dir(fed / "sites/hospital-a"), TlsFiles.in_dir(fed / "coordinator"), hostname)
    assert (("organizationalUnitName", "participant"),) in peer["subject"]  # type: ignore[operator]


def test_handshake_rejects_wrong_host_and_foreign_client(fed: Path, foreign: Path) -> None:
    site, coordinator = TlsFiles.in_dir(fed / "sites/hospital-a"), TlsFiles.in_dir(fed / "coordinator")
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        _handshake(site, coordinator, "elsewhere.example.org")
    # A site certificate from another federation, presented with our CA so the client side is happy.
    intruder = replace(TlsFiles.in_dir(foreign / "sites/hospital-a"), ca=site.ca)
    with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer"):
        _handshake(intruder, coordinator, "localhost")


# --- check_tls_files: each failure names the file -----------------------------------------------------------


def _one_day_identity(fed: Path, dst: Path, *, days_ago: int) -> TlsFiles:
    """An identity whose certificate was valid for one day, starting ``days_ago`` days ago."""
    ca_cert, ca_key = ca.load_ca(fed / "ca")
    key = ca.new_private_key()
    start = datetime.now(UTC) - timedelta(days=days_ago)
    cert = ca.issue_certificate(
        ca_cert,
        ca_key,
        name="late",
        role=Role.PARTICIPANT,
        public_key=key.public_key(),
        not_before=start,
        not_after=start + timedelta(days=1),
    )
    files = TlsFiles.in_dir(dst)
    ca.write_pem(files.cert, cert.public_bytes(serialization.Encoding.PEM), private=False)
    ca.write_pem(
        files.key,
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        private=True,
    )
    shutil.copy(fed / "ca" / "ca.crt", files.ca)
    return files


def test_check_missing_files(fed: Path, tmp_path: Path) -> None:
    for field in ("ca", "cert", "key"):
        files = _copy_identity(fed / "sites/hospital-a", tmp_path / field)
        missing: Path = getattr(files, field)
        missing.unlink()
        with pytest.raises(CertificateError, match="not found") as err:
            certs.check_tls_files(files)
        assert str(missing) in str(err.value)


def test_check_key_mismatch(fed: Path, tmp_path: Path) -> None:
    files = _copy_identity(fed / "sites/hospital-a", tmp_path / "a")
    shutil.copy(fed / "sites/hospital-b/tls.key", files.key)
    with pytest.raises(CertificateError, match="does not match") as err:
        certs.check_tls_files(files)
    assert str(files.key) in str(err.value)


def test_check_expired_and_not_yet_valid(fed: Path, tmp_path: Path) -> None:
    files = _one_day_identity(fed, tmp_path / "old", days_ago=3)
    with pytest.raises(CertificateError, match="expired") as err:
        certs.check_tls_files(files)
    assert str(files.cert) in str(err.value)
    with pytest.raises(CertificateError, match="not valid before"):
        certs.check_tls_files(files, now=datetime.now(UTC) - timedelta(days=10))


def test_check_foreign_ca(fed: Path, foreign: Path, tmp_path: Path) -> None:
    files = _copy_identity(fed / "sites/hospital-a", tmp_path / "a")
    shutil.copy(foreign / "ca" / "ca.crt", files.ca)
    with pytest.raises(CertificateError, match="not issued by the federation CA") as err:
        certs.check_tls_files(files)
    assert str(files.cert) in str(err.value)
    assert str(files.ca) in str(err.value)


def test_check_accepts_ca_bundle(fed: Path, foreign: Path, tmp_path: Path) -> None:
    # During a CA change ca.crt holds the old and the new CA; certificates from either must pass.
    files = _copy_identity(fed / "sites/hospital-a", tmp_path / "a")
    files.ca.write_bytes((foreign / "ca" / "ca.crt").read_bytes() + (fed / "ca" / "ca.crt").read_bytes())
    assert certs.check_tls_files(files).name == "hospital-a"


def test_check_wrong_role_and_bad_pem(fed: Path, tmp_path: Path) -> None:
    site = TlsFiles.in_dir(fed / "sites/hospital-a")
    with pytest.raises(CertificateError, match="needs a coordinator certificate") as err:
        certs.check_tls_files(site, expect_role=Role.COORDINATOR)
    assert str(site.cert) in str(err.value)
    files = _copy_identity(fed / "sites/hospital-a", tmp_path / "a")
    files.cert.write_bytes(b"not a certificate\n")
    with pytest.raises(CertificateError, match="not PEM") as err:
        certs.check_tls_files(files)
    assert str(files.cert) in str(err.value)


def test_check_encrypted_key(fed: Path, tmp_path: Path) -> None:
    files = _copy_identity(fed / "sites/hospital-a", tmp_path / "a")
    key = serialization.load_pem_private_key(files.key.read_bytes(), password=None)
    files.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(CertificateError, match="encrypted") as err:
        certs.check_tls_files(files)
    assert str(files.key) in str(err.value)


def test_check_warns_on_readable_key(fed: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    files = _copy_identity(fed / "sites/hospital-a", tmp_path / "a")
    files.key.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="common.certs"):
        certs.check_tls_files(files)
    assert "chmod 600" in caplog.text


def test_identity_from_pem_rejects_non_cohort_certs(fed: Path) -> None:
    with pytest.raises(CertificateError, match="role"):
        certs.identity_from_pem((fed / "ca" / "ca.crt").read_bytes())  # a CA has no role
    with pytest.raises(CertificateError, match="PEM"):
        certs.identity_from_pem(b"garbage")
    key = ca.new_private_key()
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "root"),
            x509.NameAttribute(NameOID.COMMON_NAME, "x"),
        ]
    )
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder(subject, subject, key.public_key(), 1, now, now + timedelta(days=1))).sign(
        key, hashes.SHA256()
    )
    with pytest.raises(CertificateError, match="'root' is not one of"):
        certs.identity_from_pem(cert.public_bytes(serialization.Encoding.PEM))


# --- names, overwrite protection, adding identities ---------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "site-1", "hospital.a_b", "0", "a" * 63])
def test_valid_names(name: str) -> None:
    assert certs.validate_name(name) == name


@pytest.mark.parametrize("name", ["", "A", "-a", ".a", "_a", "a/b", "..", "a b", "abc\n", "é", "a" * 64])
def test_invalid_names(name: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        certs.validate_name(name)
    with pytest.raises(ConfigError):
        ca.init_federation(tmp_path, sites=[name])
    assert not any(tmp_path.iterdir())  # arguments are checked before anything is written


@pytest.mark.parametrize(
    "kwargs",
    [
        {"sites": ["a", "a"]},
        {"sites": ["a"], "coordinator_names": ["bad host"]},
        {"sites": ["a"], "admins": ["ops", "ops"]},
        {"sites": ["a"], "days": 0},
        {"sites": ["a"], "federation": ""},
    ],
)
def test_init_rejects_bad_arguments(tmp_path: Path, kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        ca.init_federation(tmp_path, **kwargs)  # type: ignore[arg-type]
    assert not any(tmp_path.iterdir())


def test_init_refuses_to_replace_ca(tmp_path: Path) -> None:
    ca.init_federation(tmp_path, sites=["a"])
    old_ca = (tmp_path / "ca" / "ca.crt").read_bytes()
    with pytest.raises(CertificateError, match="already exists") as err:
        ca.init_federation(tmp_path, sites=["b"])
    assert "ca.key" in str(err.value)
    assert "certs add" in str(err.value)
    assert (tmp_path / "ca" / "ca.crt").read_bytes() == old_ca
    assert not (tmp_path / "sites" / "b").exists()
    ca.init_federation(tmp_path, sites=["a"], force=True)
    assert (tmp_path / "ca" / "ca.crt").read_bytes() != old_ca
    certs.check_tls_files(TlsFiles.in_dir(tmp_path / "sites" / "a"))


def test_issue_identity_adds_a_site(fed: Path, tmp_path: Path) -> None:
    files = ca.issue_identity(fed / "ca", tmp_path / "c", "hospital-c", Role.PARTICIPANT, days=30)
    assert files == TlsFiles.in_dir(tmp_path / "c")
    assert certs.check_tls_files(files) == PeerIdentity(Role.PARTICIPANT, "hospital-c")
    assert _mode(files.key) == 0o600
    with pytest.raises(CertificateError, match="already exists"):
        ca.issue_identity(fed / "ca", tmp_path / "c", "hospital-c", Role.PARTICIPANT)
    old_key = files.key.read_bytes()
    ca.issue_identity(fed / "ca", tmp_path / "c", "hospital-c", Role.PARTICIPANT, force=True)
    assert files.key.read_bytes() != old_key
    # A leaf never outlives its CA.
    long = ca.issue_identity(fed / "ca", tmp_path / "d", "hospital-d", Role.ADMIN, days=36500)
    assert _cert(long.cert).not_valid_after_utc <= _cert(fed / "ca" / "ca.crt").not_valid_after_utc


def test_write_pem_tightens_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "tls.key"
    path.write_bytes(b"old")
    path.chmod(0o644)
    ca.write_pem(path, b"new", private=True)
    assert path.read_bytes() == b"new"
    assert _mode(path) == 0o600
    ca.write_pem(tmp_path / "sub" / "tls.crt", b"cert", private=False)
    assert _mode(tmp_path / "sub" / "tls.crt") == 0o644
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["sub", "tls.crt", "tls.key"]


# --- the CSR flow: the key stays at the site ----------------------------------------------------------------


def test_csr_flow(fed: Path, tmp_path: Path) -> None:
    site_dir, operator_dir = tmp_path / "site", tmp_path / "operator"
    key_path, csr_path = ca.create_csr(site_dir, "hospital-e", Role.PARTICIPANT)
    assert (key_path, csr_path) == (site_dir / "tls.key", site_dir / "tls.csr")
    assert _mode(key_path) == 0o600
    key_before = key_path.read_bytes()
    out = ca.sign_csr(fed / "ca", csr_path, operator_dir / "tls.crt", days=90)
    assert out == operator_dir / "tls.crt"
    assert sorted(p.name for p in operator_dir.iterdir()) == ["ca.crt", "tls.crt"]  # no key written
    assert key_path.read_bytes() == key_before
    files = TlsFiles(ca=operator_dir / "ca.crt", cert=out, key=key_path)
    assert certs.check_tls_files(files) == PeerIdentity(Role.PARTICIPANT, "hospital-e")
    _cert(out).verify_directly_issued_by(_cert(fed / "ca" / "ca.crt"))
    with pytest.raises(CertificateError, match="already exists"):
        ca.create_csr(site_dir, "hospital-e")


def test_sign_csr_refusals(fed: Path, tmp_path: Path) -> None:
    _, csr_path = ca.create_csr(tmp_path / "site", "hospital-e", Role.PARTICIPANT)
    with pytest.raises(CertificateError, match="admin was asked for"):
        ca.sign_csr(fed / "ca", csr_path, tmp_path / "out" / "tls.crt", role=Role.ADMIN)
    # Flip the last byte of the signature: still valid DER, no longer a valid signature.
    der = bytearray(x509.load_pem_x509_csr(csr_path.read_bytes()).public_bytes(serialization.Encoding.DER))
    der[-1] ^= 1
    tampered = tmp_path / "tampered.csr"
    tampered.write_bytes(x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM))
    with pytest.raises(CertificateError, match="signature is invalid"):
        ca.sign_csr(fed / "ca", tampered, tmp_path / "out" / "tls.crt")
    for ou, cn, key, reason in [
        ("participant", "Bad Name", ca.new_private_key(), "not a valid Cohort name"),
        ("participant", "ok", ec.generate_private_key(ec.SECP384R1()), "P-256"),
    ]:
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou),
                x509.NameAttribute(NameOID.COMMON_NAME, cn),
            ]
        )
        csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
        bad = tmp_path / "bad.csr"
        bad.write_bytes(csr.public_bytes(serialization.Encoding.PEM))
        with pytest.raises(CertificateError, match=reason) as err:
            ca.sign_csr(fed / "ca", bad, tmp_path / "out" / "tls.crt")
        assert str(bad) in str(err.value)
    assert not (tmp_path / "out").exists()


# --- the command line ---------------------------------------------------------------------------------------


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="cohort")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    result = args.func(args)
    assert isinstance(result, int)
    return result


def test_cli_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "fed"
    init = "certs init --sites a,b, --site c --admin ops --coordinator-name coord.example.org --federation acme"
    assert _cli(*init.split(), "--days", "30", "--out", str(out)) == 0
    assert str(out / "sites" / "a") in capsys.readouterr().out
    assert sorted(p.name for p in (out / "sites").iterdir()) == ["a", "b", "c"]
    assert sorted(p.name for p in (out / "admins").iterdir()) == ["ops"]
    with pytest.raises(CertificateError, match="already exists"):
        _cli("certs", "init", "--out", str(out), "--site", "a")

    assert _cli("certs", "add", "--ca", str(out / "ca"), "--out", str(out / "sites" / "d"), "--name", "d") == 0
    assert certs.check_tls_files(TlsFiles.in_dir(out / "sites" / "d")) == PeerIdentity(Role.PARTICIPANT, "d")

    site = tmp_path / "site-e"
    assert _cli("certs", "csr", "--out", str(site), "--name", "e", "--role", "admin") == 0
    signed = tmp_path / "signed" / "tls.crt"
    sign = ["certs", "sign", "--ca", str(out / "ca"), "--csr", str(site / "tls.csr"), "--out", str(signed)]
    with pytest.raises(CertificateError, match="admin"):
        _cli(*sign)  # role defaults to participant
    assert _cli(*sign, "--role", "admin") == 0
    assert certs.check_tls_files(TlsFiles(ca=signed.parent / "ca.crt", cert=signed, key=site / "tls.key")).name == "e"
    capsys.readouterr()

    assert _cli("certs", "show", str(out / "coordinator" / "tls.crt")) == 0
    shown = capsys.readouterr().out
    for text in ("coordinator", "acme", "coord.example.org", "days left"):
        assert text in shown
    assert certs.fingerprint(_cert(out / "coordinator" / "tls.crt")) in shown
    assert _cli("certs", "show", str(out / "ca" / "ca.crt")) == 0
    assert "federation CA" in capsys.readouterr().out
    with pytest.raises(CertificateError, match="not a PEM certificate"):
        _cli("certs", "show", str(out / "ca" / "ca.key"))


def test_cli_argument_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        _cli("certs", "init", "--out", str(tmp_path), "--site", "Bad")
    with pytest.raises(ConfigError):
        _cli("certs", "init", "--out", str(tmp_path), "--site", "a", "--days", "0")
    with pytest.raises(SystemExit) as exc:  # argparse: unknown role
        _cli("certs", "add", "--ca", str(tmp_path), "--out", str(tmp_path), "--name", "a", "--role", "root")
    assert exc.value.code == 2
