"""What reporting refused TLS handshakes costs: gRPC tracer output per connection, and the log filter's speed.

Not a test: numbers go into the README. A real ``cohort coordinator`` process runs with the operator's own
``GRPC_TRACE=handshaker`` (so the filter passes the tracer's lines through and they can be counted); real gRPC
clients open ``--connections`` accepted connections (an admin's GetStatus) and as many refused ones (no client
certificate). Then the recorded log is replayed through :class:`common.handshake_log.CoreLogFilter`.

    .venv/bin/python bench/handshake_log.py [--connections 50]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

from common.ca import init_federation  # noqa: E402
from common.certs import TlsFiles  # noqa: E402
from common.handshake_log import CoreLogFilter  # noqa: E402
from common.proto.cohort.v1 import cohort_pb2 as pb  # noqa: E402
from common.proto.cohort.v1 import cohort_pb2_grpc as pb_grpc  # noqa: E402
from coordinator.state.audit import read_events  # noqa: E402

TRACER_MARKS = (b"handshaker.cc", b"channel_trace.h", b"Handshake failed with error", b"=== Source Location", b"src/")


def credentials(ca: Path, files: TlsFiles | None) -> grpc.ChannelCredentials:
    if files is None:
        return grpc.ssl_channel_credentials(root_certificates=ca.read_bytes())
    return grpc.ssl_channel_credentials(ca.read_bytes(), files.key.read_bytes(), files.cert.read_bytes())


async def connect(address: str, creds: grpc.ChannelCredentials, n: int) -> int:
    """``n`` fresh connections (one channel each, no shared subchannel); returns how many calls succeeded."""
    ok = 0
    for i in range(n):
        options = [("grpc.use_local_subchannel_pool", 1), ("bench.connection", i)]
        async with grpc.aio.secure_channel(address, creds, options=options) as ch:
            try:
                await pb_grpc.AdminStub(ch).GetStatus(pb.StatusRequest(), timeout=10)
                ok += 1
            except grpc.aio.AioRpcError:
                pass
    return ok


def tracer_bytes(log: bytes) -> int:
    return sum(len(line) + 1 for line in log.split(b"\n") if any(m in line for m in TRACER_MARKS) or not line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--connections", type=int, default=50)
    args = parser.parse_args()
    n = args.connections
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ids = init_federation(work / "certs", sites=["site-a"], admins=["admin"], federation="bench")
        c = ids["coordinator"]
        config, ready, stderr, state = (work / x for x in ("c.yaml", "ready", "stderr.log", "state"))
        config.write_text(
            "federation: {name: bench, sites: [site-a]}\n"
            f"server: {{listen: '127.0.0.1:0', tls: {{ca: '{c.ca}', cert: '{c.cert}', key: '{c.key}'}}}}\n"
            f"state_dir: '{state}'\n"
        )
        env = dict(os.environ, GRPC_TRACE="handshaker")
        argv = [sys.executable, "-m", "cohort_cli", "coordinator", "--config", str(config), "--ready-file", str(ready)]
        with stderr.open("wb") as err:
            proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)
        try:
            deadline = time.monotonic() + 120
            while not ready.exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the coordinator did not start:\n{stderr.read_text()}")
                time.sleep(0.05)
            address = ready.read_text().strip()
            base = stderr.stat().st_size
            accepted = asyncio.run(connect(address, credentials(c.ca, ids["admin:admin"]), n))
            after_accepted = stderr.stat().st_size
            t0 = time.perf_counter()
            asyncio.run(connect(address, credentials(c.ca, None), n))
            refused_s = time.perf_counter() - t0
            time.sleep(1.0)  # the last records drain through the filter
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        log = stderr.read_bytes()
        events = read_events(state / "coordinator.db", ["tls_handshake_refused"])
    per_accepted = tracer_bytes(log[base:after_accepted]) / max(accepted, 1)
    per_refused = tracer_bytes(log[after_accepted:]) / n
    print(f"accepted connections: {accepted}/{n}; refused: {n} in {refused_s:.2f} s")
    print(f"gRPC tracer output per accepted connection: {per_accepted / 1024:.1f} KiB")
    print(f"gRPC tracer output per refused connection:  {per_refused / 1024:.1f} KiB")
    print(f"audit events for {n} refusals from one host within a minute: {len(events)}")

    lines = [line + b"\n" for line in log.split(b"\n")] * 20
    size = sum(map(len, lines))
    core = CoreLogFilter()
    t0 = time.perf_counter()
    found = sum(len(core.feed(line)[1]) for line in lines)
    elapsed = time.perf_counter() - t0
    print(
        f"filter: {size / elapsed / 2**20:.1f} MiB/s, {len(lines) / elapsed / 1000:.0f} k lines/s "
        f"({found} failures in {size / 2**20:.1f} MiB)"
    )


if __name__ == "__main__":
    main()
