"""The operations HTTP endpoint: /healthz and /readyz answered by real daemons, and /readyz going 503 while a real
coordinator process drains after SIGTERM."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support import (
    SITES,
    CoordinatorFactory,
    ParticipantFactory,
    Pki,
    channel,
    coordinator_config,
    participant_config,
    poll_until,
    running,
    wait_until,
)

from common import config as loader
from common.errors import ConfigError
from common.ops_http import OpsHttpServer, Response, probe
from common.settings import HttpConfig
from coordinator.config import CoordinatorConfig
from participant.config import ParticipantConfig

ROOT = Path(__file__).resolve().parent.parent


def get(address: str, path: str) -> tuple[int, str]:
    return probe(f"http://{address}{path}", timeout=5)


def request(address: str, method: str, path: str) -> int:
    import http.client

    host, _, port = address.rpartition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        conn.request(method, path)
        return conn.getresponse().status
    finally:
        conn.close()


# --- the server alone ----------------------------------------------------------------------------------------


def test_routes_and_readiness() -> None:
    missing: list[str] = ["store not open"]
    server = OpsHttpServer("127.0.0.1:0", lambda: missing)
    address = server.start()
    try:
        assert re.fullmatch(r"127\.0\.0\.1:\d+", address)
        assert not address.endswith(":0")
        assert server.start() == address  # idempotent
        assert get(address, "/healthz") == (200, "ok\n")
        status, body = get(address, "/readyz")
        assert status == 503
        assert json.loads(body) == {"ready": False, "waiting_for": ["store not open"]}
        missing.clear()
        status, body = get(address, "/readyz")
        assert (status, json.loads(body)) == (200, {"ready": True})
        assert get(address, "/nope")[0] == 404
        assert request(address, "POST", "/healthz") == 405
        assert request(address, "HEAD", "/readyz") == 200
        # The table others extend (Prometheus /metrics, a dashboard); a failing route is a 500, not a dead server.
        server.add_route("/metrics", lambda: Response(200, b"cohort_up 1\n", "text/plain; version=0.0.4"))
        server.add_route("/boom", lambda: 1 / 0)  # type: ignore[arg-type, return-value]
        assert get(address, "/metrics") == (200, "cohort_up 1\n")
        assert get(address, "/boom")[0] == 500
        assert get(address, "/healthz")[0] == 200
        with pytest.raises(ValueError, match="must start with '/'"):
            server.add_route("metrics", lambda: Response(200, b""))
    finally:
        server.close()
    server.close()  # idempotent
    assert get(address, "/healthz")[0] == 0, "still answering after close()"


def test_probe_command_exit_codes() -> None:
    server = OpsHttpServer("127.0.0.1:0", lambda: ["joining"])
    address = server.start()
    try:

        def run(url: str) -> subprocess.CompletedProcess[str]:
            argv = [sys.executable, "-m", "common.ops_http", "probe", url]
            return subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd=ROOT, check=False)

        assert run(f"http://{address}/healthz").returncode == 0
        failed = run(f"http://{address}/readyz")
        assert failed.returncode == 1
        assert "503" in failed.stderr
        assert "joining" in failed.stderr
    finally:
        server.close()
    assert run(f"http://{address}/healthz").returncode == 1  # nothing listens any more


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("http: {listen: nowhere}\n", "http.listen: expected host:port"),
        ("http: {listen: '127.0.0.1:9100', port: 1}\n", "http.port: unknown key"),
        ("http: {listen: 9100}\n", "http.listen: expected a string"),
    ],
)
def test_http_section_is_strict(tmp_path: Path, text: str, named: str) -> None:
    base = "task: breast_cancer\ndata_dir: d\ntls: {ca: a, cert: b, key: c}\n"
    for cls, head in (
        (ParticipantConfig, base),
        (CoordinatorConfig, "federation: {sites: [a]}\nserver: {tls: {ca: a, cert: b, key: c}}\n"),
    ):
        path = tmp_path / "c.yaml"
        path.write_text(head + text)
        with pytest.raises(ConfigError, match=re.escape(named)):
            loader.load(cls, path)
        path.write_text(head + "http:\n")  # present but empty: off, like absent
        assert not loader.load(cls, path).http.enabled  # type: ignore[attr-defined]
        path.write_text(head)
        assert loader.load(cls, path).http == HttpConfig()  # type: ignore[attr-defined]


# --- in the daemons ------------------------------------------------------------------------------------------


async def test_coordinator_and_participant_readiness(
    pki: Pki,
    tmp_path: Path,
    site_data: dict[str, Path],
    coordinator_factory: CoordinatorFactory,
    participant_factory: ParticipantFactory,
) -> None:
    config = coordinator_config(pki, tmp_path / "state")
    coordinator = await coordinator_factory(replace(config, http=HttpConfig("127.0.0.1:0")))
    assert coordinator.ops_http is not None
    http = coordinator.ops_http.address
    assert await asyncio.to_thread(get, http, "/readyz") == (200, '{"ready": true}\n')
    # The dashboard shows admin-level status to whoever reaches the port: off unless http.dashboard is set.
    assert (await asyncio.to_thread(get, http, "/dashboard"))[0] == 404
    assert (await asyncio.to_thread(get, http, "/api/dashboard"))[0] == 404
    assert (await asyncio.to_thread(get, http, "/metrics"))[0] == 200

    site = SITES[0]
    pconfig = participant_config(pki.site(site), coordinator.address, site_data[site])
    participant = await participant_factory(replace(pconfig, http=HttpConfig("127.0.0.1:0")))
    assert participant.ops_http is not None
    phttp = participant.ops_http.address

    async def ready() -> bool:
        return (await asyncio.to_thread(get, phttp, "/readyz"))[0] == 200

    await poll_until(ready, timeout=30, what="the participant's /readyz after Join")
    assert participant.joined.is_set()
    # The coordinator goes away: the site is alive but no longer ready (it has no session).
    await coordinator.close("test")
    await poll_until(
        lambda: asyncio.to_thread(lambda: get(phttp, "/readyz")[0] == 503), timeout=30, what="participant not ready"
    )
    assert (await asyncio.to_thread(get, phttp, "/healthz"))[0] == 200
    assert (await asyncio.to_thread(get, http, "/healthz"))[0] == 0, "the coordinator's endpoint outlived close()"
    await participant.close("test")
    assert (await asyncio.to_thread(get, phttp, "/healthz"))[0] == 0


@pytest.mark.slow
def test_readyz_is_503_while_the_coordinator_drains_after_sigterm(pki: Pki, tmp_path: Path) -> None:
    """A real coordinator process: SIGTERM, then /readyz answers 503 ("draining") while /healthz still answers 200,
    for as long as an RPC in flight holds the drain open (a health Watch stream here); then the process exits 0."""
    c = pki.coordinator
    config = tmp_path / "coordinator.yaml"
    config.write_text(
        "federation: {name: test, sites: [site-a]}\n"
        f"server: {{listen: '127.0.0.1:0', shutdown_grace_s: 60, tls: {{ca: '{c.ca}', cert: '{c.cert}', "
        f"key: '{c.key}'}}}}\n"
        f"state_dir: '{tmp_path / 'state'}'\n"
        "http: {listen: '127.0.0.1:0'}\n"
    )
    ready_file, log_path = tmp_path / "addr", tmp_path / "coordinator.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cohort_cli",
                "coordinator",
                "--config",
                str(config),
                "--ready-file",
                str(ready_file),
            ],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:

        def bound_http() -> str:
            found = re.search(r"operations HTTP listening on http://(\S+) ", log_path.read_text())
            return found.group(1) if found else ""

        started = lambda: ready_file.exists() and bool(bound_http())  # noqa: E731
        wait_until(started, 60, "the coordinator to start", alive=running(proc, log_path.read_text))
        http = bound_http()
        grpc_address = ready_file.read_text().strip()
        assert get(http, "/readyz")[0] == 200
        asyncio.run(_drain_while_watching(proc, grpc_address, http, pki))
        assert proc.wait(timeout=60) == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert get(http, "/healthz")[0] == 0


async def _drain_while_watching(proc: subprocess.Popen[bytes], address: str, http: str, pki: Pki) -> None:
    async with channel(address, pki.admin, pki.admin.ca) as ch:
        watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=""))
        first = await watch.read()
        assert first.status == health_pb2.HealthCheckResponse.SERVING  # the RPC is in flight on the server now
        proc.send_signal(signal.SIGTERM)

        async def draining() -> bool:
            status, body = await asyncio.to_thread(get, http, "/readyz")
            return status == 503 and "draining" in body

        await poll_until(draining, timeout=30, what="/readyz 503 during the drain")
        assert (await asyncio.to_thread(get, http, "/healthz"))[0] == 200, "alive while draining"
        # The gRPC health service says the same to a client that watches it.
        update = await asyncio.wait_for(watch.read(), timeout=30)
        assert update.status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert proc.poll() is None, "the drain ended before the RPC in flight did"
        assert (await asyncio.to_thread(get, http, "/readyz"))[0] == 503
        watch.cancel()  # the last RPC ends: the server stops, the store closes, the process exits
