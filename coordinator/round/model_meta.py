"""What a saved global model says about itself: the safetensors metadata written with every checkpoint.

A model file taken out of the coordinator (``cohort model download``), or kept at a site (``keep_final_model``),
must say what it is without the coordinator's database: the task and its code digest, the job, the round, the
round's training metric, the privacy spent (epsilon at delta, unit) and the strategy. All values are strings
(safetensors metadata is ``str -> str``); names start with ``cohort_``. No per-site value appears: under secure
aggregation the coordinator knows only totals, and the training loss here is the round's aggregate.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from coordinator.config import JobConfig
from coordinator.round.identity import JobIdentity
from coordinator.round.machine import JobMachine
from coordinator.round.privacy import JobPrivacy
from coordinator.round.records import RoundAttempt

# The keys every checkpoint carries besides ModelStore's own (cohort_version, cohort_order).
KEYS = (
    "job",
    "round",
    "cohort_task",
    "cohort_task_digest",
    "cohort_schema",
    "cohort_strategy",
    "cohort_privacy_unit",
    "cohort_epsilon",
    "cohort_delta",
    "cohort_metrics",
)


def epsilon_after(privacy: JobPrivacy, cohort_size: int) -> float:
    """The job's epsilon once this round is composed (what its commit will record), without changing the
    accountant: the model is saved before the commit point."""
    if not privacy.site_level:
        return privacy.epsilon()
    trial = type(privacy.accountant).from_json(privacy.accountant.to_json())
    trial.compose(privacy.event(cohort_size))
    return float(trial.epsilon())


def job_metadata(job_id: str, spec: JobConfig, identity: JobIdentity, task_name: str) -> dict[str, str]:
    """What every model of a job carries (round 0, the initial model, has only this and epsilon 0)."""
    return {
        "job": job_id,
        "round": "0",
        "cohort_task": task_name,
        "cohort_task_digest": identity.task_digest,
        "cohort_schema": identity.schema_fingerprint,
        "cohort_strategy": json.dumps(
            {"name": spec.strategy.name, "aggregation": spec.strategy.aggregation, "mode": spec.strategy.mode},
            sort_keys=True,
        ),
        "cohort_privacy_unit": spec.privacy.unit,
        "cohort_epsilon": "0.0",
        "cohort_delta": repr(spec.privacy.delta),
        "cohort_metrics": "{}",
    }


def round_metadata(
    machine: JobMachine, number: int, rnd: RoundAttempt | None, totals: Mapping[str, float] | None
) -> dict[str, str]:
    """The metadata of round ``number``'s model (``rnd``: its attempt; ``totals``: the secure sum's lanes)."""
    setup = machine.setup
    metrics: dict[str, float] = {}
    if totals is not None and totals.get("samples"):
        metrics["train_loss"] = totals.get("loss_sum", 0.0) / totals["samples"]
    elif rnd is not None and rnd.weight_sum:
        metrics["train_loss"] = rnd.loss_sum / rnd.weight_sum
    cohort = len(rnd.cohort) if rnd is not None else 0
    privacy = machine.privacy
    return job_metadata(setup.job_id, machine.spec, setup.identity, setup.task_name) | {
        "round": str(number),
        "cohort_epsilon": repr(epsilon_after(privacy, cohort) if cohort else privacy.epsilon()),
        "cohort_metrics": json.dumps(metrics, sort_keys=True),
    }
