"""Micro-benchmarks for the coordinator's upload path (issue 15, items 2, 4 and 6): what each piece of work per
byte costs, and which gRPC settings keep the receive path fast and its memory flat in the number of sites.

Part 1, primitives (one thread, in this process, a d-parameter float32 update, median of ``--repeats``): memcpy
(reference), digests (SHA-256, BLAKE2b, BLAKE2s, MD5, CRC-32), writing the update to a spool file (page cache) with
and without fsync, reading it back, today's finite check (in the spool pass) and fold at close
(coordinator/round/aggregation.py), the fixed-point fold with its checks (coordinator/round/accumulator.py), the
protobuf parse of a 1 MiB chunk against a raw-bytes parse, and masking an update for secure aggregation.

Part 2, the gRPC receive path: a server process (grpc.aio or the sync server, mutual TLS on 127.0.0.1, the
federation's certificates) takes N concurrent client-streaming uploads of d*4 bytes each, from N channels (one
connection per site, as in a deployment) in a client process. Variants change one thing at a time: chunk size,
protobuf vs raw-bytes deserialization, what the server does per chunk (nothing; today's spool + SHA-256; the
fixed-point fold with or without a digest, in a worker thread or on the event loop), server type, HTTP/2 flow
control (BDP probing off, which keeps each stream's window at 64 KiB) and admission (at most K uploads at once).
The server reports its CPU seconds, its peak RSS above its RSS before the uploads (VmHWM, reset through
/proc/self/clear_refs) and the event loop's worst delay.

    .venv/bin/python bench/upload_path.py                  # both parts; writes bench/results/upload_path-data.md
    .venv/bin/python bench/upload_path.py --part primitives --params 1e7
    .venv/bin/python bench/upload_path.py --part grpc --sites 5,20 --params 1e7 --variants proto-1m,raw-1m
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.soak import machine  # noqa: E402
from common.ca import init_federation  # noqa: E402
from common.certs import Role, TlsFiles  # noqa: E402
from common.proto.cohort.v1 import cohort_pb2 as pb  # noqa: E402
from common.raw_chunks import data_message, data_of  # noqa: E402
from common.serde import CHUNK_BYTES, Spec, new_hasher  # noqa: E402
from common.tls import channel_credentials, message_options, server_credentials  # noqa: E402
from coordinator.round.accumulator import FixedPointSum, Grid, UploadFold  # noqa: E402
from coordinator.round.aggregation import Float32Values, RunningSum  # noqa: E402

METHOD = "/bench.Upload/Send"
STATS = "/bench.Upload/Stats"


def timed(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# -- part 1: primitives ---------------------------------------------------------------------------------------------
def primitives(d: int, repeats: int, work: Path) -> list[tuple[str, float, float]]:
    """(what, seconds for d*4 bytes, GB/s) for each primitive."""
    rng = np.random.default_rng(0)
    values = (rng.standard_normal(d) * 1e-3).astype(np.float32)
    data = values.tobytes()
    nbytes = len(data)
    chunks = [data[i : i + CHUNK_BYTES] for i in range(0, nbytes, CHUNK_BYTES)]
    specs = [Spec("w", pb.DTYPE_FLOAT32, (d,))]
    spool = work / "spool.update"
    out: list[tuple[str, float, float]] = []

    def add(name: str, fn: Callable[[], object]) -> None:
        t = timed(fn, repeats)
        out.append((name, t, nbytes / t / 1e9))

    target = bytearray(nbytes)
    add("memcpy (reference)", lambda: target.__setitem__(slice(None), data))
    for algo in ("sha256", "blake2b", "blake2s", "md5"):
        add(f"digest {algo}", lambda algo=algo: hashlib.new(algo, data).digest())  # type: ignore[misc]
    add("digest crc32 (zlib)", lambda: zlib.crc32(data))

    def write(fsync: bool) -> None:
        with spool.open("wb") as f:
            for c in chunks:
                f.write(c)
            if fsync:
                f.flush()
                os.fsync(f.fileno())

    add("spool write, page cache only", lambda: write(False))
    add("spool write + fsync", lambda: write(True))

    def read_back() -> None:
        with spool.open("rb", buffering=0) as f:
            buf = bytearray(CHUNK_BYTES)
            while f.readinto(buf):
                pass

    add("spool read back (page cache)", read_back)

    def finite_check() -> None:  # today's finite check and L2 norm, in the spool's pass over the chunks
        values = Float32Values()
        for c in chunks:
            values.feed(c)
        values.finish()

    add("today: finite check + L2 norm (in the spool pass, from chunks)", finite_check)
    add("today: float32 fold at close (reads the spool)", lambda: RunningSum(specs).add_file(spool, 3.0))

    def fixed_fold() -> None:
        fold = UploadFold(FixedPointSum(d, Grid.choose(20, 1000)), 3)
        for c in chunks:
            fold.add(c)
        fold.commit()

    add("fixed-point fold + finite + range + L2 (from chunks)", fixed_fold)
    message = pb.UpdateChunk(data=chunks[0]).SerializeToString()
    per_chunk = nbytes / len(chunks[0])
    t = timed(lambda: [pb.UpdateChunk.FromString(message).data for _ in range(int(per_chunk))], repeats)
    out.append(("protobuf parse of 1 MiB data chunks", t, nbytes / t / 1e9))
    t = timed(lambda: [data_of(message) for _ in range(int(per_chunk))], repeats)
    out.append(("raw-bytes parse of 1 MiB data chunks (zero copy)", t, nbytes / t / 1e9))

    def hash_chunks() -> None:  # the digest as the spool computes it, chunk by chunk
        h = new_hasher(specs)
        for c in chunks:
            h.update(c)

    t = timed(hash_chunks, repeats)
    out.append(("sha256 chunk by chunk (as the spool does)", t, nbytes / t / 1e9))
    out += masking(d, repeats, nbytes)
    spool.unlink(missing_ok=True)
    return out


def masking(d: int, repeats: int, nbytes: int) -> list[tuple[str, float, float]]:
    """A site's masking of one update (two neighbours) and the coordinator's fold of one masked input."""
    from common.secagg import prg
    from common.secagg.encoding import EncodingParams, encode, pack

    enc = EncodingParams.choose(max_n=20, clip=1.0, bits=32)
    values = np.random.default_rng(1).standard_normal(d) * 1e-3
    t_enc = timed(lambda: encode(values, enc, 1.0), repeats)
    ints = encode(values, enc, 1.0)
    seed = os.urandom(prg.SEED_LEN)
    t_mask = timed(lambda: prg.apply_mask(ints, seed, 1, 32), repeats)
    t_pack = timed(lambda: pack(ints, 32), repeats)
    return [
        ("secagg: encode (clip, weight, stochastic rounding)", t_enc, nbytes / t_enc / 1e9),
        ("secagg: one mask stream (AES-CTR PRG)", t_mask, nbytes / t_mask / 1e9),
        ("secagg: bit-pack 32-bit lanes", t_pack, nbytes / t_pack / 1e9),
    ]


# -- part 2: the gRPC receive path ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    chunk: int = CHUNK_BYTES
    raw: bool = False  # raw-bytes deserializer instead of UpdateChunk.FromString
    sink: str = "discard"  # discard | today | fold | fold-nodigest | fold-inline
    server: str = "aio"  # aio | sync
    bdp: bool = True  # HTTP/2 BDP probing (grows each stream's flow-control window)
    admit: int = 0  # at most this many uploads at once (0: all)
    extra: tuple[tuple[str, int], ...] = field(default=())


VARIANTS: dict[str, Variant] = {
    "proto-256k": Variant(chunk=256 << 10),
    "proto-1m": Variant(),
    "proto-4m": Variant(chunk=4 << 20),
    "raw-1m": Variant(raw=True),
    "raw-4m": Variant(chunk=4 << 20, raw=True),
    "today-1m": Variant(sink="today"),
    "fold-raw-4m": Variant(chunk=4 << 20, raw=True, sink="fold"),
    "fold-nodigest-raw-4m": Variant(chunk=4 << 20, raw=True, sink="fold-nodigest"),
    "fold-inline-raw-4m": Variant(chunk=4 << 20, raw=True, sink="fold-inline"),
    "sync-raw-4m": Variant(chunk=4 << 20, raw=True, server="sync"),
    "nobdp-raw-4m": Variant(chunk=4 << 20, raw=True, bdp=False),
    "admit4-raw-4m": Variant(chunk=4 << 20, raw=True, admit=4),
    "nobdp-fold-raw-4m": Variant(chunk=4 << 20, raw=True, sink="fold", bdp=False),
}


def _identity(b: bytes) -> bytes:
    return b


class Sink:
    """What the server does with one upload's bytes."""

    def __init__(self, kind: str, d: int, spool: Path, total: FixedPointSum | None) -> None:
        self.kind, self.spool = kind, spool
        self.hasher = (
            new_hasher([Spec("w", pb.DTYPE_FLOAT32, (d,))]) if kind in ("today", "fold", "fold-inline") else None
        )
        self.file = spool.open("wb") if kind != "discard" else None
        self.values = Float32Values() if kind == "today" else None
        self.fold = UploadFold(total, 3) if total is not None and kind.startswith("fold") else None
        self.bytes = 0

    def take(self, data: bytes | memoryview) -> None:
        self.bytes += len(data)
        if self.hasher is not None:
            self.hasher.update(data)
        if self.values is not None:
            self.values.feed(data if isinstance(data, bytes) else bytes(data))
        if self.file is not None:
            self.file.write(data)
        if self.fold is not None:
            self.fold.add(data)

    def finish(self) -> None:
        if self.file is not None:
            self.file.flush()
            if self.kind == "today":
                os.fsync(self.file.fileno())
            self.file.close()
        if self.values is not None:
            self.values.finish()  # checked in the same pass; the fold at close reads the spool again (part 1 times it)
        if self.fold is not None:
            self.fold.commit()
        self.spool.unlink(missing_ok=True)


class Server:
    def __init__(self, variant: Variant, d: int, sites: int, work: Path) -> None:
        self.variant, self.d, self.work = variant, d, work
        self.total = FixedPointSum(d, Grid.choose(max(sites, 1), 1000)) if variant.sink.startswith("fold") else None
        self.lag = 0.0
        self.admission = asyncio.Semaphore(variant.admit) if variant.admit else None
        self.n = 0

    def parse(self, message: Any) -> bytes | memoryview:
        if self.variant.raw:
            data = data_of(message)
            if data is None:
                pb.UpdateChunk.FromString(message)  # the header
                return b""
            return data
        chunk = message
        return chunk.data if chunk.WhichOneof("kind") == "data" else b""

    async def upload(self, requests: AsyncIterator[Any], context: Any) -> bytes:
        if self.admission is not None:
            async with self.admission:
                return await self._upload(requests)
        return await self._upload(requests)

    async def _upload(self, requests: AsyncIterator[Any]) -> bytes:
        self.n += 1
        sink = Sink(self.variant.sink, self.d, self.work / f"up-{self.n}.part", self.total)
        async for message in requests:
            data = self.parse(message)
            if not data:
                continue
            if self.variant.sink in ("fold", "fold-nodigest"):
                await asyncio.to_thread(sink.take, data)
            else:
                sink.take(data)
        if self.variant.sink == "today":
            await asyncio.to_thread(sink.finish)
        else:
            sink.finish()
        return pb.UploadReply(accepted=True).SerializeToString()

    def upload_sync(self, requests: Iterator[Any], context: Any) -> bytes:
        self.n += 1
        sink = Sink(self.variant.sink, self.d, self.work / f"up-{self.n}.part", self.total)
        for message in requests:
            data = self.parse(message)
            if data:
                sink.take(data)
        sink.finish()
        return pb.UploadReply(accepted=True).SerializeToString()

    def stats(self, request: bytes, context: Any) -> bytes:
        if request == b"reset":
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            self.lag = 0.0
        usage = resource.getrusage(resource.RUSAGE_SELF)
        status = dict(
            (k, int(v.split()[0]))
            for k, _, v in (line.partition(":") for line in Path("/proc/self/status").read_text().splitlines())
            if k in ("VmRSS", "VmHWM")
        )
        return json.dumps(
            {
                "cpu_s": usage.ru_utime + usage.ru_stime,
                "rss_kib": status["VmRSS"],
                "hwm_kib": status["VmHWM"],
                "lag_s": self.lag,
            }
        ).encode()

    def handlers(self, sync: bool) -> grpc.GenericRpcHandler:
        deserialize = _identity if self.variant.raw else pb.UpdateChunk.FromString
        upload = grpc.stream_unary_rpc_method_handler(
            self.upload_sync if sync else self.upload, request_deserializer=deserialize, response_serializer=_identity
        )
        if sync:
            stats = grpc.unary_unary_rpc_method_handler(self.stats, _identity, _identity)
        else:

            async def stats_async(request: bytes, context: Any) -> bytes:
                return self.stats(request, context)

            stats = grpc.unary_unary_rpc_method_handler(stats_async, _identity, _identity)
        return grpc.method_handlers_generic_handler("bench.Upload", {"Send": upload, "Stats": stats})

    def options(self) -> list[tuple[str, Any]]:
        opts = message_options(self.variant.chunk + (64 << 10))
        if not self.variant.bdp:
            opts.append(("grpc.http2.bdp_probe", 0))
        return opts + list(self.variant.extra)

    async def ticker(self) -> None:
        while True:
            t0 = time.perf_counter()
            await asyncio.sleep(0.01)
            self.lag = max(self.lag, time.perf_counter() - t0 - 0.01)


def serve(variant: Variant, d: int, sites: int, certs: Path, port_file: Path) -> None:
    files = TlsFiles(
        ca=certs / "coordinator" / "ca.crt",
        cert=certs / "coordinator" / "tls.crt",
        key=certs / "coordinator" / "tls.key",
    )
    creds = server_credentials(files)
    server = Server(variant, d, sites, port_file.parent)
    if variant.server == "sync":
        from concurrent.futures import ThreadPoolExecutor

        sync_server = grpc.server(ThreadPoolExecutor(max_workers=sites + 4), options=server.options())
        sync_server.add_generic_rpc_handlers((server.handlers(True),))
        port = sync_server.add_secure_port("127.0.0.1:0", creds)
        sync_server.start()
        port_file.write_text(str(port))
        sync_server.wait_for_termination()
        return

    async def main() -> None:
        aio_server = grpc.aio.server(options=server.options())
        aio_server.add_generic_rpc_handlers((server.handlers(False),))
        port = aio_server.add_secure_port("127.0.0.1:0", creds)
        await aio_server.start()
        tick = asyncio.create_task(server.ticker())
        await asyncio.to_thread(port_file.write_text, str(port))
        await aio_server.wait_for_termination()
        tick.cancel()

    asyncio.run(main())


async def send_all(address: str, certs: Path, sites: int, d: int, chunk: int) -> float:
    """N concurrent uploads of d*4 bytes, one channel each; returns the wall seconds."""
    rng = np.random.default_rng(2)
    payload = (rng.standard_normal(chunk // 4) * 1e-3).astype(np.float32).tobytes()
    header = pb.UpdateChunk(header=pb.UpdateHeader(job_id="bench", round=1)).SerializeToString()
    data_msg = data_message(payload)
    total = 4 * d
    last = total % chunk
    last_msg = data_message(payload[:last]) if last else b""
    names = sorted(p.name for p in (certs / "sites").iterdir())[:sites]
    channels = []
    for name in names:
        files = TlsFiles(
            ca=certs / "sites" / name / "ca.crt",
            cert=certs / "sites" / name / "tls.crt",
            key=certs / "sites" / name / "tls.key",
        )
        creds = channel_credentials(files, Role.PARTICIPANT)
        opts = [*message_options(chunk + (64 << 10)), ("grpc.ssl_target_name_override", "localhost")]
        channels.append(grpc.aio.secure_channel(address, creds, options=opts))
    for ch in channels:
        await ch.channel_ready()

    async def one(ch: grpc.aio.Channel) -> None:
        call = ch.stream_unary(METHOD, request_serializer=_identity, response_deserializer=_identity)

        async def messages() -> AsyncIterator[bytes]:
            yield header
            for _ in range(total // chunk):
                yield data_msg
            if last_msg:
                yield last_msg

        await call(messages(), timeout=600)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(ch) for ch in channels))
    wall = time.perf_counter() - t0
    for ch in channels:
        await ch.close()
    return wall


async def stats(address: str, certs: Path, reset: bool) -> dict[str, float]:
    name = sorted(p.name for p in (certs / "sites").iterdir())[0]
    files = TlsFiles(
        ca=certs / "sites" / name / "ca.crt",
        cert=certs / "sites" / name / "tls.crt",
        key=certs / "sites" / name / "tls.key",
    )
    creds = channel_credentials(files, Role.PARTICIPANT)
    async with grpc.aio.secure_channel(address, creds, options=[("grpc.ssl_target_name_override", "localhost")]) as ch:
        call = ch.unary_unary(STATS, request_serializer=_identity, response_deserializer=_identity)
        reply: bytes = await call(b"reset" if reset else b"", timeout=30)
    result: dict[str, float] = json.loads(reply)
    return result


@dataclass(frozen=True)
class GrpcResult:
    variant: str
    sites: int
    params: int
    wall_s: float
    server_cpu_s: float
    peak_over_start_mib: float
    max_lag_ms: float


def run_variant(name: str, sites: int, d: int, certs: Path, work: Path) -> GrpcResult:
    variant = VARIANTS[name]
    port_file = work / f"{name}-{sites}.port"
    argv = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--role",
        "server",
        "--variant",
        name,
        "--params",
        str(d),
        "--sites",
        str(sites),
        "--certs",
        str(certs),
        "--port-file",
        str(port_file),
    ]
    proc = subprocess.Popen(argv, cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists() or not port_file.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server for {name} did not start")
            time.sleep(0.05)
        address = f"127.0.0.1:{port_file.read_text()}"

        async def run() -> tuple[float, dict[str, float], dict[str, float]]:
            before = await stats(address, certs, reset=True)
            wall = await send_all(address, certs, sites, d, variant.chunk)
            after = await stats(address, certs, reset=False)
            return wall, before, after

        wall, before, after = asyncio.run(run())
    finally:
        proc.kill()
        proc.wait()
    return GrpcResult(
        name,
        sites,
        d,
        round(wall, 3),
        round(after["cpu_s"] - before["cpu_s"], 3),
        round((after["hwm_kib"] - before["rss_kib"]) / 1024, 1),
        round(after["lag_s"] * 1000, 1),
    )


def report(prims: list[tuple[str, float, float]], grpc_rows: list[GrpcResult], d: int, command: str) -> str:
    lines = [
        "# Upload path micro-benchmarks",
        "",
        f"`{command}`",
        "",
        f"- Machine: {machine()}; load average {' '.join(Path('/proc/loadavg').read_text().split()[:3])} at the end.",
        "",
    ]
    if prims:
        lines += [
            f"## Primitives (one thread; d = {d:.0e}: {4 * d / 2**20:.0f} MiB per update)",
            "",
            "| work | ms per update | GB/s |",
            "|---|---:|---:|",
        ]
        lines += [f"| {name} | {t * 1000:.1f} | {gbs:.2f} |" for name, t, gbs in prims]
        lines.append("")
    if grpc_rows:
        lines += [
            "## gRPC receive path (server process; N concurrent uploads of d*4 bytes over mutual TLS)",
            "",
            "| variant | N | d | wall s | server CPU s | server peak RSS over start MiB | max loop lag ms |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {r.variant} | {r.sites} | {r.params:.0e} | {r.wall_s} | {r.server_cpu_s} | "
            f"{r.peak_over_start_mib} | {r.max_lag_ms} |"
            for r in grpc_rows
        ]
        lines += ["", "Variants: " + "; ".join(f"`{k}` = {v}" for k, v in VARIANTS.items())]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["all", "primitives", "grpc"], default="all")
    parser.add_argument("--params", default="1e7", help="d (float32 parameters per update)")
    parser.add_argument("--sites", default="5,20")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--tag", default="")
    parser.add_argument("--role", choices=["server"], help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--certs", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    d = int(float(args.params))
    if args.role == "server":
        serve(VARIANTS[args.variant], d, int(args.sites), args.certs, args.port_file)
        return 0
    command = " ".join(["python", "bench/upload_path.py", *sys.argv[1:]])
    with tempfile.TemporaryDirectory(prefix="cohort-upload-path-") as tmp:
        work = Path(tmp)
        prims = primitives(d, args.repeats, work) if args.part in ("all", "primitives") else []
        for name, t, gbs in prims:
            print(f"{name:55s} {t * 1000:8.1f} ms {gbs:6.2f} GB/s", flush=True)
        rows: list[GrpcResult] = []
        if args.part in ("all", "grpc"):
            sites = [int(x) for x in args.sites.split(",")]
            init_federation(work / "certs", sites=[f"site-{i:02d}" for i in range(1, max(sites) + 1)])
            for name in args.variants.split(","):
                for n in sites:
                    row = run_variant(name, n, d, work / "certs", work)
                    rows.append(row)
                    print(row, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "upload_path-data" + (f"-{args.tag}" if args.tag else "")
    (args.out / f"{stem}.md").write_text(report(prims, rows, d, command), encoding="utf-8")
    print(f"wrote {args.out / stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
