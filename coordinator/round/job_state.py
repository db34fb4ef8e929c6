"""The job's plain state records: the task identity sites must match, the open round, an open evaluation."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from common.metrics import ScoreHistogram, imbalance_metrics
from common.proto.cohort.v1 import cohort_pb2 as pb
from common.serde import EncodedTensors
from common.tasks import digest as task_code
from common.tasks.base import Task
from common.tasks.params import ParamValue, canonical_json
from common.version import VERSION
from coordinator.round.aggregation import RunningSum
from coordinator.round.machine import CloseRound, RoundState
from coordinator.round.secagg import SecAggRound
from coordinator.state.registry import Declaration


@dataclass(frozen=True)
class JobIdentity:
    task_name: str
    task_digest: str
    schema_fingerprint: str
    task_version: str = ""
    task_code_digest: str = ""
    training_code_digest: str = ""
    task_params: str = ""  # canonical JSON of the job's task parameters (sent with every task; not declared)

    @classmethod
    def of(cls, task: Task, params: Mapping[str, ParamValue] | None = None) -> JobIdentity:
        """The identity of the task as installed (its code digest does not depend on parameters) and the job's
        parameters; ``params`` must already have been validated against the task's schema."""
        code = task_code.compute(task)
        return cls(
            task.name,
            code.combined,
            task.schema.fingerprint(),
            code.version,
            code.task_code,
            code.training_code,
            canonical_json(params) if params else "",
        )

    def mismatch(self, decl: Declaration) -> str | None:
        """A message naming what differs between a site's declaration and the job, or None."""
        diffs = []
        if decl.task_name != self.task_name:
            diffs.append(f"task name: site runs {decl.task_name!r}, the job needs {self.task_name!r}")
        if decl.task_digest != self.task_digest:
            diffs.append(self._code_mismatch(decl))
        if decl.schema_fingerprint != self.schema_fingerprint:
            diffs.append(
                f"data schema: site declares {decl.schema_fingerprint[:19]}..., the job needs "
                f"{self.schema_fingerprint[:19]}... (the site's columns differ from the task's schema)"
            )
        return "; ".join(diffs) or None

    def _code_mismatch(self, decl: Declaration) -> str:
        """Which part of the task code digest differs (task or Cohort training code), with both sides' versions."""
        parts = []
        if decl.task_code_digest and decl.task_code_digest != self.task_code_digest:
            parts.append(
                f"task code differs: site runs {decl.task_name!r} version {decl.task_version!r} "
                f"({decl.task_code_digest[:19]}...), the job needs version {self.task_version!r} "
                f"({self.task_code_digest[:19]}...); install the job's task version at the site"
            )
        if decl.training_code_digest and decl.training_code_digest != self.training_code_digest:
            parts.append(
                f"Cohort training code differs: site runs Cohort {decl.software_version} "
                f"({decl.training_code_digest[:19]}...), the coordinator runs Cohort {VERSION} "
                f"({self.training_code_digest[:19]}...); install the coordinator's Cohort version at the site"
            )
        return "; ".join(parts) or (
            f"task code digest: site has {decl.task_digest[:19]}..., the job needs "
            f"{self.task_digest[:19]}... (install the same task version at the site)"
        )


@dataclass(eq=False)
class ActiveRound:
    number: int
    attempt: int
    base: EncodedTensors
    state: RoundState
    running: RunningSum
    deadline: float
    spool_dir: Path
    task: pb.TrainTask
    done: asyncio.Event = field(default_factory=asyncio.Event)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    outcome: CloseRound | None = None
    accepted: dict[str, str] = field(default_factory=dict)  # site -> update sha256
    weights: dict[str, float] = field(default_factory=dict)  # site -> its FedAvg weight (plaintext rounds)
    in_flight: set[str] = field(default_factory=set)
    loss_sum: float = 0.0
    weight_sum: int = 0
    secagg: SecAggRound | None = None
    clip_bits: list[int] = field(default_factory=list)  # adaptive clipping: +1 norm <= C, -1 above
    uploads_open: bool = True  # with secure aggregation, masked inputs are taken once the keys are shared


@dataclass(eq=False)
class Evaluation:
    number: int
    split: str
    version: str
    expected: set[str]
    reports: dict[str, tuple[int, float, float]] = field(default_factory=dict)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    enough: int | None = None  # over-selection: this many reports close the evaluation early
    scores: ScoreHistogram | None = None  # binary tasks: the sum of the sites' score histograms (common/metrics.py)

    def check_done(self) -> None:
        if self.expected <= set(self.reports) or (self.enough is not None and len(self.reports) >= self.enough):
            self.done.set()

    def aggregate(self) -> tuple[int, float, float]:
        n = sum(r[0] for r in self.reports.values())
        if n == 0:
            return 0, math.nan, math.nan
        loss = sum(r[0] * r[1] for r in self.reports.values()) / n
        acc = sum(r[0] * r[2] for r in self.reports.values()) / n
        return n, loss, acc

    def add_scores(self, histogram: ScoreHistogram) -> None:
        self.scores = histogram if self.scores is None else self.scores + histogram

    def score_metrics(self) -> dict[str, float]:
        """AUC-PR, recall at 1 % FPR, AUC-ROC of the summed histograms; {} when no site reported scores."""
        return imbalance_metrics(self.scores) if self.scores is not None else {}
