"""Network faults between separate hosts: the coordinator and each site in its own Linux network namespace.

Every daemon runs as its own process (``cohort coordinator`` / ``cohort participant``) in its own network namespace;
the namespaces are joined by impaired links (tests/netlab.py): each host's link adds 50 ms of delay, loses 1% of the
packets and carries at most 1 Mbit/s, in each direction, so a site and the coordinator are 100 ms apart (200 ms
round trip) and lose about 2% of the packets each way. One job of three rounds runs over these links:

- round 1: all three sites train and report over the impaired links;
- round 2: site-c's link is cut as the round starts (silence: no RST, no ICMP); the round completes with site-a
  and site-b once the coordinator notices site-c is gone (its heartbeats stop, HTTP/2 keepalive fails);
- the link comes back ``CUT_S`` seconds after the cut; round 3 waits for all three sites (``min_available_sites``),
  so it only runs once site-c has noticed, reconnected and joined again, and it must report in round 3;
- the job finishes with the federated test evaluation.

Before that, a TCP probe checks that the links really impair: a round trip takes at least twice the one-way delay
and a bulk send is no faster than the rate cap; after the job, the links must have lost packets (and, with the
emulator, dropped site-c's packets while it was cut), so the test cannot pass over an unimpaired network.

Alongside the job, a site that is not on the allow-list dials with a short reconnect backoff; a regression test
expects it to reach the coordinator and be refused: a short backoff must not become gRPC's connect timeout (a TCP +
TLS + HTTP/2 handshake takes several round trips on a WAN).

Backend: real ``tc netem`` where the kernel has the qdisc; else netlab's userspace link emulator over TUN devices.
The fallback exists because the development machines (Firecracker VMs, kernel 6.18) have network namespaces, veth,
tbf and htb but no netem qdisc and no modprobe to load it; the emulator loses, queues and delays real IP packets, so
TCP retransmits for real as it would under netem. The backend is in the test ids (``[netem]`` / ``[tun-emulator]``),
in a log line and in the JUnit properties. The module is skipped only where namespaces are impossible (not root, no
``ip``/``tc``, neither netem nor ``/dev/net/tun``).
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from netlab import LinkSpec, Measurement, NetLab, probe, stop_processes
from support import UNLISTED, Pki, poll_until

log = logging.getLogger("tests.network_faults")

PROBE = probe()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(PROBE.backend is None, reason=f"network namespaces are not possible here: {PROBE.reason}"),
]

LINK = LinkSpec(delay_s=0.050, loss=0.01, rate_bps=1_000_000)
SITES3 = ("site-a", "site-b", "site-c")
# Not on the allow-list: it dials with a short reconnect backoff, and a refusal shows that it reached the
# coordinator (test_short_backoff_site_reaches_the_coordinator_over_a_slow_link).
STRANGER = UNLISTED
STRANGER_BACKOFF = (0.05, 0.5)  # what the in-process tests use (tests/support.py)
VICTIM = "site-c"
CUT_S = 8.0  # longer than the coordinator's liveness check (about 1-2 heartbeats) and a site's window (2 hb + 1 s)
HEARTBEAT_S = 2.0
ROUND_TIMEOUT_S = 20.0
# Nothing else lives in the coordinator's namespace, so a fixed port cannot collide; knowing it up front lets the
# sites start (and import torch) while the coordinator does.
PORT = 50051
SERVER_NAME = "localhost"  # on the coordinator's certificate; the sites dial its namespace address
# The sites' reconnect backoff (initial, max; seconds).
RECONNECT = (0.2, 2.0)
JOB: dict[str, Any] = {
    "name": "network-faults",
    "task": "breast_cancer",
    "rounds": 3,
    "fraction": 1.0,
    "min_sites": 2,
    "min_available_sites": 3,
    "round_timeout_s": ROUND_TIMEOUT_S,
    "wait_for_sites_s": 45.0,
    "evaluate_every": 1,
    "max_round_retries": 2,
    "params": {"local_epochs": 1, "batch_size": 16, "learning_rate": 0.05, "seed": 3},
}


@pytest.fixture(scope="module", params=[PROBE.backend or "no-namespaces"])
def lab(request: pytest.FixtureRequest) -> Iterator[NetLab]:
    """The coordinator and the sites, each in its own namespace, on impaired links; torn down even on failure."""
    backend = request.param
    assert backend in ("netem", "tun-emulator")
    log.info("network-fault tests: backend %s (%s); every link: %s", backend, PROBE.reason, LINK.describe())
    with NetLab(backend) as net:
        for name in ("coordinator", *SITES3, STRANGER):
            net.add_host(name, LINK)
        net.start()
        yield net


@pytest.fixture(scope="module")
def measured(lab: NetLab) -> Measurement:
    """A TCP probe from site-a to the coordinator, checked to be as slow as the links are configured."""
    m = lab.measure("site-a", "coordinator", pings=5, bulk_bytes=64 << 10)
    log.info(
        "%s: connect %.0f ms, round trip %.0f ms (min of %d), 64 KiB in %.2f s",
        lab.backend,
        m.connect_s * 1000,
        m.rtt_s * 1000,
        len(m.rtts_s),
        m.bulk_s,
    )
    round_trip = 2 * lab.one_way_s("site-a", "coordinator")
    assert m.rtt_s >= 0.95 * round_trip, f"round trip {m.rtt_s:.3f}s: the links add no delay ({lab.backend})"
    assert m.connect_s >= 0.95 * round_trip, f"TCP handshake {m.connect_s:.3f}s: the links add no delay"
    assert m.bulk_s >= m.bulk_bytes * 8 / LINK.rate_bps, f"{m.bulk_bytes} B in {m.bulk_s:.3f}s: the rate is not capped"
    return m


def test_links_are_impaired(
    lab: NetLab,
    measured: Measurement,
    record_property: Callable[[str, object], None],
    capsys: pytest.CaptureFixture[str],
) -> None:
    record_property("netlab_backend", lab.backend)
    record_property("netlab_rtt_ms", round(measured.rtt_s * 1000))
    with capsys.disabled():
        print(f"\n[network faults] backend {lab.backend}: {PROBE.reason}; rtt {measured.rtt_s * 1000:.0f} ms")
    assert measured.rtt_s >= 2 * lab.one_way_s("site-a", "coordinator") * 0.95


class Federation:
    """``cohort coordinator`` and ``cohort participant`` processes in the lab's namespaces, and the store they write."""

    def __init__(self, lab: NetLab, pki: Pki, site_data: dict[str, Path], root: Path) -> None:
        self.lab, self.pki, self.site_data, self.root = lab, pki, site_data, root
        self.address = f"{lab.hosts['coordinator'].address}:{PORT}"
        self.ready = root / "coordinator.ready"
        self.logs: dict[str, Path] = {}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._db: sqlite3.Connection | None = None
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("COHORT_")}
        self.env |= {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}

    def _spawn(self, host: str, argv: list[str]) -> None:
        self.logs[host] = self.root / f"{host}.log"
        cmd = [sys.executable, "-m", "cohort_cli", "--log-level", "info", *argv]
        self.procs[host] = self.lab.spawn(host, cmd, log=self.logs[host], cwd=self.root, env=self.env)

    def _write(self, name: str, config: dict[str, Any]) -> Path:
        path = self.root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    def start_coordinator(self, job: dict[str, Any]) -> None:
        files = self.pki.coordinator
        config: dict[str, Any] = {
            "federation": {"name": "test", "sites": list(SITES3)},
            "server": {
                "listen": self.address,
                "tls": {"ca": str(files.ca), "cert": str(files.cert), "key": str(files.key)},
                "heartbeat_interval_s": HEARTBEAT_S,
                "shutdown_grace_s": 1.0,
            },
            "state_dir": str(self.root / "state"),
            "job": job,
        }
        path = self._write("coordinator", config)
        self._spawn("coordinator", ["coordinator", "--config", str(path), "--ready-file", str(self.ready)])

    def start_participant(self, site: str, reconnect: tuple[float, float] = RECONNECT, data: str = "") -> None:
        files = self.pki.site(site)
        config = {
            "coordinator": {
                "address": self.address,
                "server_name": SERVER_NAME,
                "rpc_timeout_s": 5.0,
                "transfer_timeout_s": ROUND_TIMEOUT_S,
            },
            "tls": {"ca": str(files.ca), "cert": str(files.cert), "key": str(files.key)},
            "data_dir": str(self.site_data[data or site]),
            "task": "breast_cancer",
            "reconnect": {"initial_backoff_s": reconnect[0], "max_backoff_s": reconnect[1]},
        }
        self._spawn(site, ["participant", "--config", str(self._write(site, config))])

    def alive(self) -> bool:
        """Asserts that the coordinator and the federation's sites still run (the stranger exits once refused)."""
        dead = {name: p.returncode for name, p in self.procs.items() if p.poll() is not None and name != STRANGER}
        assert not dead, f"daemon(s) exited: {dead}"
        return True

    def _query(self, sql: str, *args: object) -> list[dict[str, Any]]:
        if self._db is None:
            if not self.ready.exists():  # the store exists once the coordinator serves
                return []
            self._db = sqlite3.connect(self.root / "state" / "coordinator.db", timeout=10, check_same_thread=False)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA query_only = 1")
        return [dict(row) for row in self._db.execute(sql, args)]

    def round(self, number: int, attempt: int = 0) -> dict[str, Any] | None:
        rows = self._query("SELECT * FROM rounds WHERE round = ? AND attempt = ?", number, attempt)
        if not rows:
            return None
        row = rows[0]
        return row | {"cohort": set(json.loads(row["cohort"])), "reported": set(json.loads(row["reported"]))}

    def job(self) -> dict[str, Any] | None:
        rows = self._query("SELECT * FROM jobs")
        assert len(rows) <= 1, f"expected one job, found {len(rows)}"
        return rows[0] if rows else None

    def log_text(self, host: str) -> str:
        path = self.logs[host]
        return path.read_text(errors="replace") if path.exists() else ""

    def report(self) -> str:
        lines = [f"round {row}" for row in self._query("SELECT round, attempt, state, reported, detail FROM rounds")]
        for host in self.logs:
            text = self.log_text(host).splitlines()
            lines += [f"--- {host} ({len(text)} lines, last 40) ---", *text[-40:]]
        lines += [f"link {name}: {self.lab.stats(name)}" for name in self.lab.hosts]
        return "\n".join(lines)

    def close(self) -> None:
        stop_processes(list(self.procs.values()))
        if self._db is not None:
            self._db.close()


@pytest.fixture(scope="module")
def federation(
    lab: NetLab, pki: Pki, site_data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Federation]:
    """The coordinator (its job starts at boot), site-a..c and the stranger, all started at once (they retry until
    the coordinator serves); stopped even on failure."""
    fed = Federation(lab, pki, site_data, tmp_path_factory.mktemp("network-faults"))
    try:
        fed.start_coordinator(JOB)
        for site in SITES3:
            fed.start_participant(site)
        fed.start_participant(STRANGER, reconnect=STRANGER_BACKOFF, data="site-d")
        yield fed
    finally:
        fed.close()


async def test_job_survives_impaired_links_and_a_cut(
    lab: NetLab, measured: Measurement, federation: Federation, record_property: Callable[[str, object], None]
) -> None:
    record_property("netlab_backend", lab.backend)
    fed = federation
    t0 = time.monotonic()
    try:
        # Cut site-c as round 2 starts: the round's train task (100 ms away) has not even reached it yet.
        await poll_until(
            lambda: fed.alive() and fed.round(2) is not None, timeout=90, interval=0.005, what="round 2 to start"
        )
        lab.cut(VICTIM)
        cut_at = time.monotonic()
        log.info("%s: cut %s's link %.1fs into the test", lab.backend, VICTIM, cut_at - t0)
        await poll_until(
            lambda: fed.alive() and (r := fed.round(2)) is not None and r["state"] != "training",
            timeout=ROUND_TIMEOUT_S + 10,
            interval=0.1,
            what="round 2 to close without the cut site",
        )
        closed_after = time.monotonic() - cut_at
        await poll_until(
            lambda: time.monotonic() - cut_at >= CUT_S, timeout=CUT_S + 1, interval=0.1, what="the outage to last"
        )
        lab.restore(VICTIM)
        restored_at = time.time()
        await poll_until(
            lambda: fed.alive() and (j := fed.job()) is not None and j["state"] != "running",
            timeout=90,
            interval=0.2,
            what="the job to end",
        )

        job = fed.job()
        assert job is not None
        assert job["state"] == "finished", job["detail"]
        rounds = {n: fed.round(n) for n in (1, 2, 3)}
        outcome = {n: (r["state"], r["cohort"], r["reported"]) if r else None for n, r in rounds.items()}
        everyone, others = set(SITES3), set(SITES3) - {VICTIM}
        assert outcome == {
            1: ("completed", everyone, everyone),
            2: ("completed", everyone, others),  # the cut site was in the cohort; the others completed the round
            3: ("completed", everyone, everyone),  # it rejoined once its link was back
        }, rounds
        assert job["test_accuracy"] is not None, job
        assert 0.5 < job["test_accuracy"] <= 1.0, job

        stats = {name: lab.stats(name) for name in lab.hosts}
        assert sum(s.lost for s in stats.values()) > 0, f"the links lost no packet: {stats}"
        if lab.backend == "tun-emulator":
            assert stats[VICTIM].cut > 0, f"nothing was dropped while {VICTIM} was cut: {stats[VICTIM]}"
        log.info(
            "%s: round 2 closed %.1fs after the cut (%s); round 3 started %.1fs after the link came back; "
            "test %.1fs; links %s",
            lab.backend,
            closed_after,
            rounds[2]["detail"] if rounds[2] else "",
            rounds[3]["started"] - restored_at if rounds[3] else -1.0,
            time.monotonic() - t0,
            stats,
        )
    except BaseException:
        print(fed.report())
        raise


async def test_short_backoff_site_reaches_the_coordinator_over_a_slow_link(
    lab: NetLab, measured: Measurement, federation: Federation
) -> None:
    """A site with a short reconnect backoff reaches the coordinator over a 200 ms link.

    How often a site retries must not bound how long one connection attempt may take: on a WAN the TCP, TLS and
    HTTP/2 handshakes alone take several round trips. The site is not on the allow-list, so reaching the coordinator
    shows as its refusal (the daemon stops); it dials from the start, alongside the job, so this costs no extra
    time."""
    fed = federation
    await poll_until(lambda: fed.alive() and fed.ready.exists(), timeout=60, interval=0.1, what="the coordinator")
    deadline = fed.ready.stat().st_mtime + 20.0  # the coordinator has served for 20 s
    try:
        await poll_until(
            lambda: "PERMISSION_DENIED" in fed.log_text(STRANGER),
            timeout=max(0.5, deadline - time.time()),
            interval=0.1,
            what=f"{STRANGER} (reconnect backoff {STRANGER_BACKOFF}) to reach the coordinator and be refused",
        )
    except AssertionError as exc:
        raise AssertionError(f"{exc}; its log:\n{fed.log_text(STRANGER)[-1200:]}") from None
