"""Soak: does the coordinator's memory stay flat over many rounds?

Runs a real federation on 127.0.0.1 for ``--rounds`` rounds (default 200) with ``--sites`` sites (default 10) and
samples the coordinator's resident memory, open file descriptors and threads once per completed round. The
coordinator is its own process (``python -m cohort_cli coordinator``, the same command a deployment runs), so the
RSS is its own; the sites are in-process :class:`ParticipantDaemon` instances in one second process (every process
that imports torch costs ~300 MB, and ten of them would crowd a 2-core machine). Certificates are real (one
federation CA from :func:`common.ca.init_federation`, as the demo issues them); the data is the task's public
data set split over the sites with :mod:`common.datasets`, as the demo splits it.

Round boundaries come from the coordinator's own SQLite store (the ``rounds`` table, opened read-only beside the
coordinator's WAL writer): when a round's row turns ``completed``, the sample is taken. Between rounds the monitor
keeps polling /proc, so every sample also carries the highest RSS seen since the previous one.

Criterion (the issue's "Soak" item): the mean RSS over the last quarter of the rounds (151-200 of 200) is within
10 % of its mean over rounds 10 %-25 % (20-50 of 200, after warm-up), and the open descriptors do not grow. The
script exits 1 when it fails, 2 when the federation itself fails.

    .venv/bin/python bench/soak.py [--rounds 200] [--sites 10] [--task breast_cancer] [--out bench/results]
    .venv/bin/python bench/soak.py --quick              # 30 rounds, 4 sites: a smoke run (soak-quick.*)
    .venv/bin/python bench/soak.py --tracemalloc        # also diff the coordinator's Python heap (slower)

Writes ``soak.csv`` (one row per round), ``soak.md`` (settings, numbers, verdict) and, with matplotlib,
``soak.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import csv
import gc
import json
import logging
import math
import os
import platform
import signal
import sqlite3
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere: the coordinator/participant packages live at ROOT
    sys.path.insert(0, str(ROOT))

from cohort_cli.processes import Processes  # noqa: E402
from common.ca import init_federation  # noqa: E402
from common.certs import TlsFiles  # noqa: E402
from common.datasets import load_source, split_sites, write_site_folders  # noqa: E402
from common.errors import CohortError  # noqa: E402
from common.tasks import breast_cancer, digits  # noqa: E402
from common.tasks.base import TrainSettings  # noqa: E402

TASK_SETTINGS: dict[str, TrainSettings] = {
    "breast_cancer": breast_cancer.DEFAULT_SETTINGS,
    "digits": digits.DEFAULT_SETTINGS,
}
TOLERANCE = 0.10  # the criterion: last quarter within 10 % of the early window
# Descriptors are compared by their median in each window: one open for a moment when the sample is taken (a model
# file being written, a connection being set up) lifts the maximum, a leak lifts the median.
FD_SLACK = 2
POLL_S = 0.05
STARTUP_TIMEOUT_S = 120.0
SPLIT_SEED = 42
SPLIT_ALPHA = 0.5  # non-IID like the demo
QUICK_ROUNDS, QUICK_SITES = 30, 4


# -- /proc ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProcStats:
    rss_kib: int
    hwm_kib: int
    threads: int
    fds: int


def proc_stats(pid: int) -> ProcStats:
    """VmRSS, VmHWM (peak RSS) and Threads from /proc/<pid>/status; descriptors counted in /proc/<pid>/fd."""
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM", "Threads"):
            values[key] = int(rest.split()[0])
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return ProcStats(values["VmRSS"], values["VmHWM"], values["Threads"], fds)


# -- the federation ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Settings:
    rounds: int
    sites: int
    task: str
    evaluate_every: int
    secure_aggregation: bool
    tracemalloc: bool


def tls_dict(files: TlsFiles) -> dict[str, str]:
    return {"ca": str(files.ca), "cert": str(files.cert), "key": str(files.key)}


def prepare(work: Path, s: Settings) -> Path:
    """Certificates, site data, the coordinator's YAML and the participants' spec (participants.json); returns the
    coordinator's YAML."""
    names = [f"site-{i:02d}" for i in range(1, s.sites + 1)]
    ids = init_federation(work / "certs", sites=names, admins=("admin",), federation="cohort-soak")
    x, y, schema = load_source(s.task)
    folders = write_site_folders(work / "data", split_sites(x, y, names, alpha=SPLIT_ALPHA, seed=SPLIT_SEED), schema)
    params = TASK_SETTINGS[s.task]
    job: dict[str, Any] = {
        "name": "soak",
        "task": s.task,
        "rounds": s.rounds,
        "fraction": 1.0,
        # Every round waits for every site, so each one does the same work: a steady load, easy to compare.
        "min_sites": s.sites,
        "min_available_sites": s.sites,
        "round_timeout_s": 120,
        "wait_for_sites_s": STARTUP_TIMEOUT_S,
        "evaluate_every": s.evaluate_every,
        "params": {
            "local_epochs": params.local_epochs,
            "batch_size": params.batch_size,
            "learning_rate": params.learning_rate,
            "seed": params.seed,
        },
        "secure_aggregation": {"enabled": s.secure_aggregation, "weight_cap": 1000, "stage_timeout_s": 60},
    }
    coordinator = {
        "federation": {"name": "cohort-soak", "sites": names},
        "server": {"listen": "127.0.0.1:0", "tls": tls_dict(ids["coordinator"])},
        "state_dir": str(work / "state"),
        "job": job,
    }
    coordinator_yaml = work / "coordinator.yaml"
    coordinator_yaml.write_text(yaml.safe_dump(coordinator, sort_keys=False))
    spec = {
        "task": s.task,
        "sites": {n: {"tls": tls_dict(ids[f"site:{n}"]), "data_dir": str(folders[n])} for n in names},
    }
    (work / "participants.json").write_text(json.dumps(spec, indent=2))
    return coordinator_yaml


async def host_participants(spec: dict[str, Any], address: str) -> int:
    """Run every site in ``spec`` (participants.json) as a :class:`ParticipantDaemon` in this process until
    SIGTERM."""
    from common.certs import TlsFiles
    from common.lifecycle import install_stop_handlers
    from participant.config import CoordinatorEndpoint, ParticipantConfig
    from participant.daemon import ParticipantDaemon

    stop = asyncio.Event()
    install_stop_handlers(stop)
    daemons = [
        ParticipantDaemon(
            ParticipantConfig(
                tls=TlsFiles(**{k: Path(v) for k, v in site["tls"].items()}),
                data_dir=Path(site["data_dir"]),
                task=spec["task"],
                coordinator=CoordinatorEndpoint(address=address),
            )
        )
        for site in spec["sites"].values()
    ]
    for d in daemons:
        await d.start()
    await stop.wait()
    await asyncio.gather(*(d.close("soak finished") for d in daemons))
    return 0 if all(d.error is None for d in daemons) else 1


def count_types(path: Path) -> None:
    """Live objects by type into ``path`` (JSON): allocations made by C and Cython code (grpc's aio core) carry no
    Python line of their own, so their type is what names them."""
    gc.collect()
    types = collections.Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.get_objects())
    path.write_text(json.dumps(types))


def traced_coordinator(argv: Sequence[str], snapshot_dir: Path) -> int:
    """``cohort_cli.main`` under tracemalloc; SIGUSR1 writes a heap snapshot (snapshot-N.bin) into ``snapshot_dir``."""
    from cohort_cli.main import main as cli_main

    tracemalloc.start(12)
    count = 0

    def dump(signum: int, frame: object) -> None:
        nonlocal count
        count += 1
        count_types(snapshot_dir / f"types-{count}.json")
        tmp = snapshot_dir / f".snapshot-{count}.tmp"
        tracemalloc.take_snapshot().dump(str(tmp))
        tmp.replace(snapshot_dir / f"snapshot-{count}.bin")

    signal.signal(signal.SIGUSR1, dump)
    return cli_main(list(argv))


# -- sampling ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sample:
    round: int
    elapsed_s: float  # since the first round started (coordinator clock), at the sample
    round_s: float  # the round itself, from the coordinator's record (select -> aggregate -> model written)
    interval_s: float  # since the previous sample: the round plus any evaluation before it
    rss_mib: float  # coordinator RSS right after the round completed
    rss_peak_mib: float  # highest RSS polled since the previous sample
    hwm_mib: float  # the kernel's VmHWM: peak RSS since the coordinator started
    fds: int
    threads: int
    attempts: int  # 1 unless the round had to be retried


@dataclass(frozen=True)
class Outcome:
    samples: list[Sample]
    job_state: str
    job_detail: str
    test_accuracy: float | None
    wall_s: float
    start_stats: ProcStats  # once the coordinator listens, before any site joins
    final_stats: ProcStats  # after the job finished (final evaluation included)
    heap_diff: list[str]


def read_only(db: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, isolation_level=None)
    conn.row_factory = sqlite3.Row
    return conn


def monitor(
    children: Processes, db_path: Path, rounds: int, snapshot_at: int | None, snapshot_dir: Path | None
) -> tuple[list[Sample], sqlite3.Row, list[Path]]:
    """Poll the coordinator until its job ends; one :class:`Sample` per completed round."""
    pid = children.procs["coordinator"].pid
    while not db_path.exists():
        children.check_alive()
        children.pause(POLL_S, on="coordinator")
    conn = read_only(db_path)
    samples: list[Sample] = []
    snapshots: list[Path] = []
    job_id = ""
    last_round, peak_kib, last_t = 0, 0, time.monotonic()
    first_started: float | None = None
    try:
        while True:
            children.check_alive()
            peak_kib = max(peak_kib, proc_stats(pid).rss_kib)
            if not job_id:
                row = conn.execute("SELECT job_id FROM jobs ORDER BY created LIMIT 1").fetchone()
                job_id = row["job_id"] if row else ""
            if job_id:
                # The job's state first: a round recorded before the job ended is then still sampled below.
                job = conn.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
                done = conn.execute(
                    "SELECT round, started, finished, (SELECT COUNT(*) FROM rounds r2 WHERE r2.job_id = r.job_id"
                    " AND r2.round = r.round) AS attempts FROM rounds r WHERE job_id = ? AND state = 'completed'"
                    " AND round > ? ORDER BY round",
                    (job_id, last_round),
                ).fetchall()
                if first_started is None:
                    first = conn.execute("SELECT MIN(started) AS t FROM rounds WHERE job_id = ?", (job_id,)).fetchone()
                    first_started = first["t"] if first and first["t"] is not None else None
                if done:  # fresh numbers, taken after the round was seen to complete
                    stats = proc_stats(pid)
                    peak_kib = max(peak_kib, stats.rss_kib)
                now = time.monotonic()
                for row in done:  # normally one; several only if the poll fell behind
                    samples.append(
                        Sample(
                            round=row["round"],
                            elapsed_s=round(time.time() - (first_started or row["started"]), 3),
                            round_s=round(row["finished"] - row["started"], 4),
                            interval_s=round(now - last_t, 4),
                            rss_mib=round(stats.rss_kib / 1024, 2),
                            rss_peak_mib=round(peak_kib / 1024, 2),
                            hwm_mib=round(stats.hwm_kib / 1024, 2),
                            fds=stats.fds,
                            threads=stats.threads,
                            attempts=row["attempts"],
                        )
                    )
                    last_round, peak_kib, last_t = row["round"], stats.rss_kib, now
                    if snapshot_dir is not None and row["round"] in (snapshot_at, rounds):
                        snapshots.append(request_snapshot(children, snapshot_dir, len(snapshots) + 1))
                if job is not None and job["state"] != "running":
                    return samples, job, snapshots
            children.pause(POLL_S, on="coordinator")
    finally:
        conn.close()


def request_snapshot(children: Processes, snapshot_dir: Path, n: int, timeout: float = 120.0) -> Path:
    children.procs["coordinator"].send_signal(signal.SIGUSR1)
    path = snapshot_dir / f"snapshot-{n}.bin"
    deadline = time.monotonic() + timeout
    while not path.exists():
        children.check_alive()
        if time.monotonic() > deadline:
            raise RuntimeError(f"the coordinator wrote no heap snapshot within {timeout:.0f}s")
        children.pause(0.1, on="coordinator")
    return path


def short(filename: str) -> str:
    """A file name relative to the repository or to its site-packages / standard library directory."""
    for marker in (str(ROOT) + "/", "site-packages/", "lib/python3."):
        if marker in filename:
            rest = filename.split(marker, 1)[1]
            return rest if marker != "lib/python3." else "stdlib/" + rest.split("/", 1)[-1]
    return filename


def heap_growth(snapshot_dir: Path, first: int, last: int, top: int = 10) -> list[str]:
    """What grew in the coordinator's Python heap between two snapshots: allocation sites, then live objects by
    type."""
    filters = [
        tracemalloc.Filter(False, tracemalloc.__file__),
        tracemalloc.Filter(False, "<frozen importlib*"),
        tracemalloc.Filter(False, str(Path(__file__).resolve()), all_frames=True),  # this module's own counting
    ]
    old = tracemalloc.Snapshot.load(str(snapshot_dir / f"snapshot-{first}.bin")).filter_traces(filters)
    new = tracemalloc.Snapshot.load(str(snapshot_dir / f"snapshot-{last}.bin")).filter_traces(filters)
    total_old = sum(s.size for s in old.statistics("filename"))
    total_new = sum(s.size for s in new.statistics("filename"))
    lines = [f"traced Python heap: {total_old / 2**20:.2f} MiB -> {total_new / 2**20:.2f} MiB; largest growth:"]
    for stat in new.compare_to(old, "traceback")[:top]:
        if stat.size_diff <= 0:
            break
        # A traceback runs from the oldest frame to the newest; print the allocating line first.
        frames = [f"{short(f.filename)}:{f.lineno}" for f in reversed(stat.traceback[-4:])]
        lines.append(f"{stat.size_diff / 1024:+9.1f} KiB {stat.count_diff:+7d} blocks  {' <- '.join(frames)}")
    old_types: collections.Counter[str] = collections.Counter(
        json.loads((snapshot_dir / f"types-{first}.json").read_text())
    )
    new_types: collections.Counter[str] = collections.Counter(
        json.loads((snapshot_dir / f"types-{last}.json").read_text())
    )
    grown = sorted(((new_types[t] - old_types[t], t) for t in new_types), reverse=True)[:top]
    lines.append(f"live objects (gc): {sum(old_types.values())} -> {sum(new_types.values())}; most grown types:")
    lines += [f"{d:+7d}  {t} ({new_types[t]})" for d, t in grown if d > 0]
    return lines


def run_soak(s: Settings, work: Path) -> Outcome:
    coordinator_yaml = prepare(work, s)
    children = Processes(work, cwd=ROOT)
    snapshot_dir = work / "heap" if s.tracemalloc else None
    coordinator_args = [
        "coordinator",
        "--config",
        str(coordinator_yaml),
        "--ready-file",
        str(work / "coordinator.addr"),
    ]
    if snapshot_dir is not None:
        snapshot_dir.mkdir()
        entry = [str(Path(__file__).resolve()), "--role", "traced-coordinator", "--work", str(work), "--"]
    else:
        entry = ["-m", "cohort_cli"]
    t0 = time.monotonic()
    try:
        children.start("coordinator", [*entry, *coordinator_args])
        address = children.wait_for_file(work / "coordinator.addr", STARTUP_TIMEOUT_S, on="coordinator")
        start_stats = proc_stats(children.procs["coordinator"].pid)
        children.start(
            "participants",
            [str(Path(__file__).resolve()), "--role", "participants", "--work", str(work), "--address", address],
        )
        snapshot_at = max(1, math.ceil(s.rounds * 0.25))
        samples, job, snapshots = monitor(
            children, work / "state" / "coordinator.db", s.rounds, snapshot_at, snapshot_dir
        )
        final_stats = proc_stats(children.procs["coordinator"].pid)
        wall = time.monotonic() - t0
    finally:
        children.stop_all()
    diff = heap_growth(snapshot_dir, 1, len(snapshots)) if snapshot_dir is not None and len(snapshots) >= 2 else []
    return Outcome(
        samples=samples,
        job_state=job["state"],
        job_detail=job["detail"],
        test_accuracy=job["test_accuracy"],
        wall_s=wall,
        start_stats=start_stats,
        final_stats=final_stats,
        heap_diff=diff,
    )


# -- the verdict and the files -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Verdict:
    base_rounds: tuple[int, int]
    last_rounds: tuple[int, int]
    base_mean: float
    last_mean: float
    ratio: float
    rss_max: float
    rss_max_round: int
    peak_max: float
    fds_base: float  # medians
    fds_last: float
    fds_max: int
    threads_base: int
    threads_last: int
    memory_ok: bool
    fds_ok: bool

    @property
    def ok(self) -> bool:
        return self.memory_ok and self.fds_ok


def windows(rounds: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Early window rounds 10 %-25 % (20-50 of 200: after warm-up) and the last quarter (151-200 of 200)."""
    base = (max(1, round(rounds * 0.10)), max(1, round(rounds * 0.25)))
    last = (rounds - rounds // 4 + 1, rounds)
    return base, last


def judge(samples: Sequence[Sample], rounds: int) -> Verdict:
    (b0, b1), (l0, l1) = windows(rounds)
    base = [x for x in samples if b0 <= x.round <= b1]
    last = [x for x in samples if l0 <= x.round <= l1]
    if not base or not last:
        raise RuntimeError(f"too few completed rounds to judge ({len(samples)} of {rounds})")
    base_mean = statistics.fmean(x.rss_mib for x in base)
    last_mean = statistics.fmean(x.rss_mib for x in last)
    ratio = last_mean / base_mean
    top = max(samples, key=lambda x: x.rss_mib)
    fds_base, fds_last = statistics.median(x.fds for x in base), statistics.median(x.fds for x in last)
    return Verdict(
        base_rounds=(b0, b1),
        last_rounds=(l0, l1),
        base_mean=base_mean,
        last_mean=last_mean,
        ratio=ratio,
        rss_max=top.rss_mib,
        rss_max_round=top.round,
        peak_max=max(x.rss_peak_mib for x in samples),
        fds_base=fds_base,
        fds_last=fds_last,
        fds_max=max(x.fds for x in samples),
        threads_base=max(x.threads for x in base),
        threads_last=max(x.threads for x in last),
        memory_ok=abs(ratio - 1) <= TOLERANCE,
        fds_ok=fds_last <= fds_base + FD_SLACK,
    )


def machine() -> str:
    cpu = next(
        (
            line.partition(":")[2].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.machine(),
    )
    mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    return f"{os.cpu_count()} cores ({cpu}), {mem_kib / 2**20:.0f} GiB, {platform.system()} {platform.release()}"


def write_csv(samples: Sequence[Sample], path: Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=[f.name for f in fields(Sample)], lineterminator="\n")
        writer.writeheader()
        for x in samples:
            writer.writerow(asdict(x))


def summary(s: Settings, out: Outcome, v: Verdict, command: str, load: tuple[str, str]) -> str:
    completed = len(out.samples)
    retried = sum(1 for x in out.samples if x.attempts > 1)
    rounds_s = [x.round_s for x in out.samples]
    evaluations = f"every {s.evaluate_every} rounds" if s.evaluate_every else "off"
    accuracy = f"{out.test_accuracy:.4f}" if out.test_accuracy is not None else "-"
    verdict = "PASS" if v.ok else "FAIL"
    reasons = []
    if not v.memory_ok:
        reasons.append(f"RSS ratio {v.ratio:.3f} is outside 1 ± {TOLERANCE:g}")
    if not v.fds_ok:
        reasons.append(f"the median of open descriptors grew from {v.fds_base:g} to {v.fds_last:g}")
    lines = [
        "# Soak: coordinator memory over many rounds",
        "",
        f"`{command}`",
        "",
        f"- Machine: {machine()}; Python {platform.python_version()}. Load average {load[0]} at the start, "
        f"{load[1]} at the end (the cores are shared).",
        f"- Federation: coordinator process (`python -m cohort_cli coordinator`) + {s.sites} in-process participant "
        f"daemons in a second process, mutual TLS on 127.0.0.1; task `{s.task}`, split over the sites with "
        f"Dirichlet alpha {SPLIT_ALPHA} (seed {SPLIT_SEED}); fraction 1.0 (every site every round); federated "
        f"evaluation {evaluations}; secure aggregation {'on' if s.secure_aggregation else 'off'}"
        f"{'; coordinator under tracemalloc (RSS inflated)' if s.tracemalloc else ''}.",
        f"- Job: {out.job_state} ({out.job_detail}); {completed}/{s.rounds} rounds sampled, {retried} retried; "
        f"federated test accuracy {accuracy}.",
        f"- Wall time {out.wall_s:.1f} s (start-up to job end); {completed / out.samples[-1].elapsed_s:.2f} rounds/s "
        f"after the first round started; round median {statistics.median(rounds_s):.3f} s, max {max(rounds_s):.3f} s.",
        "",
        "| | value |",
        "|---|---:|",
        f"| RSS at start (listening, no sites) | {out.start_stats.rss_kib / 1024:.1f} MiB |",
        f"| RSS mean, rounds {v.base_rounds[0]}-{v.base_rounds[1]} | {v.base_mean:.1f} MiB |",
        f"| RSS mean, rounds {v.last_rounds[0]}-{v.last_rounds[1]} | {v.last_mean:.1f} MiB |",
        f"| ratio (last / early) | {v.ratio:.3f} |",
        f"| RSS max at a round end | {v.rss_max:.1f} MiB (round {v.rss_max_round}) |",
        f"| RSS max polled during rounds | {v.peak_max:.1f} MiB |",
        f"| RSS after the job (final evaluation done) | {out.final_stats.rss_kib / 1024:.1f} MiB |",
        f"| VmHWM (kernel's peak) | {out.final_stats.hwm_kib / 1024:.1f} MiB |",
        f"| open fds: start / early median / last median / max / end | {out.start_stats.fds} / {v.fds_base:g} / "
        f"{v.fds_last:g} / {v.fds_max} / {out.final_stats.fds} |",
        f"| threads: start / early max / last max / end | {out.start_stats.threads} / {v.threads_base} / "
        f"{v.threads_last} / {out.final_stats.threads} |",
        "",
        f"**Verdict: {verdict}** — criterion: mean RSS over rounds {v.last_rounds[0]}-{v.last_rounds[1]} within "
        f"{TOLERANCE:.0%} of the mean over rounds {v.base_rounds[0]}-{v.base_rounds[1]}, and open descriptors not "
        f"growing (last-window median ≤ early-window median + {FD_SLACK})"
        + (f". Failed: {'; '.join(reasons)}." if reasons else "."),
    ]
    if out.heap_diff:
        lines += ["", "Coordinator Python heap growth between the two snapshots (tracemalloc):", "", "```"]
        lines += [*out.heap_diff, "```"]
    lines += ["", "Per-round samples: the CSV beside this file; RSS per round: the PNG, if matplotlib is installed."]
    return "\n".join(lines) + "\n"


def plot(samples: Sequence[Sample], v: Verdict, path: Path, title: str) -> bool:
    """RSS per round (end-of-round and peak) with the two windows and the ±10 % band; fds and threads below."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = [x.round for x in samples]
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True, height_ratios=(3, 1))
    ax.plot(r, [x.rss_peak_mib for x in samples], color="tab:gray", linewidth=0.8, label="peak during the round")
    ax.plot(r, [x.rss_mib for x in samples], color="tab:blue", label="at the end of the round")
    ax.axhspan(v.base_mean * (1 - TOLERANCE), v.base_mean * (1 + TOLERANCE), color="tab:green", alpha=0.1)
    ax.axhline(v.base_mean, color="tab:green", linestyle="--", linewidth=1, label=f"early mean ± {TOLERANCE:.0%}")
    for (a, b), color in ((v.base_rounds, "tab:green"), (v.last_rounds, "tab:orange")):
        ax.axvspan(a, b, color=color, alpha=0.08)
    ax.axhline(v.last_mean, color="tab:orange", linestyle="--", linewidth=1, label="last-quarter mean")
    top = max(x.rss_peak_mib for x in samples)
    ax.set_ylim(0, top * 1.15)
    ax.set_ylabel("coordinator RSS (MiB)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax2.plot(r, [x.fds for x in samples], color="tab:purple", label="open fds")
    ax2.plot(r, [x.threads for x in samples], color="tab:brown", label="threads")
    ax2.set_xlabel("round")
    ax2.set_ylim(0, max(max(x.fds for x in samples), max(x.threads for x in samples)) * 1.3)
    ax2.grid(True, alpha=0.3)
    ax2.legend(loc="lower right", fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--sites", type=int, default=10)
    parser.add_argument("--task", choices=sorted(TASK_SETTINGS), default="breast_cancer")
    parser.add_argument("--evaluate-every", type=int, default=5, help="federated validation every N rounds (0: off)")
    parser.add_argument("--secure-aggregation", action="store_true", help="run the rounds under SecAgg+")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK_ROUNDS} rounds, {QUICK_SITES} sites")
    parser.add_argument("--tracemalloc", action="store_true", help="diff the coordinator's Python heap (slower)")
    parser.add_argument("--work", type=Path, help="keep the federation's files (certs, state, logs) here")
    parser.add_argument("--role", choices=["participants", "traced-coordinator"], help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    parser.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.role == "participants":
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
        return asyncio.run(host_participants(json.loads((args.work / "participants.json").read_text()), args.address))
    if args.role == "traced-coordinator":
        return traced_coordinator(args.rest, args.work / "heap")

    if args.quick:
        args.rounds, args.sites = QUICK_ROUNDS, QUICK_SITES
    if args.rounds < 8 or args.sites < 2:
        parser.error("--rounds must be at least 8 and --sites at least 2")
    s = Settings(args.rounds, args.sites, args.task, args.evaluate_every, args.secure_aggregation, args.tracemalloc)
    command = " ".join(["python", "bench/soak.py", *sys.argv[1:]])
    print(f"soak: {s.rounds} rounds, {s.sites} sites, task {s.task}, evaluation every {s.evaluate_every}", flush=True)
    load_start = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    try:
        if args.work is not None:
            args.work.mkdir(parents=True, exist_ok=False)
            out = run_soak(s, args.work.resolve())
        else:
            with tempfile.TemporaryDirectory(prefix="cohort-soak-") as tmp:
                out = run_soak(s, Path(tmp))
    except (RuntimeError, CohortError) as exc:
        print(f"soak: the federation failed: {exc}", file=sys.stderr)
        return 2
    load_end = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    if out.job_state != "finished":
        print(f"soak: the job ended {out.job_state}: {out.job_detail}", file=sys.stderr)
    try:
        v = judge(out.samples, s.rounds)
    except RuntimeError as exc:
        print(f"soak: {exc}", file=sys.stderr)
        return 2
    stem = "soak-quick" if args.quick else "soak"
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(out.samples, args.out / f"{stem}.csv")
    text = summary(s, out, v, command, (load_start, load_end))
    (args.out / f"{stem}.md").write_text(text, encoding="utf-8")
    print(text)
    title = f"Coordinator RSS: {s.rounds} rounds, {s.sites} sites, {s.task}"
    if plot(out.samples, v, args.out / f"{stem}.png", title):
        print(f"wrote {args.out / stem}.csv, .md, .png")
    else:
        print(f"wrote {args.out / stem}.csv, .md (no matplotlib: no plot)")
    return 0 if v.ok and out.job_state == "finished" else 1


if __name__ == "__main__":
    sys.exit(main())
