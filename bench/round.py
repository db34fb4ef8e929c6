"""What a round costs compared with moving its bytes through TLS once.

Runs a real coordinator and K participant daemons over mutual TLS on 127.0.0.1 with a model of about 8.4 million
float32 parameters (32 MiB) whose "training" step is trivial, so the round time is the protocol's own cost:
K model downloads + K update uploads + verification + aggregation + writing the new model. The baseline moves the
same number of bytes through a plain TLS 1.3 socket on loopback with the same certificates.

    .venv/bin/python bench/round.py [--sites 3] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the test-only large-model task lives there

from common.ca import init_federation  # noqa: E402
from common.certs import TlsFiles  # noqa: E402
from common.datasets import load_source, split_sites, write_site_folders  # noqa: E402
from common.settings import TrainParamsConfig  # noqa: E402
from coordinator.config import CoordinatorConfig, FederationConfig, JobConfig, ServerConfig  # noqa: E402
from coordinator.daemon import CoordinatorDaemon  # noqa: E402
from participant.config import CoordinatorEndpoint, ParticipantConfig  # noqa: E402
from participant.daemon import ParticipantDaemon  # noqa: E402


def tls(f: TlsFiles) -> TlsFiles:
    return TlsFiles(ca=f.ca, cert=f.cert, key=f.key)


async def federation_round(tmp: Path, sites: int, rounds: int) -> tuple[list[float], int]:
    names = [f"site-{i}" for i in range(sites)]
    ids = init_federation(tmp / "certs", sites=names, admins=("admin",))
    x, y, schema = load_source("breast_cancer")
    folders = write_site_folders(tmp / "data", split_sites(x, y, names, alpha=None, seed=0), schema)
    job = JobConfig(task="big_task:TASK", rounds=rounds, min_sites=sites, evaluate_every=0, params=TrainParamsConfig())
    cfg = CoordinatorConfig(
        federation=FederationConfig(sites=tuple(names)),
        server=ServerConfig(listen="127.0.0.1:0", tls=tls(ids["coordinator"])),
        state_dir=tmp / "state",
        job=job,
    )
    coord = CoordinatorDaemon(cfg)
    await coord.start()
    parts = [
        ParticipantDaemon(
            ParticipantConfig(
                tls=tls(ids[f"site:{n}"]),
                data_dir=folders[n],
                task="big_task:TASK",
                coordinator=CoordinatorEndpoint(address=coord.address),
            )
        )
        for n in names
    ]
    for p in parts:
        await p.start()
    runner = coord.coordinator.runner
    assert runner is not None
    model_bytes = len(runner.global_model.data)
    await coord.coordinator.jobs.wait()
    rows = [r for r in coord.coordinator.store.rounds(runner.job_id) if r.state == "completed"]
    for p in parts:
        await p.close()
    await coord.close()
    return [r.finished - r.started for r in rows if r.finished], model_bytes


async def tls_baseline(tmp: Path, total_bytes: int) -> float:
    ids = init_federation(tmp / "certs2", sites=["a"], admins=("admin",))
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    server_ctx.load_cert_chain(ids["coordinator"].cert, ids["coordinator"].key)
    server_ctx.load_verify_locations(ids["coordinator"].ca)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    client_ctx = ssl.create_default_context(cafile=str(ids["site:a"].ca))
    client_ctx.load_cert_chain(ids["site:a"].cert, ids["site:a"].key)
    done = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got = 0
        while got < total_bytes:
            data = await reader.read(1 << 20)
            if not data:
                break
            got += len(data)
        writer.close()
        done.set()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    chunk = b"\x5a" * (1 << 20)
    t0 = time.perf_counter()
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx, server_hostname="localhost")
    sent = 0
    while sent < total_bytes:
        writer.write(chunk)
        await writer.drain()
        sent += len(chunk)
    await done.wait()
    seconds = time.perf_counter() - t0
    writer.close()
    server.close()
    return seconds


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        times, model_bytes = await federation_round(Path(tmp), args.sites, args.rounds)
        moved = 2 * args.sites * model_bytes  # every site downloads the model and uploads an update
        baseline = await tls_baseline(Path(tmp), moved)
    best = min(times)
    print(f"model {model_bytes / 2**20:.1f} MiB, {args.sites} sites: {moved / 2**20:.0f} MiB through TLS per round")
    print(f"round times (s): {', '.join(f'{t:.2f}' for t in times)}; best {best:.2f}")
    print(f"plain TLS 1.3 loopback transfer of the same bytes: {baseline:.2f}s")
    print(f"round / raw transfer: {best / baseline:.2f}x")


if __name__ == "__main__":
    asyncio.run(main())
