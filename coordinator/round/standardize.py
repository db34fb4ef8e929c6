"""The job's federated feature-statistics phase (``job.standardize``): what the machine needs to run it before round 1.

The phase is one lanes-only secure-aggregation instance, driven exactly like a secure evaluation
(:mod:`coordinator.round.secure_sum`): every eligible site is sent an ``EvaluateTask`` of split ``"stats"`` for round
0 (common/secagg_wire.py numbers its instances apart from every round's and evaluation's), sums the lanes of its
train split's statistics vector (common/tasks/standardize.py) masked, and the coordinator learns the totals only.
From them it derives one :class:`~common.tasks.standardize.FeatureScaling`, stores it on the job row (a restarted job
resumes with it and does not run the phase again) and sets it on every train and evaluate task that follows.

A failed instance (too few sites, too many dropouts, a secure-aggregation failure) is tried again after waiting for
the federation, at most :data:`MAX_TRIES` times per coordinator life and never more than the job's
``max_round_retries + 1``; then the job fails with the last reason. Without secure aggregation the phase is refused
when the job is configured (coordinator/config.py): per-site statistics in the clear would show the coordinator each
site's feature means and histograms.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from common.errors import CohortError
from common.proto.cohort.v1 import cohort_pb2 as pb
from common.secagg.lanes import Lane
from common.tasks.standardize import (
    MAX_STATISTICS_ROWS,
    FeatureScaling,
    StatisticsSpec,
    derive_scaling,
    statistics_lanes,
    statistics_of_totals,
)
from coordinator.config import StandardizeConfig

# Tries per coordinator life: the machine numbers secure instances generation * 4 + n (coordinator/round/machine.py).
MAX_TRIES = 4


@dataclass
class Standardization:
    """The phase's layout and outcome: ``scaling`` is None until the phase succeeded (or the job row had one)."""

    spec: StatisticsSpec
    config: StandardizeConfig
    scaling: FeatureScaling | None = None
    failures: int = 0

    @property
    def pending(self) -> bool:
        return self.scaling is None

    def lanes(self) -> tuple[Lane, ...]:
        return statistics_lanes(self.spec, MAX_STATISTICS_ROWS)

    def derive(self, totals: Mapping[str, float]) -> tuple[FeatureScaling | None, str]:
        """The scaling from the secure sum's lane totals, or None and why not (e.g. fewer than two records)."""
        try:
            total = statistics_of_totals(totals, self.spec)
            scaling = derive_scaling(total, self.spec, self.config.lower_quantile, self.config.upper_quantile)
        except CohortError as exc:
            return None, str(exc)
        self.scaling = scaling
        return scaling, ""

    def give_up(self, max_round_retries: int) -> bool:
        """Count a failed try; True when no try is left."""
        self.failures += 1
        return self.failures >= min(MAX_TRIES, max_round_retries + 1)


def scaling_json(scaling: FeatureScaling) -> str:
    """The job row's ``feature_scaling`` column."""
    return json.dumps(scaling.to_dict(), sort_keys=True)


def stamp(task: pb.TrainTask | pb.EvaluateTask, scaling: FeatureScaling | None) -> None:
    """Set the federation's scaling on a task (nothing without one: the site uses its task's fallback)."""
    if scaling is not None:
        task.feature_scaling.CopyFrom(scaling.to_proto())


def records_of(totals: Mapping[str, float]) -> int:
    """The training records the sum counted (every feature counts every record)."""
    return round(totals.get("f0.count", 0.0))
