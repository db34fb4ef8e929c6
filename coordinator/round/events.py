"""The vocabulary of the job's state machine (:mod:`coordinator.round.machine`): states, events in, actions out.

Events say what happened (a site connected, an upload was verified, the clock passed a deadline); every event carries
``now`` (seconds since the epoch, the coordinator's clock) because the machine has no clock of its own. Actions say
what the runner (:mod:`coordinator.round.runner`) must do: send a work item, write a record, aggregate, finish the
job. The runner executes actions in order and feeds back what they produced (``Aggregated``). No event or action
does I/O itself.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from common.proto.cohort.v1 import cohort_pb2 as pb
from coordinator.state.registry import Declaration


class JobState(enum.StrEnum):
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    STOPPED = "stopped"
    BUDGET_EXHAUSTED = "budget_exhausted"
    INTERRUPTED = "interrupted"  # a graceful shutdown: the job resumes at the next start


class Phase(enum.StrEnum):
    """Where the job is; at most one round attempt or evaluation is open at a time."""

    STARTING = "starting"  # before Start
    WAITING = "waiting"  # for enough eligible sites before a round starts
    TRAINING = "training"  # a round attempt is open (with secure aggregation: key stages, then masked inputs)
    UNMASKING = "unmasking"  # secure aggregation: consistency check and unmasking after the inputs
    AGGREGATING = "aggregating"  # the runner computes and saves the new model
    EVALUATING = "evaluating"  # a federated evaluation (val after a round, test at the end) is open
    DONE = "done"


class RoundOutcome(enum.StrEnum):
    OPEN = "open"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


# -- events ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Start:
    now: float


@dataclass(frozen=True)
class Tick:
    """The clock reached (or passed) the time :meth:`JobMachine.wake_at` asked for."""

    now: float


@dataclass(frozen=True)
class SiteConnected:
    site: str
    declaration: Declaration
    now: float


@dataclass(frozen=True)
class SiteDisconnected:
    site: str
    now: float


@dataclass(frozen=True)
class UploadStarted:
    """A site opened an upload stream; its header is decoded (``specs`` from the manifest)."""

    site: str
    header: pb.UpdateHeader
    specs: tuple[Any, ...]
    now: float


@dataclass(frozen=True)
class UploadAbandoned:
    """An upload stream that :class:`UploadStarted` admitted ended without being verified."""

    site: str
    number: int
    attempt: int


@dataclass(frozen=True)
class UploadVerified:
    """An admitted upload arrived whole: size, digest and value checks passed, it is spooled (plaintext) or folded
    into the secure sum (masked)."""

    site: str
    header: pb.UpdateHeader
    now: float


@dataclass(frozen=True)
class SecAggReceived:
    site: str
    message: pb.SecAggMessage
    now: float


@dataclass(frozen=True)
class Declined:
    site: str
    request: pb.DeclineRequest
    now: float


@dataclass(frozen=True)
class EvaluationReceived:
    site: str
    report: pb.EvaluationReport
    now: float


@dataclass(frozen=True)
class StopRequested:
    reason: str
    now: float


@dataclass(frozen=True)
class Suspend:
    """Graceful shutdown: leave the job resumable."""

    reason: str


@dataclass(frozen=True)
class Aggregated:
    """The runner computed and saved the new global model for the open round attempt.

    Under secure aggregation ``totals`` are the metadata lanes' sums (sample count, loss and accuracy sums, steps)
    and ``evidence`` names sites whose revealed shares contradicted their commitments."""

    number: int
    attempt: int
    model_version: str
    seconds: float
    now: float
    totals: dict[str, float] | None = None
    evidence: tuple[str, ...] = ()
    optimizer: dict[str, object] = field(default_factory=dict)  # the server optimizer's new step and moments file
    report: dict[str, object] = field(default_factory=dict)  # robust aggregation: clipped sites, Krum's choice


@dataclass(frozen=True)
class ClearSuspension:
    """An admin lets a suspended site take part in the job's rounds again."""

    site: str
    admin: str


@dataclass(frozen=True)
class AggregationFailed:
    number: int
    attempt: int
    reason: str
    now: float


@dataclass(frozen=True)
class Crashed:
    """The runner hit an unexpected error; the job fails with ``detail`` (the traceback is in the log)."""

    detail: str


Event = (
    Start
    | Tick
    | SiteConnected
    | SiteDisconnected
    | UploadStarted
    | UploadAbandoned
    | UploadVerified
    | SecAggReceived
    | Declined
    | EvaluationReceived
    | StopRequested
    | Suspend
    | Aggregated
    | AggregationFailed
    | Crashed
    | ClearSuspension
)


# -- actions ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Send:
    site: str
    item: pb.WorkItem


@dataclass(frozen=True)
class Broadcast:
    """Send to every connected site (the end of the job)."""

    item: pb.WorkItem


@dataclass(frozen=True)
class RecordRoundStart:
    number: int
    attempt: int
    cohort: tuple[str, ...]
    base_version: str


@dataclass(frozen=True)
class RecordUpload:
    number: int
    attempt: int
    site: str
    sha256: str
    num_samples: int
    metrics: dict[str, float]
    train_seconds: float


@dataclass(frozen=True)
class AckDuplicate:
    """The same update was already accepted: answer the site, change nothing."""

    sha256: str


@dataclass(frozen=True)
class Aggregate:
    """Compute the new global model for an attempt whose inputs are in (a plaintext fold of the spooled updates with
    ``weights``, or the unmasked secure sum), save it, and feed back :class:`Aggregated`."""

    number: int
    attempt: int
    secure: bool
    weights: dict[str, float] = field(default_factory=dict)  # plaintext: site -> FedAvg weight, folded in site order
    central_noise: bool = False  # site-level DP without secure aggregation: add N(0, (sigma C)^2) to the sum
    denominator: float = 0.0  # central DP: the fixed, public denominator (the round's target cohort size)


@dataclass(frozen=True)
class CommitRound:
    """The commit point: the round row, the job's model and its privacy state in one transaction."""

    number: int
    attempt: int
    reported: tuple[str, ...]
    model_version: str
    train_loss: float | None
    train_samples: int
    timings: dict[str, float]
    detail: str
    epsilon: float
    privacy_state: dict[str, object]
    site_epsilon: dict[str, float]
    strategy_state: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class FailRound:
    number: int
    attempt: int
    reported: tuple[str, ...]
    reason: str
    timings: dict[str, float]


@dataclass(frozen=True)
class RecordEvaluation:
    number: int
    split: str
    site: str
    model_version: str
    num_samples: int
    loss: float
    accuracy: float


@dataclass(frozen=True)
class SetRoundEvaluation:
    number: int
    attempt: int
    loss: float
    accuracy: float
    num_samples: int
    metrics: dict[str, float] = field(default_factory=dict)  # federated imbalance metrics (common/metrics.py)


@dataclass(frozen=True)
class UpdateJob:
    fields: dict[str, Any]


@dataclass(frozen=True)
class Audit:
    kind: str
    fields: dict[str, Any]
    actor: str = "coordinator"


@dataclass(frozen=True)
class Progress:
    line: str


@dataclass(frozen=True)
class Failpoint:
    """A named crash point for the crash-recovery tests (common/failpoints.py)."""

    name: str
    number: int


@dataclass(frozen=True)
class FinishJob:
    state: JobState
    detail: str


Action = (
    Send
    | Broadcast
    | RecordRoundStart
    | RecordUpload
    | AckDuplicate
    | Aggregate
    | CommitRound
    | FailRound
    | RecordEvaluation
    | SetRoundEvaluation
    | UpdateJob
    | Audit
    | Progress
    | Failpoint
    | FinishJob
)
