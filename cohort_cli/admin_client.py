"""Admin client: status, start and stop jobs over mutual TLS with an admin certificate."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from common.certs import Role, TlsFiles
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


def to_json(message: Message) -> str:
    """JSON with the proto's field names, every field (zeros and empty strings too) and 64-bit integers as numbers
    (protobuf's JSON mapping writes them as strings)."""
    data = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return json.dumps(_numbers(data, message.DESCRIPTOR), indent=2)


_INT64 = frozenset(
    {
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_SFIXED64,
    }
)


def _numbers(data: dict[str, Any], descriptor: Any) -> dict[str, Any]:  # a message Descriptor (python or upb)
    """``data`` (MessageToDict of a ``descriptor`` message) with its 64-bit integer strings turned into ints."""
    for name, value in data.items():
        field = descriptor.fields_by_name.get(name)
        if field is None:
            continue
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            if value_field.message_type is not None:
                data[name] = {k: _numbers(v, value_field.message_type) for k, v in value.items()}
            elif value_field.type in _INT64:
                data[name] = {k: int(v) for k, v in value.items()}
        elif field.message_type is not None:
            if isinstance(value, list):
                data[name] = [_numbers(v, field.message_type) for v in value]
            elif isinstance(value, dict):
                data[name] = _numbers(value, field.message_type)
        elif field.type in _INT64:
            data[name] = [int(v) for v in value] if isinstance(value, list) else int(value)
    return data


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


def strategy_line(spec: pb.JobSpec) -> str:
    """The job's server optimizer, aggregation rule, selection and local learning-rate schedule, in one line."""
    st = spec.strategy
    name = st.name or "fedavg"
    adaptive = name in ("fedadam", "fedyogi", "fedadagrad")
    lr = st.server_lr if st.HasField("server_lr") else (0.1 if adaptive else 1.0)
    parts = [f"{name} (server lr {lr:g})"]
    rule = st.aggregation or "mean"
    if rule in ("krum", "multi_krum"):
        rule += f", f={st.byzantine_sites if st.HasField('byzantine_sites') else 1}"
    elif rule == "trimmed_mean":
        rule += f" {st.trim_fraction if st.HasField('trim_fraction') else 0.1:g}"
    parts.append(f"aggregation {rule}")
    if st.norm_bound:
        parts.append(f"norm bound {st.norm_bound:g}")
    parts.append(f"selection {st.selection or 'random'}")
    if spec.params.lr_schedule and spec.params.lr_schedule != "constant":
        parts.append(f"local lr {spec.params.lr_schedule} schedule")
    return ", ".join(parts)


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
