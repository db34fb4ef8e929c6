"""The simulator's speed and the coordinator side's memory against the number of virtual sites, next to Flower's.

For each workload and N, a fresh process runs a plaintext FedAvg job (every site every round, one local epoch of
SGD, batch 16, lr 0.05, no evaluation rounds) over N virtual sites with ``cohort simulate``'s engine on a local Ray
(``--num-cpus`` CPUs, one per site task), and, where ``--flower`` names a Python with ``flwr[simulation]``
installed (a separate virtual environment: Flower is never a Cohort dependency), bench/flower_simulation.py runs the
same workload on Flower's simulation engine. Workloads: the built-in ``breast_cancer`` and ``digits`` tasks on their
data sets (split on the fly; beyond a disjoint split each site draws its records with replacement), and
``mlp1e5``/``mlp1e6``, breast_cancer's data with a 10^5- or 10^6-parameter model (bench/wide_mlp_task.py).

Per cell: the first round's seconds (it includes loading the sites' data and starting Ray's workers), the seconds
per round after it (the mean of rounds 2..R: the steady state) and rounds per second, and the driver process's peak
RSS (the coordinator side: the job's machine, runner, store and the virtual sites' bookkeeping; Ray's workers are
apart). A cell that runs past ``--cell-timeout`` is recorded as such. Not a test: numbers go into the README.

    nice -n 10 .venv/bin/python -m bench.simulation --sites 10 100 1000 --workloads breast_cancer digits \
        --flower /tmp/flwr-venv/bin/python --out bench/results/simulation.json
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if not __package__:  # run as a file: bench/ first on sys.path would shadow the simulation package with this module
    sys.path[0] = str(ROOT)
WORKLOADS = {  # name -> (task reference, data set)
    "breast_cancer": ("breast_cancer", "breast_cancer"),
    "digits": ("digits", "digits"),
    "mlp1e5": ("bench.wide_mlp_task:MLP_1E5", "breast_cancer"),
    "mlp1e6": ("bench.wide_mlp_task:MLP_1E6", "breast_cancer"),
}
PARAMS = {"local_epochs": 1, "batch_size": 16, "learning_rate": 0.05, "seed": 0, "optimizer": "sgd"}


def cohort_cell(workload: str, sites: int, rounds: int, num_cpus: int) -> dict[str, Any]:
    """One cell in this process: returns the round times, the driver's peak RSS and the parameter count."""
    from common import config as config_loader
    from common.serde import state_dict_float32
    from common.tasks.base import load_task
    from coordinator.config import JobConfig
    from simulation import data as site_data
    from simulation.engine import Simulation
    from simulation.remote import ray_or_error
    from simulation.run import start_ray

    ref, source = WORKLOADS[workload]
    task = load_task(ref)
    spec = config_loader.build(
        JobConfig,
        {
            "name": f"bench-{workload}",
            "task": ref,
            "rounds": rounds,
            "fraction": 1.0,
            "min_sites": sites,
            "min_available_sites": sites,
            "evaluate_every": 0,
            "round_timeout_s": 3600,
            "wait_for_sites_s": 3600,
            "params": PARAMS,
        },
        "job",
    )
    with tempfile.TemporaryDirectory(prefix="simbench-") as tmp:
        folders, plan = site_data.split_on_the_fly(
            Path(tmp) / "data", source, task.schema, sites, alpha=None, quantity_skew=0.0, seed=0
        )
        train = [sum(1 for _ in (f / "train.csv").open()) - 1 for f in folders.values()]
        start_ray(None, num_cpus)
        marks: list[float] = []

        def progress(line: str) -> None:
            if line.startswith("round "):
                marks.append(time.perf_counter())

        try:
            started = time.perf_counter()
            outcome = asyncio.run(Simulation(spec, folders, Path(tmp) / "state", progress=progress).run())
        finally:
            ray_or_error().shutdown()
        assert outcome.runner.state == "finished", outcome.runner.detail
        outcome.store.close()
    times = [started, *marks]
    return {
        "engine": "cohort",
        "workload": workload,
        "sites": sites,
        "rounds": len(marks),
        "round_seconds": [round(b - a, 3) for a, b in itertools.pairwise(times)],
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "parameters": sum(t.numel() for t in state_dict_float32(task.build_model(seed=0)).values()),
        "train_records_per_site": round(sum(train) / len(train), 1),
        "data": plan.kind,
    }


def run_cell(cmd: list[str], timeout: float) -> dict[str, Any] | str:
    """Run one cell in its own process: its RESULT line, or why there is none."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return f"over {timeout:.0f} s"
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            result: dict[str, Any] = json.loads(line.removeprefix("RESULT "))
            return result
    return f"failed (exit {proc.returncode}): {(proc.stderr or proc.stdout)[-400:]}"


def steady(cell: dict[str, Any]) -> float:
    """Seconds per round after the first (the first alone when there is one round)."""
    rounds: list[float] = cell["round_seconds"]
    later = rounds[1:] or rounds
    return sum(later) / len(later)


def table(results: list[dict[str, Any]]) -> str:
    rows = [
        "| workload | d | N | Cohort s/round | rounds/s | first round s | driver peak RSS MiB | Flower s/round "
        "| Flower RSS MiB | Cohort / Flower |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in results:
        c, f = r["cohort"], r.get("flower")
        if isinstance(c, str):
            rows.append(f"| {r['workload']} | | {r['sites']} | {c} | | | | | | |")
            continue
        s = steady(c)
        if isinstance(f, dict):
            fs = steady(f)
            flower = f"{fs:.3f} | {f['peak_rss_mib']:.0f} | {s / fs:.2f}"
        else:
            flower = f"{f or 'not run'} | | "
        rows.append(
            f"| {r['workload']} | {c['parameters']:,} | {r['sites']} | {s:.3f} | {1 / s:.2f} | "
            f"{c['round_seconds'][0]:.2f} | {c['peak_rss_mib']:.0f} | {flower} |"
        )
    return "\n".join(rows)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """Seconds per round against N, one line per workload and engine (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, workload in enumerate(dict.fromkeys(r["workload"] for r in results)):
        rows = sorted((r for r in results if r["workload"] == workload), key=lambda r: int(r["sites"]))
        for engine, style in (("cohort", "-"), ("flower", "--")):
            points = [(r["sites"], steady(r[engine])) for r in rows if isinstance(r.get(engine), dict)]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, style, marker="o", color=f"C{i}", label=f"{workload} ({engine})")
    ax.set(xscale="log", yscale="log", xlabel="virtual sites N", ylabel="seconds per round (steady state)")
    ax.set_title("cohort simulate vs Flower simulation (2 CPUs, local Ray)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, nargs="+", default=[10, 100, 1000, 5000])
    parser.add_argument("--workloads", nargs="+", choices=sorted(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--flower", default=None, help="a Python with flwr[simulation] (its own virtual environment)")
    parser.add_argument("--cell-timeout", type=float, default=600)
    parser.add_argument("--out", type=Path, default=None, help="JSON file to write (appended to by cell)")
    parser.add_argument("--report", action="store_true", help="only print the table (and --plot) from --out")
    parser.add_argument("--plot", type=Path, default=None, help="PNG of seconds per round against N")
    parser.add_argument("--cell", nargs=2, metavar=("WORKLOAD", "SITES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cell:
        result = cohort_cell(args.cell[0], int(args.cell[1]), args.rounds, args.num_cpus)
        print("RESULT " + json.dumps(result), flush=True)
        return
    results: list[dict[str, Any]] = json.loads(args.out.read_text()) if args.out and args.out.exists() else []
    for workload in [] if args.report else args.workloads:
        for n in args.sites:
            base = [f"--rounds={args.rounds}", f"--num-cpus={args.num_cpus}"]
            cell = [sys.executable, "-m", "bench.simulation", "--cell", workload, str(n), *base]
            cohort = run_cell(cell, args.cell_timeout)
            row: dict[str, Any] = {"workload": workload, "sites": n, "cohort": cohort}
            if args.flower and isinstance(cohort, dict):
                flower_cmd = [
                    args.flower,
                    str(ROOT / "bench" / "flower_simulation.py"),
                    f"--workload={workload}",
                    f"--sites={n}",
                    f"--train-records={round(cohort['train_records_per_site'])}",
                    *base,
                ]
                row["flower"] = run_cell(flower_cmd, args.cell_timeout)
            results = [r for r in results if (r["workload"], r["sites"]) != (workload, n)] + [row]
            print(json.dumps(row), flush=True)
            if args.out:
                args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(table(results))
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
