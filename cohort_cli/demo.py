"""``cohort demo``: a federation on this machine, as separate processes over mutual TLS.

Two use cases (``--use-case``):

* ``hospitals`` (the default): five hospitals, the breast-cancer data split non-IID, configs in ``deploy/demo/``
  (the same ones docker-compose uses);
* ``fraud``: four banks with synthetic transactions (common/fraud_data.py), configs in ``deploy/fraud/``; after the
  job it compares the federated model with each bank alone and with pooled data (cohort_cli/fraud_demo.py).

Steps: issue certificates, prepare each site's data, start the coordinator and the participant daemons, follow the
job through the admin API, write ``summary.json`` and stop every process it started.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cohort_cli.admin_client import AdminEndpoint
from cohort_cli.job_report import follow, privacy_summary, secagg_summary, summary_lines
from cohort_cli.processes import Processes
from common.ca import init_federation
from common.datasets import load_source, split_sites, write_site_folders
from common.errors import ConfigError
from common.proto.cohort.v1 import cohort_pb2 as pb

SITES = tuple(f"hospital-{i}" for i in range(1, 6))
DATASET = "breast_cancer"
ALPHA = 0.5
SEED = 42
JOB_TIMEOUT_S = 900.0


@dataclass(frozen=True)
class UseCase:
    """What differs between the demos: the sites, the configs, their data, and a report after the job."""

    name: str
    sites: tuple[str, ...]
    deploy: str  # folder under deploy/
    federation: str
    members: str  # "hospitals", "banks": in messages
    headline: str
    write_data: Callable[[Path], None]
    # After the job: (run dir, deploy dir, final status, model path) -> extra summary.json entries (prints its report).
    report: Callable[[Path, Path, pb.JobStatus, Path], dict[str, Any]] | None = None


def _hospital_data(data_dir: Path) -> None:
    x, y, schema = load_source(DATASET)
    splits = split_sites(x, y, SITES, alpha=ALPHA, seed=SEED)
    write_site_folders(data_dir, splits, schema)


HOSPITALS = UseCase(
    "hospitals",
    SITES,
    "demo",
    "cohort-demo",
    "hospitals",
    f"5 hospitals, task {DATASET}, non-IID (Dirichlet alpha={ALPHA})",
    _hospital_data,
)


def default_deploy_dir(use_case: UseCase = HOSPITALS) -> Path:
    return Path(__file__).resolve().parent.parent / "deploy" / use_case.deploy


def prepare(run_dir: Path, use_case: UseCase = HOSPITALS) -> None:
    """Fresh certificates, data and state for one demo run."""
    for sub in ("certs", "data", "state", "logs"):
        shutil.rmtree(run_dir / sub, ignore_errors=True)
    for stale in ("summary.json", "coordinator.addr"):
        (run_dir / stale).unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    init_federation(run_dir / "certs", sites=use_case.sites, admins=("admin",), federation=use_case.federation)
    use_case.write_data(run_dir / "data")


def run_report(state_dir: Path, job_id: str) -> Path:
    """The job's run report: the one the coordinator wrote when the job ended, else written now from its records."""
    from coordinator.observe.report import ReportData, write_report

    page = state_dir / "reports" / job_id / "report.html"
    if not page.exists():
        write_report(ReportData.from_database(state_dir / "coordinator.db", job_id), page.parent)
    return page


def run_demo(
    run_dir: Path, rounds: int | None = None, deploy_dir: Path | None = None, case: UseCase = HOSPITALS
) -> int:
    deploy = (deploy_dir or default_deploy_dir(case)).resolve()
    if not (deploy / "coordinator.yaml").exists():
        raise ConfigError(f"demo configs not found in {deploy}")
    run_dir = run_dir.resolve()
    started = time.monotonic()
    print(f"Cohort demo: {case.headline}; run directory {run_dir}")
    prepare(run_dir, case)
    print(f"  issued certificates (CA, coordinator, {len(case.sites)} sites, admin) and prepared each site's data")
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
        for site in case.sites:
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
        print(f"  started {len(case.sites)} participant daemons; training:")
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
        "use_case": case.name,
        "sites": list(case.sites),
        "rounds": len(completed),
        "rounds_planned": job.spec.rounds,
        "final_test_accuracy": job.test_accuracy,
        "final_test_loss": job.test_loss,
        "final_val_accuracy": completed[-1].val_accuracy if completed else None,
        "final_test_metrics": dict(sorted(job.test_metrics.items())),
        "final_val_metrics": dict(sorted(completed[-1].val_metrics.items())) if completed else {},
        "seconds": round(seconds, 2),
        "model_path": str(model_path),
        "model_version": job.model_version,
        "secure_aggregation": secagg_summary(job),
        "differential_privacy": privacy_summary(job),
    }
    for line in summary_lines(job, seconds, case.members):
        print(line)
    print(f"  global model: {model_path}")
    if case.report is not None and job.state == "finished":
        summary |= case.report(run_dir, deploy, job, model_path)
        summary["seconds"] = round(time.monotonic() - started, 2)
    summary["report"] = str(run_report(run_dir / "state" / "coordinator", job.job_id))
    print(f"  run report: {summary['report']}")
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"  summary: {run_dir / 'summary.json'}; logs: {run_dir / 'logs'}")
    return 0 if job.state == "finished" else 1
