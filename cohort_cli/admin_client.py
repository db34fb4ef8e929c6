"""Admin client: status, start and stop jobs over mutual TLS with an admin certificate."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format

from common.certs import Role, TlsFiles
from common.job_text import strategy_line
from common.metrics import RECALL_KEY
from common.proto.cohort.v1 import cohort_pb2 as pb
from common.proto.cohort.v1 import cohort_pb2_grpc as pb_grpc
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


async def clear_suspension(endpoint: AdminEndpoint, job_id: str, site: str) -> pb.JobStatus:
    async with endpoint.channel() as channel:
        reply: pb.JobStatus = await pb_grpc.AdminStub(channel).ClearSuspension(
            pb.ClearSuspensionRequest(job_id=job_id, site=site), timeout=endpoint.timeout_s
        )
        return reply


def to_json(message: Any) -> str:
    return json.dumps(json_format.MessageToDict(message, preserving_proto_field_name=True), indent=2)


def format_status(reply: pb.StatusReply) -> str:
    lines = [f"federation {reply.federation} (coordinator {reply.software_version})", "sites:"]
    for s in reply.sites:
        state = "connected" if s.connected else "offline"
        lines.append(f"  {s.site_id:<20} {state:<10} {s.task_name} {s.software_version}")
    for job in reply.jobs:
        lines.append(
            f"job {job.job_id} [{job.spec.name}] task={job.spec.task} state={job.state} "
            f"round {job.current_round}/{job.spec.rounds}"
        )
        for r in job.rounds:
            lines.append(
                f"  round {r.round:>3} {r.state:<10} sites {len(r.reported)}/{len(r.cohort)} "
                f"train loss {r.train_loss:.4f} val acc {r.val_accuracy:.4f}{_imbalance(r.val_metrics)} "
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
