"""Following a job through the admin API and printing its rounds and summary.

Shared by ``cohort demo`` (processes on this machine) and ``cohort job watch`` (any federation, e.g. the
docker-compose simulation), so both print the same lines.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from cohort_cli.admin_client import AdminEndpoint, get_status
from common.errors import CohortError
from common.metrics import RECALL_KEY
from common.proto.cohort.v1 import cohort_pb2 as pb

POLL_S = 0.5


def round_line(job: pb.JobStatus, r: pb.RoundStatus) -> str:
    acc = f"{r.val_accuracy:.4f}" if r.val_samples else "-"
    loss = f"{r.val_loss:.4f}" if r.val_samples else "-"
    auc = f" | val AUC-PR {r.val_metrics['auc_pr']:.4f}" if "auc_pr" in r.val_metrics else ""
    return (
        f"round {r.round:>2}/{job.spec.rounds} | sites {len(r.reported)}/{len(r.cohort)} | "
        f"train loss {r.train_loss:.4f} | val loss {loss} | val acc {acc}{auc} | {r.seconds:.2f}s"
    )


def _pick(reply: pb.StatusReply, job_id: str) -> pb.JobStatus | None:
    if not job_id:
        return reply.jobs[-1] if reply.jobs else None
    for job in reply.jobs:
        if job.job_id == job_id:
            return job
    raise CohortError(f"the coordinator has no job {job_id!r}")


async def follow(
    endpoint: AdminEndpoint,
    timeout: float,
    *,
    job_id: str = "",
    check: Callable[[], None] | None = None,
) -> pb.JobStatus:
    """Print each round as it completes; return the job's final status. ``job_id`` empty: the latest job.

    ``check`` runs before every poll (the demo uses it to fail fast when one of its processes died).
    """
    printed: set[tuple[int, int]] = set()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check is not None:
            check()
        job = _pick(await get_status(endpoint), job_id)
        if job is not None:
            done = job.state not in ("running", "pending", "queued")
            for i, r in enumerate(job.rounds):
                key = (r.round, i)
                if key in printed:
                    continue
                if r.state == "completed" and (r.val_samples or job.spec.evaluate_every == 0 or done):
                    print(round_line(job, r), flush=True)
                    printed.add(key)
                elif r.state == "failed":
                    print(f"round {r.round:>2}/{job.spec.rounds} | failed, will retry", flush=True)
                    printed.add(key)
            if done:
                return job
        await asyncio.sleep(POLL_S)
    raise CohortError(f"the job did not finish within {timeout:.0f}s")


def secagg_summary(job: pb.JobStatus) -> dict[str, Any] | bool:
    sa = job.spec.secure_aggregation
    if not sa.enabled:
        return False
    return {
        "enabled": True,
        "protocol": "SecAgg+ (full graph up to 64 sites)",
        "bits": sa.bits,
        "clip": sa.clip,
        "weight_cap": sa.weight_cap,
    }


def privacy_summary(job: pb.JobStatus) -> dict[str, Any] | None:
    if job.privacy_unit in ("", "none"):
        return None
    return {
        "unit": job.privacy_unit,
        "delta": job.delta,
        "epsilon": job.epsilon,
        "site_epsilon": dict(sorted(job.site_epsilon.items())),
    }


def summary_lines(job: pb.JobStatus, seconds: float, members: str = "sites") -> list[str]:
    """The closing lines: accuracy (and AUC-PR where the task reports it), epsilon per site, whether secure
    aggregation was on. ``members``: what the sites are called (hospitals, banks)."""
    completed = [r for r in job.rounds if r.state == "completed"]
    auc = ""
    if "auc_pr" in job.test_metrics:
        auc = f", AUC-PR {job.test_metrics['auc_pr']:.4f}, recall@1%FPR {job.test_metrics.get(RECALL_KEY, 0.0):.4f}"
    lines = [
        f"job {job.state}: {len(completed)} rounds, federated test accuracy {job.test_accuracy:.4f}, "
        f"loss {job.test_loss:.4f}{auc}, {seconds:.1f}s"
    ]
    if job.privacy_unit not in ("", "none"):
        lines.append(f"  differential privacy ({job.privacy_unit} level), epsilon spent at delta {job.delta:g}:")
        lines += [f"    {site}: {eps:.2f}" for site, eps in sorted(job.site_epsilon.items())]
        if job.privacy_unit == "site":
            lines.append(f"    federation: {job.epsilon:.2f}")
    if job.spec.secure_aggregation.enabled:
        lines.append(f"  secure aggregation: on (SecAgg+); the coordinator saw only the sum of the {members}' updates")
    return lines
