"""A round of real daemons against the cost of moving its bytes through TLS (issue 15's measurement).

For every point of the grid (N sites x d parameters x plain / secure aggregation) this starts a real federation on
127.0.0.1 with mutual TLS: the coordinator as its own process (``python -m cohort_cli coordinator``, the command a
deployment runs) and N participant daemons (``python -m cohort_cli participant --exit-after-job``). By default each
site is its own process, as in a deployment: each then has its own GIL, event loop, CPU time and peak RSS, so a
site's CPU seconds and memory are its own and no site waits on another's interpreter. ``--sites-per-process K``
packs K daemons into one process instead (``--role sites``; every process that imports torch costs ~250 MiB, so
packing is for machines with too little memory for N interpreters; per-site numbers are then per process).

The task is ``bench.mlp_task:TASK``, an MLP of about d float32 parameters with one SGD step of local work. Until a
job can carry task parameters, d reaches the coordinator and every site through the environment variable
``COHORT_BENCH_PARAMS`` (bench/mlp_task.py). The job runs ``--rounds`` rounds (default 5) of every site, with no
federated evaluation (``evaluate_every: 0``, ``final_evaluation: false``); the numbers are medians over rounds 2..R.

Measured per grid point, in the same run, on the same machine:

- the TLS floor (bench/tls_floor.py): N concurrent TLS 1.3 connections each receiving and then sending d*4 bytes,
  median of 5; the round / floor ratio;
- the round (coordinator record: start of the round -> committed), and per phase: dispatch (round start -> a site
  has its task), download, local work (train, local - global, encode), upload (secure aggregation: masking and the
  wait for the neighbours' shares included) from the sites' own log lines (median over sites); aggregate (fold,
  FedAvg, checkpoint written) and commit (SQLite) from the coordinator's round record; last upload (round start ->
  last upload accepted) from its upload records;
- CPU seconds per round of the coordinator and of each site (/proc/PID/stat between round completions);
- peak RSS of the coordinator and of the largest site (the kernel's ru_maxrss when the process exits), and the
  coordinator's import baseline (RSS of a coordinator with no job, listening);
- bytes over the loopback interface per round (/proc/net/dev: shared by everything on the machine) / payload
  (N x (model + update) bytes);
- retried round attempts and sites dropped for silence (the coordinator's audit log).

    .venv/bin/python bench/federation.py                         # the full grid; writes bench/results/federation.*
    .venv/bin/python bench/federation.py --sites 5 --params 1e6 --modes plain --rounds 3 --tag quick
    .venv/bin/python bench/federation.py --py-spy /path/to/py-spy --profile-dir DIR   # also profile rounds 2..R

Writes ``federation[-TAG].csv`` and ``federation[-TAG].md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import datetime as dt
import json
import logging
import os
import platform
import re
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import IO, Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere: the packages and bench.mlp_task live at ROOT
    sys.path.insert(0, str(ROOT))

from bench import tls_floor  # noqa: E402
from bench.mlp_task import PARAMS_ENV, param_count  # noqa: E402
from bench.soak import machine  # noqa: E402
from common.ca import init_federation  # noqa: E402

TASK = "bench.mlp_task:TASK"
POLL_S = 0.05
STARTUP_TIMEOUT_S = 300.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
# The site's summary line after each upload (participant/daemon.py), with the logging format of cohort_cli.main.
SITE_LINE = re.compile(
    r"^(?P<ts>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \S+\s+cohort\.participant: round (?P<round>\d+): trained on "
    r".* model (?P<model>[\d.]+)s, train (?P<train>[\d.]+)s, upload (?P<upload>[\d.]+)s$"
)


# -- processes --------------------------------------------------------------------------------------------------
class Child:
    """A child process reaped with ``os.wait4``, so its peak RSS and CPU time are known after it exits."""

    def __init__(self, name: str, argv: list[str], log: Path, env: dict[str, str]) -> None:
        self.name, self.log = name, log
        self._out: IO[bytes] = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, *argv], cwd=ROOT, stdout=self._out, stderr=subprocess.STDOUT, env=env
        )
        self.pid = self.proc.pid
        self.rc: int | None = None
        self.maxrss_kib = 0
        self.cpu_s = 0.0

    def reap(self, block: bool = False) -> bool:
        if self.rc is not None:
            return True
        pid, status, usage = os.wait4(self.pid, 0 if block else os.WNOHANG)
        if pid == 0:
            return False
        self.rc = os.waitstatus_to_exitcode(status)
        self.proc.returncode = self.rc  # tell Popen it is reaped
        self.maxrss_kib = usage.ru_maxrss
        self.cpu_s = usage.ru_utime + usage.ru_stime
        self._out.close()
        return True

    def cpu_ticks(self) -> int | None:
        """utime + stime so far, in clock ticks; None once the process is gone."""
        try:
            parts = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return int(parts[11]) + int(parts[12])

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def stop(self, timeout: float = 15.0) -> None:
        if self.reap():
            return
        self.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while not self.reap():
            if time.monotonic() > deadline:
                self.proc.kill()
                self.reap(block=True)
                return
            time.sleep(0.05)

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def loopback_bytes() -> int:
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name.strip() == "lo":
            return int(rest.split()[0])
    return 0


def short(d: int) -> str:
    """1e+07 -> 1e7 (rounded to one digit: the exact count is in the CSV)."""
    mantissa, exp = f"{d:.0e}".split("e")
    return f"{mantissa}e{int(exp)}"


MODES = ("plain", "secure", "plain-data", "secure-data")


# -- one grid point ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Point:
    sites: int
    params: int  # requested d
    secure: bool
    data: bool = False  # models and updates over the bulk data channel (server.data_listen), not gRPC

    @property
    def mode(self) -> str:
        return ("secure" if self.secure else "plain") + ("-data" if self.data else "")

    @classmethod
    def of(cls, sites: int, params: int, mode: str) -> Point:
        if mode not in MODES:
            raise SystemExit(f"mode {mode!r}: one of {', '.join(MODES)}")
        return cls(sites, params, mode.startswith("secure"), mode.endswith("-data"))

    @property
    def label(self) -> str:
        return f"N={self.sites} d={short(self.params)} {self.mode}"


@dataclass(frozen=True)
class Row:
    sites: int
    params: int  # the model's exact parameter count
    mode: str
    rounds: int  # rounds the medians are over
    round_s: float
    floor_s: float
    ratio: float
    dispatch_s: float
    download_s: float
    local_s: float
    upload_s: float
    last_upload_s: float
    aggregate_s: float
    commit_s: float
    coord_cpu_s: float  # per round
    site_cpu_s: float  # per round, mean over site processes
    sites_cpu_s: float  # per round, all site processes together
    coord_peak_mib: float
    site_peak_mib: float  # the largest site process
    lo_ratio: float  # loopback bytes per round / payload
    retried: int  # round attempts that failed and were retried
    dropped: int  # sites dropped for silence (audit site_timed_out)
    job: str  # "finished", or how the job ended otherwise
    floor_runs: str = ""  # each floor repetition, for the record
    round_runs: str = ""  # each measured round


@dataclass
class Sample:
    round: int
    cpu: dict[str, int]  # process name -> ticks at the round's completion
    lo: int


@dataclass
class Federation:
    point: Point
    work: Path
    certs: Path
    rounds: int
    heartbeat_s: float | None
    sites_per_process: int
    children: list[Child] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [f"site-{i:02d}" for i in range(1, self.point.sites + 1)]

    def env(self) -> dict[str, str]:
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
        env[PARAMS_ENV] = str(self.point.params)
        env.pop("COHORT_FAILPOINTS", None)
        return env

    def coordinator_yaml(self) -> Path:
        p = self.point
        server: dict[str, Any] = {"listen": "127.0.0.1:0", "tls": self._tls(self.certs / "coordinator")}
        server["data_listen"] = "127.0.0.1:0" if p.data else "off"
        if self.heartbeat_s is not None:
            server["heartbeat_interval_s"] = self.heartbeat_s
        job = {
            "name": "bench",
            "task": TASK,
            "rounds": self.rounds,
            "min_sites": p.sites,
            "min_available_sites": p.sites,
            "round_timeout_s": 900,
            "wait_for_sites_s": STARTUP_TIMEOUT_S,
            "evaluate_every": 0,
            "final_evaluation": False,
            "max_round_retries": 3,
            "params": {"local_epochs": 1, "batch_size": 32, "learning_rate": 0.01, "seed": 1},
            "secure_aggregation": {"enabled": p.secure, "weight_cap": 1000, "stage_timeout_s": 300},
        }
        config = {
            "federation": {"name": "bench", "sites": self.names},
            "server": server,
            "state_dir": str(self.work / "state"),
            "job": job,
        }
        path = self.work / "coordinator.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    def site_yaml(self, name: str, address: str) -> Path:
        config = {
            "coordinator": {"address": address, "transfer_timeout_s": 900},
            "tls": self._tls(self.certs / "sites" / name),
            "data_dir": str(self.work / "data" / name),  # bench.mlp_task makes its data from the folder's name
            "task": TASK,
            "exit_after_job": True,
        }
        path = self.work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    @staticmethod
    def _tls(directory: Path) -> dict[str, str]:
        return {"ca": str(directory / "ca.crt"), "cert": str(directory / "tls.crt"), "key": str(directory / "tls.key")}

    def start(self) -> tuple[Child, list[Child]]:
        logs = self.work / "logs"
        logs.mkdir(parents=True)
        ready = self.work / "coordinator.addr"
        argv = ["-m", "cohort_cli", "coordinator", "--config", str(self.coordinator_yaml()), "--exit-when-done"]
        coord = Child("coordinator", [*argv, "--ready-file", str(ready)], logs / "coordinator.log", self.env())
        self.children.append(coord)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not ready.exists():
            if coord.reap() or time.monotonic() > deadline:
                raise RuntimeError(f"the coordinator did not start:\n{coord.tail()}")
            time.sleep(POLL_S)
        address = ready.read_text().strip()
        configs = [self.site_yaml(n, address) for n in self.names]
        sites: list[Child] = []
        k = self.sites_per_process
        for i in range(0, len(configs), k):
            group = configs[i : i + k]
            name = self.names[i] if k == 1 else f"sites-{i // k:02d}"
            if k == 1:
                argv = ["-m", "cohort_cli", "participant", "--config", str(group[0]), "--exit-after-job"]
            else:
                argv = [str(Path(__file__).resolve()), "--role", "sites", *map(str, group)]
            sites.append(Child(name, argv, logs / f"{name}.log", self.env()))
        self.children += sites
        return coord, sites

    def stop(self) -> None:
        for child in reversed(self.children):
            child.stop()


def read_only(db: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, isolation_level=None)
    conn.row_factory = sqlite3.Row
    return conn


def monitor(
    coord: Child, sites: list[Child], db_path: Path, timeout: float, after_round_1: Callable[[], None] | None = None
) -> list[Sample]:
    """Poll until the job ends; one :class:`Sample` (CPU ticks of every process, loopback bytes) per completed
    round. ``after_round_1`` runs once round 1 (start-up included) has completed."""
    deadline = time.monotonic() + timeout
    while not db_path.exists():
        if coord.reap() or time.monotonic() > deadline:
            raise RuntimeError(f"the coordinator wrote no database:\n{coord.tail()}")
        time.sleep(POLL_S)
    samples = [Sample(0, {c.name: c.cpu_ticks() or 0 for c in (coord, *sites)}, loopback_bytes())]
    conn = read_only(db_path)
    last = 0
    try:
        while True:
            if time.monotonic() > deadline:
                raise RuntimeError("the job did not finish in time")
            for child in sites:
                if child.reap() and child.rc != 0:
                    raise RuntimeError(f"{child.name} exited with {child.rc}:\n{child.tail()}")
            try:
                job = conn.execute("SELECT state, detail FROM jobs ORDER BY created LIMIT 1").fetchone()
                done = conn.execute(
                    "SELECT round FROM rounds WHERE state = 'completed' AND round > ? ORDER BY round", (last,)
                ).fetchall()
            except sqlite3.OperationalError:  # the schema is being created
                job, done = None, []
            if done:
                cpu = {c.name: c.cpu_ticks() or 0 for c in (coord, *sites)}
                lo = loopback_bytes()
                for row in done:
                    samples.append(Sample(row["round"], cpu, lo))
                    last = row["round"]
                if after_round_1 is not None:
                    after_round_1()
                    after_round_1 = None
            if job is not None and job["state"] != "running":
                return samples  # finished, or failed (analyse() reports which, with the drops and retries)
            if coord.reap():
                raise RuntimeError(f"the coordinator exited early:\n{coord.tail()}")
            time.sleep(POLL_S)
    finally:
        conn.close()


@dataclass(frozen=True)
class SiteRound:
    end: float  # wall clock of the site's log line (after its upload was acknowledged)
    model_s: float
    train_s: float
    upload_s: float


def site_rounds(logs: Sequence[Path]) -> dict[int, list[SiteRound]]:
    out: dict[int, list[SiteRound]] = {}
    for log in logs:
        for line in log.read_text(errors="replace").splitlines():
            m = SITE_LINE.match(line)
            if m is None:
                continue
            end = dt.datetime.strptime(m["ts"], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            entry = SiteRound(end, float(m["model"]), float(m["train"]), float(m["upload"]))
            out.setdefault(int(m["round"]), []).append(entry)
    return out


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def analyse(fed: Federation, coord: Child, sites: list[Child], samples: list[Sample], floor: list[float]) -> Row:
    p, n = fed.point, fed.point.sites
    conn = read_only(fed.work / "state" / "coordinator.db")
    try:
        rounds = [dict(r) for r in conn.execute("SELECT * FROM rounds ORDER BY round, attempt").fetchall()]
        uploads = [dict(r) for r in conn.execute("SELECT * FROM uploads").fetchall()]
        dropped = conn.execute("SELECT COUNT(*) FROM audit WHERE kind = 'site_timed_out'").fetchone()[0]
        job_row = conn.execute("SELECT state, detail FROM jobs").fetchone()
    finally:
        conn.close()
    completed = {r["round"]: r for r in rounds if r["state"] == "completed"}
    measured = [k for k in sorted(completed) if k >= 2] or sorted(completed)
    per_site = site_rounds([c.log for c in sites])
    phases: dict[str, list[float]] = {k: [] for k in ("round", "dispatch", "download", "local", "upload", "last")}
    phases |= {"aggregate": [], "commit": []}
    for k in measured:
        r = completed[k]
        timings = json.loads(r["timings"])
        phases["round"].append(r["finished"] - r["started"])
        phases["aggregate"].append(timings.get("aggregate_s", float("nan")))
        commit = r["finished"] - r["started"] - timings.get("train_s", 0.0) - timings.get("aggregate_s", 0.0)
        phases["commit"].append(max(0.0, commit))
        ups = [u["received"] for u in uploads if u["round"] == k and u["attempt"] == r["attempt"]]
        phases["last"].append(max(ups) - r["started"] if ups else float("nan"))
        entries = per_site.get(k, [])
        phases["dispatch"].append(median([e.end - e.model_s - e.train_s - e.upload_s - r["started"] for e in entries]))
        phases["download"].append(median([e.model_s for e in entries]))
        phases["local"].append(median([e.train_s for e in entries]))
        phases["upload"].append(median([e.upload_s for e in entries]))
    by_round = {s.round: s for s in samples}

    def per_round(names: Sequence[str]) -> list[float]:
        """CPU seconds of ``names`` together in each measured round (between two round completions)."""
        out = []
        for k in measured:
            if k in by_round and k - 1 in by_round:
                ticks = sum(by_round[k].cpu[x] - by_round[k - 1].cpu[x] for x in names)
                out.append(ticks / CLK_TCK)
        return out

    site_names = [c.name for c in sites]
    lo = [by_round[k].lo - by_round[k - 1].lo for k in measured if k in by_round and k - 1 in by_round]
    if not measured:
        phases = {k: [float("nan")] for k in phases}
    d = param_count(p.params)
    upload_bytes = 4 * (d + 1) if p.secure else 4 * d  # 32-bit ring with a weight lane under secure aggregation
    payload = n * (4 * d + upload_bytes)
    round_s, floor_s = median(phases["round"]), median(floor)
    return Row(
        sites=n,
        params=d,
        mode=p.mode,
        rounds=len(measured),
        round_s=round(round_s, 4),
        floor_s=round(floor_s, 4),
        ratio=round(round_s / floor_s, 2),
        dispatch_s=round(median(phases["dispatch"]), 4),
        download_s=round(median(phases["download"]), 4),
        local_s=round(median(phases["local"]), 4),
        upload_s=round(median(phases["upload"]), 4),
        last_upload_s=round(median(phases["last"]), 4),
        aggregate_s=round(median(phases["aggregate"]), 4),
        commit_s=round(median(phases["commit"]), 4),
        coord_cpu_s=round(median(per_round([coord.name])), 3),
        site_cpu_s=round(median(per_round(site_names)) / len(sites), 3),
        sites_cpu_s=round(median(per_round(site_names)), 3),
        coord_peak_mib=round(coord.maxrss_kib / 1024, 1),
        site_peak_mib=round(max(c.maxrss_kib for c in sites) / 1024, 1),
        lo_ratio=round(median(lo) / payload, 3) if lo else float("nan"),
        retried=sum(1 for r in rounds if r["state"] == "failed"),
        dropped=int(dropped),
        job=job_row["state"] if job_row["state"] == "finished" else f"{job_row['state']}: {job_row['detail']}",
        floor_runs=" ".join(f"{t:.3f}" for t in floor),
        round_runs=" ".join(f"{x:.3f}" for x in phases["round"]),
    )


def run_point(
    point: Point,
    work: Path,
    certs: Path,
    *,
    rounds: int,
    heartbeat_s: float | None,
    sites_per_process: int,
    floor_repeats: int,
    profiler: Profiler | None,
) -> Row:
    work.mkdir(parents=True)
    floor = tls_floor.measure(point.sites, 4 * param_count(point.params), certs, work, repeats=floor_repeats)
    fed = Federation(point, work, certs, rounds, heartbeat_s, sites_per_process)
    try:
        coord, sites = fed.start()
        attach = (lambda: profiler.attach(point, coord, sites)) if profiler is not None else None
        samples = monitor(coord, sites, work / "state" / "coordinator.db", timeout=1800, after_round_1=attach)
        deadline = time.monotonic() + 120
        for child in (*sites, coord):
            while not child.reap():
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{child.name} did not exit after the job:\n{child.tail()}")
                time.sleep(POLL_S)
        if profiler is not None:
            profiler.finish()
        return analyse(fed, coord, sites, samples, floor)
    finally:
        fed.stop()


def import_baseline(work: Path, certs: Path) -> float:
    """RSS (MiB) of a coordinator process that has imported everything and listens, with no job."""
    config = {
        "federation": {"name": "bench", "sites": ["site-01"]},
        "server": {"listen": "127.0.0.1:0", "tls": Federation._tls(certs / "coordinator")},
        "state_dir": str(work / "state"),
    }
    (work / "logs").mkdir(parents=True)
    path = work / "coordinator.yaml"
    path.write_text(yaml.safe_dump(config))
    ready = work / "ready"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    child = Child(
        "baseline",
        ["-m", "cohort_cli", "coordinator", "--config", str(path), "--ready-file", str(ready)],
        work / "logs" / "baseline.log",
        env,
    )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not ready.exists():
            if child.reap() or time.monotonic() > deadline:
                raise RuntimeError(f"the baseline coordinator did not start:\n{child.tail()}")
            time.sleep(POLL_S)
        time.sleep(1.0)  # let start-up allocations settle
        return child.rss_kib() / 1024
    finally:
        child.stop()


# -- profiling --------------------------------------------------------------------------------------------------
class Profiler:
    """py-spy on the coordinator and the first site of chosen grid points, from the end of round 1 (start-up) to the
    end of the job."""

    def __init__(self, py_spy: Path, out: Path, points: set[tuple[int, int]], native: bool) -> None:
        self.py_spy, self.out, self.points, self.native = py_spy, out, points, native
        self._procs: list[subprocess.Popen[bytes]] = []

    def attach(self, point: Point, coord: Child, sites: list[Child]) -> None:
        if (point.sites, point.params) not in self.points:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        stem = f"N{point.sites}-d{short(point.params)}-{point.mode}"
        for who, child in (("coordinator", coord), ("site", sites[0])):
            argv = [str(self.py_spy), "record", "--pid", str(child.pid), "--rate", "200", "--format", "raw"]
            argv += ["--output", str(self.out / f"{stem}-{who}.txt")]
            # --native unwinds C frames too (gRPC core, OpenSSL); it must pause the process for each sample.
            argv.append("--native" if self.native else "--nonblocking")
            self._procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    def finish(self) -> None:
        for proc in self._procs:
            try:
                proc.wait(timeout=60)  # py-spy ends (and writes its file) when the process it samples exits
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGINT)
                proc.wait()
        self._procs = []


# -- packed sites ---------------------------------------------------------------------------------------------------
async def host_sites(configs: Sequence[Path]) -> int:
    """Run several participant daemons in this process until every one has stopped (``exit_after_job``)."""
    from common import config as loader
    from common.lifecycle import install_stop_handlers
    from participant import config as pc
    from participant.daemon import ParticipantDaemon

    stop = asyncio.Event()
    install_stop_handlers(stop)
    daemons = [
        ParticipantDaemon(loader.load(pc.ParticipantConfig, c, env={}, env_prefix=pc.ENV_PREFIX)) for c in configs
    ]
    for d in daemons:
        await d.start()

    async def all_stopped() -> None:
        await asyncio.gather(*(d.wait_stopped() for d in daemons))

    waiters = [asyncio.ensure_future(all_stopped()), asyncio.ensure_future(stop.wait())]
    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    for w in waiters:
        w.cancel()
    await asyncio.gather(*(d.close("bench finished") for d in daemons))
    return 0 if all(d.error is None for d in daemons) else 1


# -- output -------------------------------------------------------------------------------------------------------
COLUMNS = [
    ("N", "sites"),
    ("d", "params"),
    ("mode", "mode"),
    ("round s", "round_s"),
    ("TLS floor s", "floor_s"),
    ("round / floor", "ratio"),
    ("dispatch", "dispatch_s"),
    ("download", "download_s"),
    ("local", "local_s"),
    ("upload", "upload_s"),
    ("last upload", "last_upload_s"),
    ("aggregate", "aggregate_s"),
    ("commit", "commit_s"),
    ("coord CPU s", "coord_cpu_s"),
    ("site CPU s", "site_cpu_s"),
    ("coord peak MiB", "coord_peak_mib"),
    ("site peak MiB", "site_peak_mib"),
    ("lo / payload", "lo_ratio"),
    ("retried", "retried"),
    ("dropped", "dropped"),
    ("job", "job"),
]


def markdown(rows: Sequence[Row], baseline_mib: float, command: str, notes: Sequence[str]) -> str:
    head = "| " + " | ".join(c for c, _ in COLUMNS) + " |"
    rule = "|" + "|".join("---" if k == "mode" else "---:" for _, k in COLUMNS) + "|"
    body = []
    for r in rows:
        values = asdict(r)
        cells = []
        for _, key in COLUMNS:
            v = values[key]
            cells.append(short(v) if key == "params" else (f"{v:g}" if isinstance(v, float) else str(v)))
        body.append("| " + " | ".join(cells) + " |")
    lines = [
        "# Federation round vs the TLS floor",
        "",
        f"`{command}`",
        "",
        f"- Machine: {machine()}; Python {platform.python_version()}; "
        f"load average at the end {' '.join(Path('/proc/loadavg').read_text().split()[:3])}.",
        f"- Coordinator import baseline (listening, no job): {baseline_mib:.1f} MiB RSS.",
        *[f"- {n}" for n in notes],
        "- Phases in seconds, medians over rounds 2..R (per phase: median over sites). CPU seconds per round; "
        "site CPU is per site process. Peak RSS is ru_maxrss at exit.",
        "",
        head,
        rule,
        *body,
    ]
    return "\n".join(lines) + "\n"


def write(rows: Sequence[Row], out: Path, stem: str, text: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with (out / f"{stem}.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=[f.name for f in fields(Row)], lineterminator="\n")
        writer.writeheader()
        for r in rows:
            writer.writerow(asdict(r))
    (out / f"{stem}.md").write_text(text, encoding="utf-8")


def parse_grid(args: argparse.Namespace) -> list[Point]:
    sites = [int(x) for x in args.sites.split(",")]
    params = [int(float(x)) for x in args.params.split(",")]
    modes = args.modes.split(",")
    points = [Point.of(n, d, m) for n in sites for d in params for m in modes]
    extras = args.extra if args.extra is not None else ["10:1e6:plain", "10:1e6:secure"]
    for extra in extras:
        if extra == "none":
            continue
        n, d, m = extra.split(":")
        points.append(Point.of(int(n), int(float(d)), m))
    return points


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", default="5,20", help="comma-separated N (default 5,20)")
    parser.add_argument("--params", default="1e5,1e6,1e7", help="comma-separated d (default 1e5,1e6,1e7)")
    parser.add_argument(
        "--modes",
        default="plain,secure",
        help="plain, secure, plain-data, secure-data (-data: over the bulk data channel; default plain,secure)",
    )
    parser.add_argument(
        "--extra",
        action="append",
        metavar="N:D:MODE",
        help="more grid points (default: the issue's SecAgg target point, 10:1e6:plain and 10:1e6:secure; "
        "'none' for no extra point)",
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--floor-repeats", type=int, default=5)
    parser.add_argument(
        "--heartbeat-s",
        type=float,
        default=None,
        help="server.heartbeat_interval_s (default: the coordinator's default)",
    )
    parser.add_argument("--sites-per-process", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--tag", default="", help="suffix of the result files (federation-TAG.*)")
    parser.add_argument("--work", type=Path, help="keep every federation's files (certs, state, logs) here")
    parser.add_argument("--note", action="append", default=[], help="a line for the markdown (what was changed)")
    parser.add_argument("--py-spy", type=Path, help="py-spy executable: profile the coordinator and one site")
    parser.add_argument(
        "--profile-at", action="append", default=[], metavar="N:D", help="grid points to profile (default: every point)"
    )
    parser.add_argument("--profile-dir", type=Path, help="where py-spy writes (default: OUT/profiles)")
    parser.add_argument("--native", action="store_true", help="py-spy --native (C frames too)")
    parser.add_argument("--role", choices=["sites"], help=argparse.SUPPRESS)
    parser.add_argument("configs", nargs="*", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "sites":
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
        return asyncio.run(host_sites(args.configs))

    points = parse_grid(args)
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (round 1 includes start-up and is not measured)")
    profiler = None
    if args.py_spy is not None:
        wanted = {(int(n), int(float(d))) for n, d in (x.split(":") for x in args.profile_at)}
        wanted = wanted or {(p.sites, p.params) for p in points}
        profiler = Profiler(args.py_spy, args.profile_dir or args.out / "profiles", wanted, args.native)
    command = " ".join(["python", "bench/federation.py", *sys.argv[1:]])
    root = args.work.resolve() if args.work else Path(tempfile.mkdtemp(prefix="cohort-federation-"))
    root.mkdir(parents=True, exist_ok=True)
    certs = root / "certs"
    if not certs.exists():
        names = [f"site-{i:02d}" for i in range(1, max(p.sites for p in points) + 1)]
        init_federation(certs, sites=names, admins=("admin",), federation="bench")
    baseline = import_baseline(root / "baseline", certs)
    print(f"coordinator import baseline: {baseline:.1f} MiB", flush=True)
    rows: list[Row] = []
    stem = "federation" + (f"-{args.tag}" if args.tag else "")
    for i, point in enumerate(points):
        print(f"[{i + 1}/{len(points)}] {point.label} ...", flush=True)
        try:
            row = run_point(
                point,
                root / f"{i:02d}-N{point.sites}-d{short(point.params)}-{point.mode}",
                certs,
                rounds=args.rounds,
                heartbeat_s=args.heartbeat_s,
                sites_per_process=args.sites_per_process,
                floor_repeats=args.floor_repeats,
                profiler=profiler,
            )
        except RuntimeError as exc:
            print(f"    failed: {exc}", file=sys.stderr, flush=True)
            continue
        rows.append(row)
        print(
            f"    round {row.round_s:.3f}s, floor {row.floor_s:.3f}s ({row.ratio:.2f}x); coordinator "
            f"{row.coord_cpu_s:.2f} CPU-s/round, peak {row.coord_peak_mib:.0f} MiB; sites {row.site_cpu_s:.2f} "
            f"CPU-s/round each, peak {row.site_peak_mib:.0f} MiB; dropped {row.dropped}, retried {row.retried}",
            flush=True,
        )
        notes = [
            f"Sites: {'one process each' if args.sites_per_process == 1 else f'{args.sites_per_process} per process'}"
            f"; task `{TASK}` (d via `{PARAMS_ENV}`), one SGD step (batch 32); {args.rounds} rounds, every site "
            "every round; no federated evaluation.",
            *args.note,
        ]
        write(rows, args.out, stem, markdown(rows, baseline, command, notes))
    print(f"wrote {args.out / stem}.csv and .md; work files in {root}")
    return 0 if len(rows) == len(points) else 1


if __name__ == "__main__":
    sys.exit(main())
