"""A network lab for tests: hosts in their own Linux network namespaces, joined by impaired links.

Each host is a network namespace with one access link to a shared switch. A link has a one-way delay, a loss
probability and a rate cap, each applied in both directions, so a packet from A to B crosses A's link and then B's
link, like two hosts at the far ends of two WAN links. A link can be cut (every packet to or from the host is lost,
as when a cable or a route goes away: no RST, no ICMP, the peers only see silence) and restored.

Two backends give the same packet-level behaviour:

- ``netem``: a veth pair from each host namespace to a bridge in a hub namespace, with a ``tc netem`` qdisc
  (delay, loss, rate) on both ends of each pair; a cut sets the loss to 100%.
- ``tun-emulator``: for kernels without netem. ``sch_netem`` is a module that minimal and VM kernels often do not
  build (the development machines, Firecracker guests with kernel 6.18, have namespaces, veth, tbf and htb but no
  netem, and no modprobe to load it). Each host gets a TUN device, created in the root namespace and moved into
  the host's namespace (its file descriptor stays attached across the move); a thread in this process reads every
  IP packet a host sends and, after loss, the rate cap (a FIFO served at the link rate, tail drop past
  ``queue_s``) and the delay, writes it to the destination host's TUN device, in order. TCP in the namespaces sees
  real loss, queueing and delay and retransmits for real, as it would with netem.

``COHORT_NETLAB_BACKEND=tun-emulator`` forces the emulator where netem exists. Run as a script, this module is the
TCP probe that :meth:`NetLab.measure` starts on both ends of a path (standard library only, so it starts fast).
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import heapq
import json
import os
import random
import re
import secrets
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Literal, Protocol

Backend = Literal["netem", "tun-emulator"]
PREFIX = "cohortnet-"  # namespace names: cohortnet-<pid>-<random>-<host>
BACKEND_ENV = "COHORT_NETLAB_BACKEND"
_TUNSETIFF = 0x400454CA
_IFF_TUN, _IFF_NO_PI = 0x0001, 0x1000
_STALE_S = 600.0
# Processes started in the namespaces die with the test process even when it is killed outright (their parent is
# the thread that started them: NetLab.spawn is called from the main thread).
_PDEATHSIG = ("setpriv", "--pdeathsig", "KILL", "--") if shutil.which("setpriv") else ()


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def _open_tun(name: str) -> tuple[int, str]:
    """A TUN device (IP packets, no packet-info header) and its name; it disappears when the fd is closed."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        reply = fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", name.encode(), _IFF_TUN | _IFF_NO_PI))
    except OSError:
        os.close(fd)
        raise
    return fd, reply[:16].rstrip(b"\0").decode()


@dataclass(frozen=True)
class Probe:
    backend: Backend | None
    reason: str


def probe() -> Probe:
    """Which backend this machine supports (None, with the reason, when namespaces are impossible here)."""
    if not sys.platform.startswith("linux"):
        return Probe(None, "network namespaces need Linux")
    if os.geteuid() != 0:
        return Probe(None, "network namespaces need root (CI runs the tests as root)")
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return Probe(None, f"no {' or '.join(missing)} command (iproute2)")
    scratch = f"{PREFIX}{os.getpid()}-{secrets.token_hex(3)}-probe"
    made = _run("ip", "netns", "add", scratch, check=False)
    if made.returncode != 0:
        return Probe(None, f"cannot create a network namespace: {made.stderr.strip()}")
    try:
        netem = _run("tc", "-n", scratch, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms", check=False)
    finally:
        _run("ip", "netns", "del", scratch, check=False)
    forced = os.environ.get(BACKEND_ENV, "")
    if netem.returncode == 0 and forced != "tun-emulator":
        return Probe("netem", "the kernel has the netem qdisc")
    why = f"{BACKEND_ENV}=tun-emulator" if netem.returncode == 0 else f"no netem qdisc ({netem.stderr.strip()})"
    try:
        fd, _ = _open_tun("cnprobe%d")
        os.close(fd)
    except OSError as exc:
        return Probe(None, f"{why} and no TUN device for the userspace emulator ({exc})")
    return Probe("tun-emulator", f"{why}: userspace link emulator over TUN devices")


@dataclass(frozen=True)
class LinkSpec:
    """A host's access link; every value applies to each direction."""

    delay_s: float = 0.0
    loss: float = 0.0  # probability that a packet is lost
    rate_bps: int = 0  # 0: no cap
    queue_s: float = 1.0  # emulator: the longest a packet may queue for the rate cap before it is dropped

    def netem_args(self, loss: float | None = None) -> list[str]:
        args = ["delay", f"{self.delay_s * 1000:g}ms", "loss", f"{100 * (self.loss if loss is None else loss):g}%"]
        return args + (["rate", f"{self.rate_bps}bit"] if self.rate_bps else [])

    def describe(self) -> str:
        rate = f"{self.rate_bps / 1e6:g} Mbit/s" if self.rate_bps else "no rate cap"
        return f"delay {self.delay_s * 1000:g} ms, loss {100 * self.loss:g}%, {rate}"


@dataclass(frozen=True)
class Host:
    name: str
    netns: str
    address: str  # IPv4 address inside its namespace


@dataclass(frozen=True)
class LinkStats:
    """Packets a host's link carried and dropped, both directions. netem counts every drop as ``lost`` (a cut is
    loss 100% there); the emulator tells random loss, cuts and queue overflow apart."""

    packets: int
    lost: int
    cut: int = 0
    queue: int = 0


@dataclass(frozen=True)
class Measurement:
    connect_s: float  # TCP handshake: one round trip
    rtts_s: tuple[float, ...]  # request/response round trips of a few bytes
    bulk_bytes: int
    bulk_s: float  # send bulk_bytes and get a one-byte answer

    @property
    def rtt_s(self) -> float:
        return min(self.rtts_s)


class _Fabric(Protocol):
    def attach(self, host: Host, spec: LinkSpec) -> None: ...
    def start(self) -> None: ...
    def set_cut(self, host: Host, cut: bool) -> None: ...
    def stats(self, host: Host) -> LinkStats: ...
    def close(self) -> None: ...


class _NetemFabric:
    """veth pairs into a bridge in a hub namespace, netem on both ends of every pair."""

    def __init__(self, tag: str) -> None:
        self.hub = f"{tag}-hub"
        self._specs: dict[str, tuple[str, LinkSpec]] = {}
        _run("ip", "netns", "add", self.hub)
        _run("ip", "-n", self.hub, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", self.hub, "link", "set", "br0", "up")

    def _ends(self, host: Host) -> list[tuple[str, str]]:
        port, _ = self._specs[host.name]
        return [(host.netns, "wan0"), (self.hub, port)]

    def attach(self, host: Host, spec: LinkSpec) -> None:
        port = f"p{len(self._specs)}"
        self._specs[host.name] = (port, spec)
        _run("ip", "-n", self.hub, "link", "add", port, "type", "veth", "peer", "name", "wan0", "netns", host.netns)
        _run("ip", "-n", self.hub, "link", "set", port, "master", "br0", "up")
        _run("ip", "-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "wan0")
        _run("ip", "-n", host.netns, "link", "set", "wan0", "up")
        for netns, dev in self._ends(host):
            _run("tc", "-n", netns, "qdisc", "add", "dev", dev, "root", "netem", *spec.netem_args())

    def start(self) -> None:
        pass

    def set_cut(self, host: Host, cut: bool) -> None:
        _, spec = self._specs[host.name]
        args = spec.netem_args(1.0 if cut else None)
        for netns, dev in self._ends(host):
            _run("tc", "-n", netns, "qdisc", "change", "dev", dev, "root", "netem", *args)

    def stats(self, host: Host) -> LinkStats:
        packets = lost = 0
        for netns, dev in self._ends(host):
            text = _run("tc", "-s", "-n", netns, "qdisc", "show", "dev", dev).stdout
            found = re.search(r"Sent \d+ bytes (\d+) pkt \(dropped (\d+)", text)
            if found:
                packets, lost = packets + int(found[1]), lost + int(found[2])
        return LinkStats(packets, lost)

    def close(self) -> None:
        _run("ip", "netns", "del", self.hub, check=False)


class _Pipe:
    """One direction of one link: a FIFO served at the link rate, tail drop past ``queue_s`` of backlog."""

    def __init__(self, spec: LinkSpec) -> None:
        self.spec = spec
        self.free_at = 0.0

    def admit(self, now: float, size: int) -> float | None:
        """When the packet has left the queue (before the delay), or None when the queue is full."""
        start = max(now, self.free_at)
        if start - now > self.spec.queue_s:
            return None
        self.free_at = start + (size * 8 / self.spec.rate_bps if self.spec.rate_bps else 0.0)
        return self.free_at


@dataclass(eq=False)
class _Port:
    host: Host
    fd: int
    spec: LinkSpec
    up: _Pipe
    down: _Pipe
    cut: bool = False
    counts: collections.Counter[str] = field(default_factory=collections.Counter)


class _TunFabric:
    """TUN devices in the host namespaces, packets switched, lost, rate-limited and delayed by a thread here."""

    def __init__(self, seed: int) -> None:
        self._ports: dict[bytes, _Port] = {}
        self._by_fd: dict[int, _Port] = {}
        self._rng = random.Random(seed)  # loss draws, not secrets
        self._queue: list[tuple[float, int, _Port, _Port, bytes]] = []
        self._seq = 0
        self._wake_r, self._wake_w = os.pipe()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="netlab-emulator", daemon=True)
        self.error: BaseException | None = None

    def attach(self, host: Host, spec: LinkSpec) -> None:
        fd, name = _open_tun("cntun%d")
        try:
            _run("ip", "link", "set", name, "netns", host.netns)
            _run("ip", "-n", host.netns, "link", "set", name, "name", "wan0")
            _run("ip", "-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "wan0")
            _run("ip", "-n", host.netns, "link", "set", "wan0", "up")
        except RuntimeError:
            os.close(fd)
            raise
        port = _Port(host, fd, spec, _Pipe(spec), _Pipe(spec))
        self._ports[socket.inet_aton(host.address)] = port
        self._by_fd[fd] = port

    def start(self) -> None:
        self._thread.start()

    def set_cut(self, host: Host, cut: bool) -> None:
        self._ports[socket.inet_aton(host.address)].cut = cut

    def stats(self, host: Host) -> LinkStats:
        c = self._ports[socket.inet_aton(host.address)].counts
        return LinkStats(c["packets"], c["lost"], c["cut"], c["queue"])

    def close(self) -> None:
        self._stop.set()
        os.write(self._wake_w, b"x")
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        for fd in (*self._by_fd, self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._by_fd.clear()

    def _loop(self) -> None:
        try:
            with selectors.DefaultSelector() as sel:
                for fd in (*self._by_fd, self._wake_r):
                    sel.register(fd, selectors.EVENT_READ)
                while not self._stop.is_set():
                    timeout = max(0.0, self._queue[0][0] - time.monotonic()) if self._queue else None
                    for key, _ in sel.select(timeout):
                        if key.fd in self._by_fd:
                            self._read(self._by_fd[key.fd])
                    self._deliver(time.monotonic())
        except Exception as exc:  # NetLab.stats() raises it: the test fails saying the emulator died
            self.error = exc

    def _read(self, src: _Port) -> None:
        while True:
            try:
                packet = os.read(src.fd, 65536)
            except BlockingIOError:
                return
            now = time.monotonic()
            src.counts["packets"] += 1
            dst = self._ports.get(packet[16:20]) if packet[:1] and packet[0] >> 4 == 4 else None
            if dst is None:
                src.counts["unroutable"] += 1  # not IPv4 (the kernel's IPv6 chatter), or no such host
            elif src.cut or dst.cut:
                (src if src.cut else dst).counts["cut"] += 1
            else:
                self._forward(src, dst, packet, now)

    def _forward(self, src: _Port, dst: _Port, packet: bytes, now: float) -> None:
        t = now  # up the source's link, then down the destination's
        for port, pipe in ((src, src.up), (dst, dst.down)):
            if self._rng.random() < port.spec.loss:
                port.counts["lost"] += 1
                return
            left = pipe.admit(t, len(packet))
            if left is None:
                port.counts["queue"] += 1
                return
            t = left + port.spec.delay_s
        self._seq += 1  # ties keep the order packets arrived in
        heapq.heappush(self._queue, (t, self._seq, src, dst, packet))

    def _deliver(self, now: float) -> None:
        while self._queue and self._queue[0][0] <= now:
            _, _, src, dst, packet = heapq.heappop(self._queue)
            if src.cut or dst.cut:  # in flight when the link went down
                (src if src.cut else dst).counts["cut"] += 1
                continue
            try:
                os.write(dst.fd, packet)
                dst.counts["packets"] += 1
            except OSError:
                dst.counts["write_failed"] += 1


class NetLab:
    """Hosts (network namespaces) on impaired links; processes started in them; cuts on demand.

    Close it (``with`` or ``close()``) to stop every process it started and remove the namespaces and links."""

    def __init__(self, backend: Backend, *, subnet: str = "10.77.0", seed: int = 0) -> None:
        _remove_stale()
        self.backend = backend
        self.tag = f"{PREFIX}{os.getpid()}-{secrets.token_hex(3)}"
        self.subnet = subnet
        self.hosts: dict[str, Host] = {}
        self.links: dict[str, LinkSpec] = {}
        self._namespaces: list[str] = []
        self._procs: list[subprocess.Popen[bytes]] = []
        self._fabric: _Fabric | None = None
        self._seed = seed

    def _ensure_fabric(self) -> _Fabric:
        if self._fabric is None:
            self._fabric = _NetemFabric(self.tag) if self.backend == "netem" else _TunFabric(self._seed)
        return self._fabric

    def add_host(self, name: str, link: LinkSpec) -> Host:
        host = Host(name, f"{self.tag}-{name}", f"{self.subnet}.{len(self.hosts) + 1}")
        _run("ip", "netns", "add", host.netns)
        self._namespaces.append(host.netns)
        _run("ip", "-n", host.netns, "link", "set", "lo", "up")
        self._ensure_fabric().attach(host, link)
        self.hosts[name], self.links[name] = host, link
        return host

    def start(self) -> None:
        self._ensure_fabric().start()

    def one_way_s(self, a: str, b: str) -> float:
        """The configured delay from host ``a`` to host ``b``: both access links."""
        return self.links[a].delay_s + self.links[b].delay_s

    def cut(self, name: str) -> None:
        self._ensure_fabric().set_cut(self.hosts[name], True)

    def restore(self, name: str) -> None:
        self._ensure_fabric().set_cut(self.hosts[name], False)

    def stats(self, name: str) -> LinkStats:
        fabric = self._ensure_fabric()
        if isinstance(fabric, _TunFabric) and fabric.error is not None:
            raise RuntimeError(f"the link emulator thread died: {fabric.error!r}")
        return fabric.stats(self.hosts[name])

    def spawn(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log: Path | None = None,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
        stdout_pipe: bool = False,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside host ``name``'s namespace, in its own process group (stopped by ``close``).

        Call it from the main thread: the process is killed when the thread that started it ends."""
        out = subprocess.PIPE if stdout_pipe else (log.open("ab") if log is not None else subprocess.DEVNULL)
        try:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", self.hosts[name].netns, *_PDEATHSIG, *argv],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=cwd,
                env=dict(env) if env is not None else None,
                start_new_session=True,
            )
        finally:
            if not isinstance(out, int):
                out.close()
        self._procs.append(proc)
        return proc

    def measure(self, client: str, server: str, *, pings: int = 5, bulk_bytes: int = 64 << 10) -> Measurement:
        """TCP from ``client`` to ``server``: handshake time, small round trips, and the time of a bulk send."""
        script = [sys.executable, str(Path(__file__).resolve())]
        srv = self.spawn(server, [*script, "serve", self.hosts[server].address], stdout_pipe=True)
        try:
            assert srv.stdout is not None
            port = srv.stdout.readline().decode().strip()
            if not port.isdigit():
                raise RuntimeError(f"the probe server in {server!r} did not start")
            argv = [*script, "measure", self.hosts[server].address, port, str(pings), str(bulk_bytes)]
            cli = self.spawn(client, argv, stdout_pipe=True)
            out, _ = cli.communicate(timeout=60)
            if cli.returncode != 0:
                raise RuntimeError(f"the probe from {client!r} to {server!r} failed: {out.decode()}")
            data = json.loads(out)
        finally:
            stop_processes([srv])
            if srv.stdout is not None:
                srv.stdout.close()
        return Measurement(data["connect_s"], tuple(data["rtts_s"]), bulk_bytes, data["bulk_s"])

    def close(self) -> None:
        """Stop every process started here, then remove links and namespaces; each step runs even if one fails."""
        stop_processes(self._procs)
        self._procs.clear()
        if self._fabric is not None:
            self._fabric.close()
        for netns in self._namespaces:
            _run("ip", "netns", "del", netns, check=False)
        self._namespaces.clear()

    def __enter__(self) -> NetLab:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def stop_processes(procs: Sequence[subprocess.Popen[bytes]], grace_s: float = 5.0) -> None:
    """SIGTERM to the process groups this lab started, all at once; SIGKILL to those still there after ``grace_s``."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        running = [p for p in procs if p.poll() is None]
        for proc in running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
        deadline = time.monotonic() + wait_s
        for proc in running:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))


def _remove_stale() -> None:
    """Namespaces a killed test run left behind: its pid is gone and the namespace is older than _STALE_S."""
    listing = _run("ip", "netns", "list", check=False).stdout.split("\n")
    for name in (line.split(" ")[0] for line in listing):
        found = re.fullmatch(rf"{PREFIX}(\d+)-[0-9a-f]+-.+", name)
        if found is None:
            continue
        with contextlib.suppress(OSError):
            if time.time() - Path("/run/netns", name).stat().st_mtime < _STALE_S:
                continue
            try:
                os.kill(int(found[1]), 0)
                continue  # still running
            except ProcessLookupError:
                _run("ip", "netns", "del", name, check=False)


# -- the TCP probe, run inside the namespaces -----------------------------------------------------------------------
def _recv_exact(conn: socket.socket, n: int) -> bool:
    while n > 0:
        chunk = conn.recv(min(n, 1 << 16))
        if not chunk:
            return False
        n -= len(chunk)
    return True


def _serve(address: str) -> None:
    """Answer each ``<8-byte length><payload>`` with one byte, until the client hangs up."""
    with socket.create_server((address, 0)) as server:
        print(server.getsockname()[1], flush=True)
        conn, _ = server.accept()
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            header = bytearray(8)
            while conn.recv_into(header, 8, socket.MSG_WAITALL) == 8:
                if not _recv_exact(conn, int.from_bytes(header, "big")):
                    return
                conn.sendall(b"k")


def _measure(address: str, port: int, pings: int, bulk_bytes: int) -> dict[str, object]:
    def exchange(payload: bytes) -> float:
        t0 = time.monotonic()
        conn.sendall(len(payload).to_bytes(8, "big") + payload)
        if conn.recv(1) != b"k":
            raise RuntimeError("the probe server hung up")
        return time.monotonic() - t0

    t0 = time.monotonic()
    with socket.create_connection((address, port), timeout=30) as conn:
        connect_s = time.monotonic() - t0
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rtts = [exchange(b"") for _ in range(pings)]
        bulk_s = exchange(bytes(bulk_bytes))
    return {"connect_s": connect_s, "rtts_s": rtts, "bulk_s": bulk_s}


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        _serve(sys.argv[2])
    else:
        print(json.dumps(_measure(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))))
