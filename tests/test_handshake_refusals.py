"""Refused TLS handshakes are visible (issue 9, item 4): a WARNING line with the peer address and the reason class,
and an audit event shown by `cohort audit list`, throttled per peer.

The rules run without a network: the gRPC core log parser on recorded lines, the throttle on a fake clock. Then a
real `cohort coordinator` process is probed by real clients (grpcio channels, Python ssl sockets, a raw TCP socket),
one per reason class.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import io
import json
import logging
import re
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from prometheus_client.parser import text_string_to_metric_families
from support import SITES, Pki, cert_pem, channel, join_request, key_pem, poll_until, wait_ready_file, write_identity

from cohort_cli.entry import command_of
from cohort_cli.main import main
from common.ca import load_ca, new_private_key
from common.certs import TlsFiles
from common.handshake_log import CoreLogFilter, HandshakeFailure, TracerSetup, classify, run_filter, tracer_env
from common.ops_http import probe
from common.proto.cohort.v1 import cohort_pb2_grpc as pb_grpc
from coordinator.rpc.handshakes import AUDIT_KIND, OVERALL_PER_MIN, HandshakeRefusals, peer_host
from coordinator.state.audit import read_events

ROOT = Path(__file__).resolve().parent.parent

# --- gRPC core's log, as grpcio 1.85 writes it (args trimmed) ---------------------------------------------------------

# The coordinator's listening port as the synthetic log lines below name it. Nothing binds it: these tests parse text
# (the end-to-end test further down binds port 0 and reads the port it got).
LOG_PORT = 7443
LOG_LOCAL = f"ipv4:127.0.0.1:{LOG_PORT}"

ARGS = (
    "args={{endpoint=0x7f1, args={{grpc.internal.endpoint_local_address=ipv4:127.0.0.1:{port}, "
    "grpc.internal.endpoint_peer_address={peer}, grpc.internal.server_credentials=0x55}}, "
    "read_buffer.Length()=0, exit_early=0}}"
)


def failed_handshake(thread: int, error: str, peer: str, port: int = LOG_PORT) -> list[bytes]:
    """The lines gRPC core (with the handshaker tracer) writes for one refused server handshake."""
    args = ARGS.format(port=port, peer=peer)
    lines = [
        # Every connection: the tracer's records before the TLS handshake starts.
        f"I1204 14:27:00.450000   {thread} handshaker.cc:155] CallNextHandshakerLocked: error=OK shutdown=false "
        f"index=1, {args}",
        f"I1204 14:27:00.452997   {thread} ssl_transport_security.cc:2563] Handshake failed with error {error}",
        f"I1204 14:27:00.453085   {thread} handshaker.cc:155] CallNextHandshakerLocked: error=UNKNOWN: Ssl "
        f"handshake failed (TSI_PROTOCOL_FAILURE): {error}: OK",
        "=== Source Location Trace: === ",
        "src/core/util/status_helper.cc:68",
        f" shutdown=false index=2, {args}",
        f"I1204 14:27:00.453110   {thread} channel_trace.h:396] handshake manager 0x7f7: Failed with error: "
        f"UNKNOWN: Ssl handshake failed (TSI_PROTOCOL_FAILURE): {error}: OK",
        "=== Source Location Trace: === ",
        "src/core/util/status_helper.cc:68",
        "",
    ]
    return [(line + "\n").encode() for line in lines]


def tracer_noise(thread: int) -> list[bytes]:
    args = ARGS.format(port=LOG_PORT, peer="ipv4:127.0.0.1:40000")
    return [
        f"I1204 14:27:00.1   {thread} handshaker.cc:80] handshake_manager 0x7f7: adding handshaker security\n".encode(),
        f"I1204 14:27:00.2   {thread} handshaker.cc:155] CallNextHandshakerLocked: error=OK shutdown=false "
        f"index=1, {args}\n".encode(),
        f"I1204 14:27:00.3   {thread} channel_trace.h:396] handshake manager 0x7f7:  calling handshaker sec\n".encode(),
    ]


SSL = "SSL_ERROR_SSL: error:1000007d:SSL routines:OPENSSL_internal:"
CASES = {
    "no_certificate": "SSL_ERROR_SSL: error:100000c0:SSL routines:OPENSSL_internal:PEER_DID_NOT_RETURN_A_CERTIFICATE: "
    "Invalid certificate verification context",
    "unknown_ca": SSL + "CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate",
    "expired": SSL + "CERTIFICATE_VERIFY_FAILED: certificate has expired",
    "not_yet_valid": SSL + "CERTIFICATE_VERIFY_FAILED: certificate is not yet valid",
    "wrong_purpose": SSL + "CERTIFICATE_VERIFY_FAILED: unsupported certificate purpose",
    "bad_certificate": SSL + "CERTIFICATE_VERIFY_FAILED: certificate signature failure",
    "protocol": "SSL_ERROR_SSL: error:1000009c:SSL routines:OPENSSL_internal:HTTP_REQUEST: Invalid certificate "
    "verification context",
}


def run(core: CoreLogFilter, lines: list[bytes]) -> tuple[bytes, list[HandshakeFailure]]:
    out: list[bytes] = []
    events: list[HandshakeFailure] = []
    for line in lines:
        o, e = core.feed(line)
        out += o
        events += e
    o, e = core.close()
    return b"".join(out + o), events + e


@pytest.mark.parametrize(("reason", "error"), CASES.items())
def test_classify_names_the_reason(reason: str, error: str) -> None:
    assert classify(error)[0] == reason
    assert classify("UNAVAILABLE: Handshake read failed (Socket closed)")[0] == "incomplete"


def test_filter_turns_refusals_into_events_and_drops_only_the_tracer() -> None:
    ours = [
        b"I1204 14:26:59.0   1 trace.cc:91] gRPC Tracers: tcp, handshaker\n",  # the operator asked for tcp
        b"2026-12-04 14:27:00,100 INFO    cohort.coordinator: listening\n",
    ]
    other_core = [b"E1204 14:27:00.5   7 chttp2_transport.cc:1] keepalive watchdog timeout\n"]
    lines = [b"I1204 14:26:59.0   1 trace.cc:91] gRPC Tracers: handshaker\n", *ours, *tracer_noise(3)]
    for i, error in enumerate(CASES.values()):
        lines += failed_handshake(3 + i % 2, error, f"ipv4:10.0.0.{i}:4{i}000")
    lines += [*other_core, b"Traceback (most recent call last):\n", b"  File x.py, line 1\n"]
    text, events = run(CoreLogFilter(), lines)
    assert [(e.peer, e.reason) for e in events] == [(f"ipv4:10.0.0.{i}:4{i}000", r) for i, r in enumerate(CASES)]
    assert all(e.local == LOG_LOCAL for e in events)
    assert events[2].detail == "CERTIFICATE_VERIFY_FAILED: certificate has expired"
    # What remains is exactly what was not the tracer's or BoringSSL's handshake lines, in order.
    assert text == b"".join([*ours, *other_core, b"Traceback (most recent call last):\n", b"  File x.py, line 1\n"])


def test_filter_process_writes_events_as_json_lines() -> None:
    lines = [*tracer_noise(3), *failed_handshake(3, CASES["no_certificate"], "ipv4:10.1.2.3:999"), b"kept\n"]
    text, events = io.BytesIO(), io.StringIO()
    run_filter(TracerSetup(consume=True), lines, text, events)
    assert text.getvalue() == b"kept\n"
    assert [json.loads(e) for e in events.getvalue().splitlines()] == [
        {
            "peer": "ipv4:10.1.2.3:999",
            "local": LOG_LOCAL,
            "reason": "no_certificate",
            "detail": "PEER_DID_NOT_RETURN_A_CERTIFICATE",
        }
    ]


def test_a_daemon_that_dies_abruptly_still_has_its_last_words_printed() -> None:
    """The filter is a process of its own: it prints what it was sent after the daemon is gone (no atexit ran)."""
    code = (
        "import os, sys\n"
        "from common.handshake_log import start_filter\n"
        "assert start_filter(os.environ) is not None\n"
        "sys.stderr.write('last words\\n'); sys.stderr.flush()\n"
        "os._exit(3)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False, cwd=ROOT
    )
    assert result.returncode == 3
    assert result.stderr == "last words\n"


def test_filter_passes_everything_through_when_the_operator_traces_handshakes_too() -> None:
    lines = [*tracer_noise(3), *failed_handshake(3, CASES["expired"], "ipv6:[::1]:5555"), b"plain line\n"]
    text, events = run(CoreLogFilter(consume=False), lines)
    assert text == b"".join(lines)
    assert [(e.peer, e.reason) for e in events] == [("ipv6:[::1]:5555", "expired")]


def test_without_the_tracer_a_refusal_is_still_reported_and_shown() -> None:
    """If a gRPC release stops writing the tracer's records, refusals still come out (peer unknown)."""
    ssl_line = failed_handshake(9, CASES["unknown_ca"], "x")[1]
    assert ssl_line.startswith(b"I1204 14:27:00.452997   9 ssl_transport_security.cc")
    text, events = run(CoreLogFilter(), [ssl_line])
    assert [(e.peer, e.reason) for e in events] == [("unknown", "unknown_ca")]
    assert text == ssl_line


def test_filter_applies_the_operators_grpc_verbosity() -> None:
    lines = [b"I1204 14:27:00.5   7 x.cc:1] info\n", b"E1204 14:27:00.5   7 x.cc:2] error\n", b"ours\n"]
    assert run(CoreLogFilter(min_level="E"), lines)[0] == b"E1204 14:27:00.5   7 x.cc:2] error\nours\n"
    assert run(CoreLogFilter(min_level="Z"), lines)[0] == b"ours\n"


def test_tracer_env_adds_the_tracer_and_keeps_the_operators_settings() -> None:
    env: dict[str, str] = {}
    assert tracer_env(env) == TracerSetup(consume=True, min_level="I")
    assert env == {"GRPC_TRACE": "handshaker"}
    env = {"GRPC_TRACE": "tcp", "GRPC_VERBOSITY": "error"}
    assert tracer_env(env) == TracerSetup(consume=True, min_level="E")
    assert env == {"GRPC_TRACE": "tcp,handshaker", "GRPC_VERBOSITY": "INFO"}
    env = {"GRPC_TRACE": "handshaker,api"}
    assert tracer_env(env) == TracerSetup(consume=False, min_level="I")
    assert env == {"GRPC_TRACE": "handshaker,api"}


def test_only_the_coordinator_command_turns_the_tracer_on() -> None:
    assert command_of(["--log-level", "debug", "coordinator", "--config", "c.yaml"]) == "coordinator"
    assert command_of(["--log-level=info", "status"]) == "status"
    assert command_of(["--version"]) is None


# --- the throttle -------------------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def refusal(peer: str, reason: str = "expired", port: int = LOG_PORT) -> HandshakeFailure:
    return HandshakeFailure(peer, f"ipv4:127.0.0.1:{port}", reason, "detail")


def test_refusals_are_throttled_per_peer_host_and_reason(caplog: pytest.LogCaptureFixture) -> None:
    audited: list[tuple[str, str, dict[str, Any]]] = []
    clock = Clock()
    refusals = HandshakeRefusals(lambda kind, actor, **d: audited.append((kind, actor, d)), LOG_PORT, clock=clock)
    with caplog.at_level(logging.INFO, logger="cohort.coordinator.tls"):
        for port in range(40000, 40005):  # one host reconnecting: a new source port each time
            refusals.report(refusal(f"ipv4:10.0.0.1:{port}"))
        refusals.report(refusal("ipv4:10.0.0.1:40009", "no_certificate"))  # another reason: its own line
        refusals.report(refusal("ipv4:10.0.0.2:40000"))  # another host
        refusals.report(refusal("ipv4:10.0.0.3:1", "incomplete"))  # a port scan: logged at INFO, not audited
        refusals.report(refusal("ipv4:10.0.0.4:1", port=9100))  # not our listener
        clock.now += 61
        refusals.report(refusal("ipv4:10.0.0.1:40100"))
    assert [(d["peer"], d["reason"], d["held_back"]) for _, _, d in audited] == [
        ("ipv4:10.0.0.1:40000", "expired", 0),
        ("ipv4:10.0.0.1:40009", "no_certificate", 0),
        ("ipv4:10.0.0.2:40000", "expired", 0),
        ("ipv4:10.0.0.1:40100", "expired", 4),
    ]
    assert {(kind, actor) for kind, actor, _ in audited} == {(AUDIT_KIND, "unauthenticated")}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert next(r.getMessage() for r in warnings) == (
        "TLS handshake refused: peer=ipv4:10.0.0.1:40000 reason=expired detail='detail'"
    )
    assert "(+4 more from this host in the last minute)" in warnings[-1].getMessage()
    assert [(r.peer, r.reason) for r in warnings][:2] == [  # type: ignore[attr-defined]
        ("ipv4:10.0.0.1:40000", "expired"),
        ("ipv4:10.0.0.1:40009", "no_certificate"),
    ]
    assert [r.levelno for r in caplog.records if "10.0.0.3" in r.getMessage()] == [logging.INFO]


def test_a_flood_from_many_hosts_is_capped_overall() -> None:
    audited: list[dict[str, Any]] = []
    clock = Clock()
    refusals = HandshakeRefusals(lambda kind, actor, **d: audited.append(d), None, clock=clock)
    for i in range(OVERALL_PER_MIN + 50):
        refusals.report(refusal(f"ipv6:[2001:db8::{i:x}]:443"))
    assert len(audited) == OVERALL_PER_MIN
    clock.now += 60
    refusals.report(refusal("ipv4:10.9.9.9:1"))
    assert audited[-1]["others_held_back"] == 50


def test_peer_host_strips_scheme_and_port() -> None:
    assert peer_host("ipv4:10.0.0.7:51234") == "10.0.0.7"
    assert peer_host("ipv6:[::1]:5555") == "::1"
    assert peer_host("unknown") == "unknown"


# --- a real coordinator process and real clients -----------------------------------------------------------------


def odd_certificate(pki: Pki, directory: Path, *, days_from_now: int, eku: list[x509.ObjectIdentifier]) -> TlsFiles:
    """A site-a certificate from the federation's own CA, valid from ``days_from_now``, with ``eku``."""
    ca_cert, ca_key = load_ca(pki.root / "certs" / "ca")
    key = new_private_key()
    start = dt.datetime.now(dt.UTC) + dt.timedelta(days=days_from_now)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "test"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "participant"),
            x509.NameAttribute(NameOID.COMMON_NAME, SITES[0]),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=30))
        .add_extension(x509.ExtendedKeyUsage(eku), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return write_identity(directory, pki.coordinator.ca.read_bytes(), cert_pem(cert), key_pem(key))


def ssl_client(address: str, ca: Path, files: TlsFiles | None) -> int:
    """A TLS 1.3 handshake with Python's ssl module; returns the client's source port. The server's refusal shows
    on the first read (TLS 1.3 finishes the client's side before the server checks its certificate)."""
    host, port = address.rsplit(":", 1)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(ca)
    ctx.set_alpn_protocols(["h2"])
    if files is not None:
        ctx.load_cert_chain(files.cert, files.key)
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        source = int(raw.getsockname()[1])
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            try:
                tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
                assert tls.recv(64) == b"", "the coordinator accepted a certificate it must refuse"
            except (ssl.SSLError, ConnectionError):
                pass
    return source


def plain_http(address: str) -> int:
    """Not TLS at all: an HTTP request on the TLS port; returns the client's source port."""
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        source = int(raw.getsockname()[1])
        raw.sendall(b"GET / HTTP/1.1\r\nHost: coordinator\r\n\r\n")
        with contextlib.suppress(ConnectionError):
            while raw.recv(4096):
                pass
    return source


async def grpc_refused(address: str, files: TlsFiles | None, ca: Path) -> None:
    async with channel(address, files, ca) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await pb_grpc.FederationStub(ch).Join(join_request(), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def cohort_audit(capsys: pytest.CaptureFixture[str], state: Path, *args: str) -> str:
    """`cohort audit list` on the state directory (in this process: the command's imports take seconds); stdout."""
    capsys.readouterr()
    assert main(["audit", "list", "--state-dir", str(state), *args]) == 0
    return capsys.readouterr().out


@pytest.fixture
def coordinator_process(pki: Pki, tmp_path: Path) -> Iterator[tuple[str, Path, Path]]:
    """`cohort coordinator` as an operator starts it: (address, state_dir, stderr file)."""
    c = pki.coordinator
    config, ready, stderr, state = (tmp_path / n for n in ("coordinator.yaml", "ready", "stderr.log", "state"))
    config.write_text(
        f"federation: {{name: test, sites: [{', '.join(SITES)}]}}\n"
        f"server: {{listen: '127.0.0.1:0', tls: {{ca: '{c.ca}', cert: '{c.cert}', key: '{c.key}'}}}}\n"
        f"state_dir: '{state}'\n"
        "http: {listen: '127.0.0.1:0'}\n"  # /metrics counts the refusals too
    )
    argv = [sys.executable, "-m", "cohort_cli", "coordinator", "--config", str(config), "--ready-file", str(ready)]
    with stderr.open("wb") as err:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
    try:
        yield wait_ready_file(ready, proc, 60, stderr.read_text), state, stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, stderr.read_text()


@pytest.mark.slow
async def test_every_refusal_class_is_logged_with_the_peer_and_audited(
    pki: Pki, tmp_path: Path, coordinator_process: tuple[str, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    address, state, stderr = coordinator_process
    ca = pki.coordinator.ca
    future = odd_certificate(pki, tmp_path / "future", days_from_now=2, eku=[ExtendedKeyUsageOID.CLIENT_AUTH])
    server_only = odd_certificate(pki, tmp_path / "server", days_from_now=-1, eku=[ExtendedKeyUsageOID.SERVER_AUTH])
    # Real gRPC clients: no certificate, another CA's, an expired one.
    await grpc_refused(address, None, ca)
    await grpc_refused(address, pki.foreign, ca)
    await grpc_refused(address, pki.expired, ca)
    # Python ssl sockets, whose source port we know: not yet valid, not for client use; then no TLS at all.
    ports = {
        "not_yet_valid": await asyncio.to_thread(ssl_client, address, ca, future),
        "wrong_purpose": await asyncio.to_thread(ssl_client, address, ca, server_only),
        "protocol": await asyncio.to_thread(plain_http, address),
    }
    # A valid site still joins.
    async with channel(address, pki.site(SITES[1]), ca) as ch:
        assert (await pb_grpc.FederationStub(ch).Join(join_request(), timeout=10)).site_id == SITES[1]

    reasons = ["no_certificate", "unknown_ca", "expired", "not_yet_valid", "wrong_purpose", "protocol"]
    db = state / "coordinator.db"

    def audited() -> list[dict[str, Any]]:
        return read_events(db, [AUDIT_KIND])

    await poll_until(
        lambda: sorted(e["detail"]["reason"] for e in audited()) == sorted(reasons),
        timeout=30,
        interval=0.05,
        what=f"one audit event per refusal class ({', '.join(reasons)})",
    )
    events = {e["detail"]["reason"]: e for e in audited()}
    assert all(e["actor"] == "unauthenticated" for e in events.values())
    for reason, port in ports.items():
        assert events[reason]["detail"]["peer"] == f"ipv4:127.0.0.1:{port}"
    assert all(e["detail"]["peer"].startswith("ipv4:127.0.0.1:") for e in events.values())

    # `cohort audit list` prints them, one line each.
    listed = cohort_audit(capsys, state, "--kind", AUDIT_KIND).splitlines()
    assert len(listed) == len(reasons)
    for reason in reasons:
        [line] = [x for x in listed if f'reason="{reason}"' in x]
        assert AUDIT_KIND in line
        assert "unauthenticated" in line
        assert 'peer="ipv4:127.0.0.1:' in line
    as_json = cohort_audit(capsys, state, "--json", "--last", "0")
    assert {e["detail"].get("reason") for e in json.loads(as_json) if e["kind"] == AUDIT_KIND} == set(reasons)

    # The log: one WARNING line per class with the peer address, and none of gRPC's tracer lines.
    log = stderr.read_text()
    for reason in reasons:
        [line] = [x for x in log.splitlines() if f"reason={reason} " in x]
        assert "WARNING" in line
        assert "TLS handshake refused: peer=ipv4:127.0.0.1:" in line
    for reason, port in ports.items():
        assert f"peer=ipv4:127.0.0.1:{port} reason={reason} " in log
    assert "CallNextHandshakerLocked" not in log
    # /metrics counts every refusal by reason (before the log and audit throttles).
    [http] = re.findall(r"operations HTTP listening on http://(\S+) ", log)
    status, body = await asyncio.to_thread(probe, f"http://{http}/metrics", 10)
    assert status == 200
    counted = {
        s.labels["reason"]: s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
        if s.name == "cohort_tls_handshakes_refused_total"
    }
    assert counted == dict.fromkeys(reasons, 1.0)
    assert "handshake_manager" not in log
    assert "Handshake failed with error" not in log
