"""What admins call, as plain functions ``(admin, request, state) -> reply``; the servicer checked the certificate."""

from __future__ import annotations

import json
import time
from typing import Any

from common.errors import NotFound
from common.proto.cohort.v1 import cohort_pb2 as pb
from common.version import VERSION
from coordinator import jobspec
from coordinator.federation import Federation
from coordinator.jobs import QUEUED
from coordinator.round.events import ClearSuspension, JobState, Phase
from coordinator.state.store import Store


async def start_job(admin: str, req: pb.StartJobRequest, state: Federation) -> pb.JobStatus:
    """Start the job, or queue it behind the running one (state ``queued``)."""
    job_id = state.jobs.start(jobspec.from_proto(req.spec), actor=admin)
    return job_status(job_id, state)


async def stop_job(admin: str, req: pb.StopJobRequest, state: Federation) -> pb.JobStatus:
    await state.jobs.stop(req.job_id, req.reason or f"stopped by admin {admin}", actor=admin)
    return job_status(req.job_id, state)


async def cancel_job(admin: str, req: pb.CancelJobRequest, state: Federation) -> pb.JobStatus:
    state.jobs.cancel(req.job_id, req.reason, actor=admin)
    return job_status(req.job_id, state)


async def clear_suspension(admin: str, req: pb.ClearSuspensionRequest, state: Federation) -> pb.JobStatus:
    await state.jobs.active(req.job_id).feed(ClearSuspension(req.site, admin))
    return job_status(req.job_id, state)


def status(admin: str, req: pb.StatusRequest, state: Federation) -> pb.StatusReply:
    sessions = {s.site: s for s in state.registry.sessions()}
    sites = []
    for site in sorted(state.allowed):
        s = sessions.get(site)
        sites.append(
            pb.SiteStatus(
                site_id=site,
                connected=bool(s and s.connected),
                task_name=s.declaration.task_name if s else "",
                software_version=s.declaration.software_version if s else "",
                last_seen_unix=s.last_seen if s else 0.0,
            )
        )
    jobs = [status_of_record(row, state.store, waiting_reason(row, state)) for row in state.store.jobs()]
    return pb.StatusReply(federation=state.config.federation.name, sites=sites, jobs=jobs, software_version=VERSION)


def job_status(job_id: str, state: Federation) -> pb.JobStatus:
    row = state.store.job(job_id)
    if row is None:
        raise NotFound(f"unknown job {job_id!r}")
    return status_of_record(row, state.store, waiting_reason(row, state))


def waiting_reason(row: dict[str, Any], state: Federation) -> str:
    """Why the job does not train now, when it waits: its place in the queue, or the sites it waits for."""
    job_id = row["job_id"]
    if row["state"] == QUEUED:
        queue = [r["job_id"] for r in state.jobs.queued()]
        running = state.jobs.running()
        ahead = queue[: queue.index(job_id)] if job_id in queue else []
        behind = ahead[-1] if ahead else running.job_id if running is not None else ""
        return f"queued: position {len(ahead) + 1}" + (f", starts after job {behind}" if behind else "")
    runner = state.jobs.runners.get(job_id)
    if runner is None or runner.state is not JobState.RUNNING:
        return ""
    machine = runner.machine
    if machine.phase not in (Phase.STARTING, Phase.WAITING):
        return ""
    text = f"waiting for sites before round {machine.number}: {machine.shortfall()}"
    if machine.wait_deadline is not None:
        # Each wait lasts job.wait_for_sites_s; the round is tried max_round_retries + 1 times, then the job fails.
        waits_left = max(0, runner.spec.max_round_retries - machine.attempt)
        fails_at = machine.wait_deadline + waits_left * runner.spec.wait_for_sites_s
        text += (
            f"; the job fails at {time.strftime('%H:%M:%S', time.localtime(fails_at))} if no more sites fit "
            f"(job.wait_for_sites_s {runner.spec.wait_for_sites_s:g}s x {runner.spec.max_round_retries + 1} tries)"
        )
    return text


def status_of_record(row: dict[str, Any], store: Store, waiting: str = "") -> pb.JobStatus:
    spec = row["spec"]
    rounds = [
        pb.RoundStatus(
            round=r.round,
            state=r.state,
            cohort=r.cohort,
            reported=r.reported,
            model_version=r.model_version,
            train_loss=r.train_loss or 0.0,
            val_loss=r.val_loss or 0.0,
            val_accuracy=r.val_accuracy or 0.0,
            seconds=(r.finished - r.started) if r.finished else 0.0,
            epsilon=r.epsilon or 0.0,
            val_samples=r.val_samples or 0,
            val_metrics=r.val_metrics,
        )
        for r in store.rounds(row["job_id"])
    ]
    privacy = spec.get("privacy", {})
    aborts = row.get("site_aborts") or {}
    return pb.JobStatus(
        job_id=row["job_id"],
        state=row["state"],
        current_round=row["current_round"],
        model_version=row["model_version"],
        rounds=rounds,
        detail=row["detail"],
        test_loss=row["test_loss"] or 0.0,
        test_accuracy=row["test_accuracy"] or 0.0,
        privacy_unit=privacy.get("unit", "none"),
        epsilon=row["epsilon"] or 0.0,
        delta=privacy.get("delta", 0.0),
        site_epsilon=json.loads(row["site_epsilon"] or "{}"),
        spec=jobspec.job_spec_of_record(spec),
        suspended_sites={str(k): str(v) for k, v in dict(aborts.get("suspended", {})).items()},
        site_aborts={str(k): int(v) for k, v in dict(aborts.get("aborts", {})).items()},
        test_metrics=dict(row.get("test_metrics") or {}),
        waiting=waiting,
        created_unix=float(row.get("created") or 0.0),
    )
