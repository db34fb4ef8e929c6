"""Conversions between job configuration/records and their protobuf messages."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

from common import config as config_loader
from common.errors import ConfigError, InvalidArgument
from common.proto.cohort.v1 import cohort_pb2 as pb
from coordinator.config import JobConfig
from coordinator.state.store import Store


def _known(message: Any, values: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``values`` that ``message`` has fields for (records keep config keys the wire lacks)."""
    names = {f.name for f in message.DESCRIPTOR.fields}
    return {k: v for k, v in values.items() if k in names}


def job_spec_to_proto(spec: JobConfig) -> pb.JobSpec:
    d = asdict(spec)
    params = d.pop("params")
    secagg = d.pop("secure_aggregation")
    secagg.pop("full_graph_max")
    privacy = d.pop("privacy")
    return pb.JobSpec(
        params=pb.TrainParams(**params),
        secure_aggregation=pb.SecureAggregationSpec(**_known(pb.SecureAggregationSpec, secagg)),
        privacy=pb.PrivacySpec(**_known(pb.PrivacySpec, privacy)),
        **d,
    )


def job_status(row: dict[str, Any], store: Store) -> pb.JobStatus:
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
        )
        for r in store.rounds(row["job_id"])
    ]
    params = spec.get("params", {})
    return pb.JobStatus(
        job_id=row["job_id"],
        state=row["state"],
        current_round=row["current_round"],
        model_version=row["model_version"],
        rounds=rounds,
        detail=row["detail"],
        test_loss=row["test_loss"] or 0.0,
        test_accuracy=row["test_accuracy"] or 0.0,
        privacy_unit=spec.get("privacy", {}).get("unit", "none"),
        epsilon=row["epsilon"] or 0.0,
        delta=spec.get("privacy", {}).get("delta", 0.0),
        site_epsilon=json.loads(row["site_epsilon"] or "{}"),
        spec=pb.JobSpec(
            name=spec["name"],
            task=spec["task"],
            rounds=spec["rounds"],
            fraction=spec["fraction"],
            min_sites=spec["min_sites"],
            round_timeout_s=spec["round_timeout_s"],
            evaluate_every=spec["evaluate_every"],
            wait_for_sites_s=spec["wait_for_sites_s"],
            max_round_retries=spec["max_round_retries"],
            min_available_sites=spec["min_available_sites"],
            final_evaluation=spec.get("final_evaluation", True),
            privacy=pb.PrivacySpec(**_known(pb.PrivacySpec, spec.get("privacy", {}))),
            secure_aggregation=pb.SecureAggregationSpec(
                **_known(pb.SecureAggregationSpec, spec.get("secure_aggregation", {}))
            ),
            params=pb.TrainParams(
                local_epochs=params.get("local_epochs", 0),
                batch_size=params.get("batch_size", 0),
                learning_rate=params.get("learning_rate", 0.0),
                seed=params.get("seed", 0),
            ),
        ),
    )


def job_config_from_proto(spec: pb.JobSpec) -> JobConfig:
    """A validated JobConfig from an admin's JobSpec; zero values mean "use the default"."""
    data: dict[str, Any] = {}
    for key in (
        "name",
        "task",
        "rounds",
        "fraction",
        "min_sites",
        "min_available_sites",
        "round_timeout_s",
        "evaluate_every",
        "wait_for_sites_s",
        "over_selection",
    ):
        value = getattr(spec, key)
        if value:
            data[key] = value
    if spec.HasField("max_round_retries"):
        data["max_round_retries"] = spec.max_round_retries
    if spec.HasField("final_evaluation"):
        data["final_evaluation"] = spec.final_evaluation
    if spec.HasField("params"):
        params = {k: getattr(spec.params, k) for k in ("local_epochs", "batch_size", "learning_rate", "seed")}
        data["params"] = {k: v for k, v in params.items() if v}
    if spec.HasField("secure_aggregation"):
        sa = spec.secure_aggregation
        sa_fields = ("bits", "clip", "weight_cap", "dropout_rate", "corruption_rate", "stage_timeout_s")
        data["secure_aggregation"] = {"enabled": sa.enabled} | {k: getattr(sa, k) for k in sa_fields if getattr(sa, k)}
    if spec.HasField("privacy"):
        pv = spec.privacy
        fields = (
            "unit",
            "target_epsilon",
            "delta",
            "accountant",
            "noise_multiplier",
            "clip_norm",
            "adaptive_clipping",
            "target_quantile",
            "clip_learning_rate",
            "count_noise_std",
        )
        data["privacy"] = {k: getattr(pv, k) for k in fields if getattr(pv, k)}
        if pv.HasField("refuse_over_budget"):
            data["privacy"]["refuse_over_budget"] = pv.refuse_over_budget
    try:
        return config_loader.build(JobConfig, data, "job")
    except ConfigError as exc:
        raise InvalidArgument(f"job spec: {exc}") from None
