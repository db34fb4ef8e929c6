"""What a site decides about a training task, as pure functions: the daemon (participant/work.py) and the
simulator's virtual sites (simulation/engine.py) apply the same rules.

- :func:`clip_of`: the L2 bound the site clips its update to (site-level DP's clip norm, else the job's norm bound).
- :func:`record_dp_for`: this site's DP-SGD settings for the task, or why it must not train it.
- :func:`spend`: record a DP-SGD training in the site's budget and put its epsilon into the result.
- :func:`staleness_refusal`: whether a buffer's instance names a staleness weight the site takes (FedBuff + SecAgg).
- :func:`update_header`: the upload's header. Under secure aggregation the sample count and metrics travel masked in
  the lanes, so only the site's own privacy guarantee (dp_epsilon, dp_delta) stays in the clear (docs/SECURITY.md).
"""

from __future__ import annotations

import math
from dataclasses import replace

from common.proto.cohort.v1 import cohort_pb2 as pb
from common.serde import EncodedTensors
from common.tasks.base import RecordDP
from participant.config import RecordPrivacyConfig
from participant.record_dp import SiteBudget, planned_training
from participant.site import LocalUpdate

CLEAR_UNDER_SECAGG = ("dp_epsilon", "dp_delta")
# strategy.staleness_exponent's upper bound (coordinator/strategy/config.py): a weight below (1 + s)^-10 for an update
# s versions old is no staleness weight any job can ask for.
MAX_STALENESS_EXPONENT = 10


def clip_of(task: pb.TrainTask) -> float:
    """Site-level DP clips to its clip norm; a job with a norm bound (strategy.norm_bound) has every site clip to it,
    which is what secure aggregation relies on (the coordinator checks it only on plaintext updates)."""
    return task.privacy.clip_norm if task.privacy.unit == "site" else task.norm_bound


def record_dp_for(
    cfg: RecordPrivacyConfig | None, budget: SiteBudget | None, task: pb.TrainTask, num_samples: int
) -> RecordDP | str | None:
    """The DP-SGD settings to train ``task`` with (None: plain training), or the reason this site must decline it."""
    if cfg is None or not cfg.enabled:
        if task.privacy.unit == "record":
            return "the job requires record-level DP but this site's privacy.enabled is false"
        return None
    assert budget is not None
    plan = planned_training(num_samples, task.params.batch_size, task.params.local_epochs)
    if budget.would_exceed(plan.steps, plan.sample_rate, cfg.noise_multiplier):
        return (
            f"training would take this site's epsilon past its budget of {cfg.target_epsilon:g} "
            f"(spent {budget.epsilon():.3f} at delta {cfg.delta:g})"
        )
    return RecordDP(noise_multiplier=cfg.noise_multiplier, max_grad_norm=cfg.max_grad_norm, delta=cfg.delta)


def spend(local: LocalUpdate, budget: SiteBudget) -> tuple[LocalUpdate, float]:
    """Record a DP-SGD training in ``budget`` (spent once the update leaves the site: record it before uploading, so a
    crash and a retrain count twice, never zero times); the update with dp_epsilon and dp_delta in its result."""
    extra = local.result.extra
    spent = budget.record(int(extra["dp_steps"]), extra["dp_sample_rate"], extra["dp_noise_multiplier"])
    result = replace(local.result, extra={**extra, "dp_epsilon": spent, "dp_delta": budget.delta})
    return replace(local, result=result), spent


def staleness_refusal(trained: pb.TrainTask, instance: pb.TrainTask) -> str | None:
    """Why a buffer's instance may not have the update kept from ``trained`` at the staleness weight it names, or
    None. The site counts the versions itself (the instance's round is signed by all its sites) and takes only a
    weight some job could ask for: in [(1 + s)^-10, 1]. (Within that range the weight is the coordinator's choice:
    docs/SECURITY.md.)"""
    stale = instance.round - trained.round
    weight = instance.staleness_weight
    if stale < 0 or not (1 + stale) ** -MAX_STALENESS_EXPONENT <= weight <= 1:
        return f"staleness weight {weight:g} does not fit an update {stale} versions old"
    return None


def update_header(task: pb.TrainTask, local: LocalUpdate, tensors: EncodedTensors, secure: bool) -> pb.UpdateHeader:
    """The header of the upload of ``tensors`` (the update, or under secure aggregation its masked form)."""
    result = local.result
    metrics = {"loss": result.loss, "accuracy": result.accuracy}
    metrics |= {k: v for k, v in result.extra.items() if math.isfinite(v)}
    header = pb.UpdateHeader(
        job_id=task.job_id,
        round=task.round,
        attempt=task.attempt,
        base_model_version=task.model_version,
        manifest=tensors.manifest(),
    )
    if secure:
        header.metrics.update({k: v for k, v in metrics.items() if k in CLEAR_UNDER_SECAGG})
    else:
        header.num_samples = result.num_samples
        header.metrics.update(metrics)
        header.train_seconds = local.seconds
    return header
