"""One simulation run: Ray up, the sites' data, the job, and the same ``summary.json`` as ``cohort demo`` writes."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path
from typing import Any

from common.tasks.base import load_task
from coordinator.config import JobConfig
from coordinator.observe.report import ReportData, write_report
from participant.config import RecordPrivacyConfig
from simulation import data as site_data
from simulation import remote
from simulation.engine import Outcome, Resources, Simulation


def start_ray(address: str | None, num_cpus: int | None) -> bool:
    """Connect to ``address`` (an existing cluster) or start a local Ray; True when this call started it."""
    ray = remote.ray_or_error()
    if ray.is_initialized():
        return False
    # The workers import the project from the working directory's code (no packaging of a runtime environment).
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": "ERROR", "log_to_driver": False}
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=num_cpus, **kwargs)
    return True


def summary_of(outcome: Outcome, spec: JobConfig, seconds: float, plan: site_data.DataPlan) -> dict[str, Any]:
    runner, store = outcome.runner, outcome.store
    job = store.job(runner.job_id)
    assert job is not None
    completed = [r for r in store.rounds(runner.job_id) if r.state == "completed"]
    model_path = runner.models.path_for(job["model_version"])
    privacy = None
    if spec.privacy.unit != "none":
        privacy = {
            "unit": spec.privacy.unit,
            "delta": spec.privacy.delta,
            "epsilon": job["epsilon"],
            "site_epsilon": dict(sorted(json.loads(job["site_epsilon"] or "{}").items())),
        }
    sa = spec.secure_aggregation
    return {
        "job_id": runner.job_id,
        "state": job["state"],
        "detail": job["detail"],
        "task": spec.task,
        "simulated": True,
        "sites": len(outcome.sites),
        "data": plan.__dict__,
        "rounds": len(completed),
        "rounds_planned": spec.rounds,
        "final_test_accuracy": job["test_accuracy"],
        "final_test_loss": job["test_loss"],
        "final_val_accuracy": completed[-1].val_accuracy if completed else None,
        "seconds": round(seconds, 2),
        "seconds_per_round": round(seconds / max(1, len(completed)), 3),
        "virtual_seconds": round(outcome.virtual_seconds, 2),
        "ray_nodes": outcome.nodes,
        "model_path": str(model_path),
        "model_version": job["model_version"],
        "secure_aggregation": {"enabled": True, "bits": sa.bits, "clip": sa.clip} if sa.enabled else False,
        "differential_privacy": privacy,
    }


def run_simulation(
    spec: JobConfig,
    *,
    data: str,
    sites: int | None,
    run_dir: Path,
    alpha: float | None = None,
    quantity_skew: float = 0.0,
    seed: int = 42,
    site_privacy: RecordPrivacyConfig | None = None,
    address: str | None = None,
    num_cpus: int | None = None,
    cpus_per_site: float = 1.0,
    gpus_per_site: float = 0.0,
    max_in_flight: int = 0,
    quiet: bool = False,
) -> dict[str, Any]:
    """Run ``spec`` over the virtual sites and write ``run_dir/summary.json``; returns the summary."""

    def say(line: str) -> None:
        if not quiet:
            print(line, flush=True)

    started = time.monotonic()
    run_dir = run_dir.resolve()
    for sub in ("state", "data"):
        shutil.rmtree(run_dir / sub, ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    task = load_task(spec.task)
    folders, plan = site_data.site_folders(
        data, run_dir / "data", task.schema, sites, alpha=alpha, quantity_skew=quantity_skew, seed=seed
    )
    say(f"cohort simulate: job {spec.name!r} ({spec.task}), {site_data.describe(plan, folders)}")
    started_ray = start_ray(address, num_cpus)
    try:
        ray = remote.ray_or_error()
        say(f"  Ray: {len(ray.nodes())} node(s), {ray.cluster_resources().get('CPU', 0):g} CPUs")
        sim = Simulation(
            spec,
            folders,
            run_dir / "state",
            site_privacy=site_privacy,
            resources=Resources(cpus_per_site, gpus_per_site, max_in_flight),
            progress=say,
        )
        outcome = asyncio.run(sim.run())
    finally:
        if started_ray:
            remote.ray_or_error().shutdown()
    seconds = time.monotonic() - started
    summary = summary_of(outcome, spec, seconds, plan)
    outcome.store.close()
    # The run report a coordinator writes at job end (coordinator/observe/report.py), from the simulation's store.
    report = ReportData.from_database(run_dir / "state" / "coordinator.db", str(summary.get("job_id", "")))
    summary["report"] = str(write_report(report, run_dir / "state" / "reports" / report.job_id).html)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    say(
        f"job {summary['state']}: {summary['rounds']} rounds over {summary['sites']} virtual sites, federated test "
        f"accuracy {summary['final_test_accuracy']}, {seconds:.1f}s ({summary['seconds_per_round']}s per round)"
    )
    say(f"  global model: {summary['model_path']}\n  summary: {run_dir / 'summary.json'}; report: {summary['report']}")
    return summary
