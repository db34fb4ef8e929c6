"""Admin client: status, start and stop jobs over mutual TLS with an admin certificate."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from common.certs import Role, TlsFiles
from common.job_text import strategy_line
from common.metrics import RECALL_KEY
from common.proto.cohort.v1 import cohort_pb2 as pb
from common.proto.cohort.v1 import cohort_pb2_grpc as pb_grpc
from common.proto_json import to_json as to_json  # re-exported: the CLI's --json
from common.tls import channel_credentials


@dataclass(frozen=True)
class AdminEndpoint:
    address: str
    tls: TlsFiles
    server_name: str = ""
    timeout_s: float = 10.0

    @classmethod
    def from_dir(cls, address: str, tls_dir: Path, server_name: str = "") -> AdminEndpoint:
        return cls(
            address,
            TlsFiles(ca=tls_dir / "ca.crt", cert=tls_dir / "tls.crt", key=tls_dir / "tls.key"),
            server_name,
        )

    def channel(self) -> grpc.aio.Channel:
        options: list[tuple[str, Any]] = []
        if self.server_name:
            options.append(("grpc.ssl_target_name_override", self.server_name))
        return grpc.aio.secure_channel(self.address, channel_credentials(self.tls, Role.ADMIN), options=options)


async def get_status(endpoint: AdminEndpoint) -> pb.StatusReply:
    async with endpoint.channel() as channel:
        reply: pb.StatusReply = await pb_grpc.AdminStub(channel).GetStatus(
            pb.StatusRequest(), timeout=endpoint.timeout_s
        )
        return reply


async def start_job(endpoint: AdminEndpoint, spec: pb.JobSpec) -> pb.JobStatus:
    async with endpoint.channel() as channel:
        reply: pb.JobStatus = await pb_grpc.AdminStub(channel).StartJob(
            pb.StartJobRequest(spec=spec), timeout=endpoint.timeout_s
        )
        return reply


async def stop_job(endpoint: AdminEndpoint, job_id: str, reason: str) -> pb.JobStatus:
    async with endpoint.channel() as channel:
        reply: pb.JobStatus = await pb_grpc.AdminStub(channel).StopJob(
            pb.StopJobRequest(job_id=job_id, reason=reason), timeout=endpoint.timeout_s
        )
        return reply


async def cancel_job(endpoint: AdminEndpoint, job_id: str, reason: str) -> pb.JobStatus:
    async with endpoint.channel() as channel:
        reply: pb.JobStatus = await pb_grpc.AdminStub(channel).CancelJob(
            pb.CancelJobRequest(job_id=job_id, reason=reason), timeout=endpoint.timeout_s
        )
        return reply


async def clear_suspension(endpoint: AdminEndpoint, job_id: str, site: str) -> pb.JobStatus:
    async with endpoint.channel() as channel:
        reply: pb.JobStatus = await pb_grpc.AdminStub(channel).ClearSuspension(
            pb.ClearSuspensionRequest(job_id=job_id, site=site), timeout=endpoint.timeout_s
        )
        return reply


def keep_last_rounds(reply: pb.StatusReply, last: int) -> pb.StatusReply:
    """A copy of ``reply`` with each job's rounds cut to its last ``last`` (0: all)."""
    out = pb.StatusReply()
    out.CopyFrom(reply)
    if last > 0:
        for job in out.jobs:
            keep = list(job.rounds)[-last:]
            del job.rounds[:]
            job.rounds.extend(keep)
    return out


def format_status(reply: pb.StatusReply, last: int = 0) -> str:
    """Federation, sites and jobs; each job's last ``last`` round records (0: all)."""
    lines = [f"federation {reply.federation} (coordinator {reply.software_version})", "sites:"]
    for s in reply.sites:
        state = "connected" if s.connected else "offline"
        lines.append(f"  {s.site_id:<20} {state:<10} {s.task_name} {s.software_version}")
    for job in reply.jobs:
        lines.append(
            f"job {job.job_id} [{job.spec.name}] task={job.spec.task} state={job.state} "
            f"round {job.current_round}/{job.spec.rounds}"
        )
        if job.waiting:
            lines.append(f"  {job.waiting}")
        shown = list(job.rounds)[-last:] if last > 0 else list(job.rounds)
        if len(shown) < len(job.rounds):
            lines.append(f"  ({len(job.rounds) - len(shown)} earlier round records not shown; --last 0 shows all)")
        for r in shown:
            acc = f"{r.val_accuracy:.4f}" if r.val_samples else "-"
            lines.append(
                f"  round {r.round:>3} {r.state:<10} sites {len(r.reported)}/{len(r.cohort)} "
                f"train loss {r.train_loss:.4f} val acc {acc}{_imbalance(r.val_metrics)} "
                f"{r.seconds:.1f}s"
            )
        if job.privacy_unit not in ("", "none"):
            per_site = ", ".join(f"{s} {e:.2f}" for s, e in sorted(job.site_epsilon.items()))
            lines.append(
                f"  privacy: {job.privacy_unit} level, epsilon {job.epsilon:.3f} at delta {job.delta:g}"
                + (f" (sites: {per_site})" if per_site else "")
            )
        spec = job.spec.secure_aggregation
        lines.append(
            "  secure aggregation: "
            + (f"on (SecAgg+, {spec.bits}-bit ring); the coordinator sees sums only" if spec.enabled else "off")
        )
        lines.append(f"  strategy: {strategy_line(job.spec)}")
        for site, why in sorted(job.suspended_sites.items()):
            lines.append(f"  suspended: {site}: {why} (`cohort job clear-site {job.job_id} {site}`)")
        if job.detail:
            lines.append(f"  {job.detail}")
        if job.state == "finished":
            lines.append(
                f"  federated test: loss {job.test_loss:.4f} accuracy {job.test_accuracy:.4f}"
                + _imbalance(job.test_metrics)
            )
    return "\n".join(lines)


def _imbalance(metrics: Mapping[str, float]) -> str:
    """`` AUC-PR 0.8123 recall@1%FPR 0.7012`` for a binary task that reports scores, else ``""``."""
    if "auc_pr" not in metrics:
        return ""
    return f" AUC-PR {metrics['auc_pr']:.4f} recall@1%FPR {metrics.get(RECALL_KEY, 0.0):.4f}"
