"""The job machine's records: what it is given (:class:`JobSetup`), the open round attempt and the open evaluation.

Plain data; the rules that change them are in :mod:`coordinator.round.machine`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from cryptography import x509

from common.metrics import ScoreHistogram, imbalance_metrics
from common.proto.cohort.v1 import cohort_pb2 as pb
from common.serde import Spec
from coordinator.config import JobConfig
from coordinator.round.identity import JobIdentity
from coordinator.round.rules import RoundState
from coordinator.round.secagg import SecAggRound
from coordinator.round.secure_sum import SecureSum


@dataclass(frozen=True)
class JobSetup:
    """What the machine is given and never changes."""

    job_id: str
    spec: JobConfig
    identity: JobIdentity
    specs: tuple[Spec, ...]  # the model's tensors: the shape of a plaintext update
    population: int  # sites on the allow-list
    ca_certs: tuple[x509.Certificate, ...] = ()
    task_name: str = ""
    report_scores: bool = False  # a binary task that reports score histograms (common/metrics.py)


@dataclass(frozen=True)
class Report:
    """An accepted upload as the round counts it (under secure aggregation: its digest only)."""

    sha256: str
    num_samples: int
    metrics: dict[str, float]


@dataclass(eq=False)
class RoundAttempt:
    number: int
    attempt: int
    cohort: frozenset[str]  # the sites asked to train
    task: pb.TrainTask
    started: float
    deadline: float  # the whole round, unmasking included
    upload_deadline: float  # uploads (secure aggregation keeps the end of the round for unmasking)
    plain: RoundState | None = None  # without secure aggregation: when the uploads close
    secure: SecureSum | None = None  # with it: the instance (key stages, masked inputs, unmasking)
    reopened: bool = False  # continued after a coordinator restart
    reported: dict[str, Report] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)  # site -> its FedAvg weight (plaintext rounds)
    in_flight: set[str] = field(default_factory=set)
    loss_sum: float = 0.0
    weight_sum: int = 0
    clip_bits: list[int] = field(default_factory=list)  # adaptive clipping: +1 norm <= C, -1 above
    close_reason: str = ""

    @property
    def state(self) -> RoundState:
        """The close rule of the uploads (under secure aggregation: of the masked inputs; its cohort is U2)."""
        if self.secure is not None:
            return self.secure.inputs
        assert self.plain is not None
        return self.plain

    @property
    def secagg(self) -> SecAggRound | None:
        return self.secure.sa if self.secure is not None else None

    @property
    def uploads_open(self) -> bool:
        return self.secure is None or self.secure.uploads_open

    @property
    def base_version(self) -> str:
        return self.task.model_version

    @property
    def accepted(self) -> dict[str, str]:
        """site -> digest of its accepted update."""
        return {site: r.sha256 for site, r in self.reported.items()}


@dataclass(eq=False)
class Evaluation:
    number: int
    attempt: int  # of the round whose model is evaluated (0 for the final test evaluation)
    split: str
    version: str
    expected: set[str]
    deadline: float
    started: float
    reports: dict[str, tuple[int, float, float]] = field(default_factory=dict)
    enough: int | None = None  # over-selection: this many reports close the evaluation early
    secure: SecureSum | None = None  # under secure aggregation: the results are summed, never seen per site
    instance: int = 0  # the secure instance (a new one after a coordinator restart)
    totals: tuple[int, float, float] | None = None  # the secure sum's result
    in_flight: set[str] = field(default_factory=set)
    inputs: set[str] = field(default_factory=set)  # secure: sites whose masked input is in the sum
    # Binary tasks: the sum of the sites' score histograms (plain: of the reports that carried one; secure: from
    # the score lanes), for AUC-PR and recall at 1 % FPR; None when no site sent one.
    scores: ScoreHistogram | None = None
    scored: set[str] = field(default_factory=set)  # plain: the sites whose histogram is in ``scores``

    def add_scores(self, site: str, histogram: ScoreHistogram) -> None:
        self.scores = histogram if self.scores is None else self.scores + histogram
        self.scored.add(site)

    def score_metrics(self) -> dict[str, float]:
        """AUC-PR, recall at 1 % FPR, AUC-ROC of the summed histograms; {} unless they count every evaluated record
        (e.g. a report restored after a restart carries none)."""
        n = self.aggregate()[0]
        if self.scores is None or n == 0 or sum(self.scores.flat()) != n:
            return {}
        return imbalance_metrics(self.scores)

    @property
    def done(self) -> bool:
        if self.secure is not None:
            return self.totals is not None
        return self.expected <= set(self.reports) or (self.enough is not None and len(self.reports) >= self.enough)

    def aggregate(self) -> tuple[int, float, float]:
        """Sample-weighted loss and accuracy (n = 0: nothing reported)."""
        if self.totals is not None:
            return self.totals
        n = sum(r[0] for r in self.reports.values())
        if n == 0:
            return 0, math.nan, math.nan
        loss = sum(r[0] * r[1] for r in self.reports.values()) / n
        acc = sum(r[0] * r[2] for r in self.reports.values()) / n
        return n, loss, acc
