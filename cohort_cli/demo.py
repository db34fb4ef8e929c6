"""``cohort demo``: a five-hospital federation on this machine, as separate processes over mutual TLS.

Steps: issue certificates, split the breast-cancer data over five hospitals (non-IID), start the coordinator and
five participant daemons with the configs in ``deploy/demo/`` (the same ones docker-compose uses), follow the job
through the admin API, write ``summary.json`` and stop every process it started.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path
from typing import Any

from cohort_cli.admin_client import AdminEndpoint
from cohort_cli.job_report import follow, privacy_summary, secagg_summary, summary_lines
from cohort_cli.processes import Processes
from common.ca import init_federation
from common.datasets import load_source, split_sites, write_site_folders
from common.errors import ConfigError

SITES = tuple(f"hospital-{i}" for i in range(1, 6))
DATASET = "breast_cancer"
ALPHA = 0.5
SEED = 42
JOB_TIMEOUT_S = 900.0


def default_deploy_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "deploy" / "demo"


def prepare(run_dir: Path) -> None:
    """Fresh certificates, data and state for one demo run."""
    for sub in ("certs", "data", "state", "logs"):
        shutil.rmtree(run_dir / sub, ignore_errors=True)
    for stale in ("summary.json", "coordinator.addr"):
        (run_dir / stale).unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    init_federation(run_dir / "certs", sites=SITES, admins=("admin",), federation="cohort-demo")
    x, y, schema = load_source(DATASET)
    splits = split_sites(x, y, SITES, alpha=ALPHA, seed=SEED)
    write_site_folders(run_dir / "data", splits, schema)


def run_demo(run_dir: Path, rounds: int | None = None, deploy_dir: Path | None = None) -> int:
    deploy = (deploy_dir or default_deploy_dir()).resolve()
    if not (deploy / "coordinator.yaml").exists():
        raise ConfigError(f"demo configs not found in {deploy}")
    run_dir = run_dir.resolve()
    started = time.monotonic()
    print(f"Cohort demo: 5 hospitals, task {DATASET}, non-IID (Dirichlet alpha={ALPHA}); run directory {run_dir}")
    prepare(run_dir)
    print("  issued certificates (CA, coordinator, 5 hospitals, admin) and split the data over the hospitals")
    procs = Processes(run_dir / "logs", cwd=run_dir)
    try:
        coordinator_args = [
            "-m",
            "cohort_cli",
            "coordinator",
            "--config",
            str(deploy / "coordinator.yaml"),
            "--set",
            "server.listen=127.0.0.1:0",
            "--ready-file",
            "coordinator.addr",
        ]
        if rounds is not None:
            coordinator_args += ["--set", f"job.rounds={rounds}"]
        procs.start("coordinator", coordinator_args)
        address = procs.wait_for_file(run_dir / "coordinator.addr", timeout=60, on="coordinator")
        print(f"  coordinator listening on {address} (mutual TLS)")
        for site in SITES:
            procs.start(
                site,
                [
                    "-m",
                    "cohort_cli",
                    "participant",
                    "--config",
                    str(deploy / f"{site}.yaml"),
                    "--set",
                    f"coordinator.address={address}",
                ],
            )
        print(f"  started {len(SITES)} participant daemons; training:")
        endpoint = AdminEndpoint.from_dir(address, run_dir / "certs" / "admins" / "admin")
        job = asyncio.run(follow(endpoint, JOB_TIMEOUT_S, check=procs.check_alive))
    finally:
        procs.stop_all()
    seconds = time.monotonic() - started
    model_path = (
        run_dir / "state" / "coordinator" / "models" / (job.model_version.removeprefix("sha256:") + ".safetensors")
    )
    completed = [r for r in job.rounds if r.state == "completed"]
    summary: dict[str, Any] = {
        "job_id": job.job_id,
        "state": job.state,
        "task": job.spec.task,
        "sites": list(SITES),
        "rounds": len(completed),
        "rounds_planned": job.spec.rounds,
        "final_test_accuracy": job.test_accuracy,
        "final_test_loss": job.test_loss,
        "final_val_accuracy": completed[-1].val_accuracy if completed else None,
        "seconds": round(seconds, 2),
        "model_path": str(model_path),
        "model_version": job.model_version,
        "secure_aggregation": secagg_summary(job),
        "differential_privacy": privacy_summary(job),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    for line in summary_lines(job, seconds):
        print(line)
    print(f"  global model: {model_path}")
    print(f"  summary: {run_dir / 'summary.json'}; logs: {run_dir / 'logs'}")
    return 0 if job.state == "finished" else 1
