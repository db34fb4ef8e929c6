"""Asynchronous rounds (FedBuff) with secure aggregation: each buffer of K updates is one secure sum over the sites
that filled it. Plain data and pure rules, no I/O; :class:`coordinator.round.machine.JobMachine` applies them.

How a buffer fills (docs/ARCHITECTURE.md, "FedBuff with secure aggregation"):

1. Every idle site gets a *buffered* train task on the newest model (round n, attempt a). It trains, keeps its
   (clipped) update and says so with ``SecAggMessage.ready`` (the model version it trained on). Nothing leaves it.
2. The coordinator queues ready sites in arrival order. While no instance runs and at least K = ``buffer_size`` are
   queued, the first K form one SecAgg+ instance (round n, attempt a): each is sent the instance's setup with the
   model version it trained on and its staleness weight ``(1 + s)^-staleness_exponent`` for s = n - (its task's
   round). The site multiplies its FedAvg weight by it *before* encoding and masking, so the unmasked sum is already
   staleness-weighted, and the weight lane sums the weights: the coordinator's weighted mean is the FedBuff mean.
   The weights are public (the coordinator knows every version); the updates are not.
3. Sites that become ready while an instance runs wait for the next buffer. A queued update older than
   ``max_staleness`` versions is dropped and its site trains again on the newest model.
4. Dropouts inside an instance are SecAgg+'s as in synchronous rounds; an instance that fails fails the attempt, and
   the retry takes the sites still queued (the failed instance's sites train again). A coordinator restart abandons
   the queue and any instance in flight (their keys died with it): every site trains again (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from common.proto.cohort.v1 import cohort_pb2 as pb
from coordinator.strategy.config import StrategyConfig


@dataclass(frozen=True)
class Held:
    """An update a site keeps for the next buffer: the task it trained (round, attempt) and that task's model."""

    number: int
    attempt: int
    version: str


@dataclass
class Buffer:
    """Who holds a buffered update (``ready``, in arrival order) and who is in the running instance (``members``)."""

    size: int  # K: updates per buffer (one secure instance)
    max_staleness: int
    ready: dict[str, Held] = field(default_factory=dict)
    members: dict[str, Held] = field(default_factory=dict)

    def holds(self, site: str) -> bool:
        """The site has trained and waits (queued, or masking into the running instance): send it no new task."""
        return site in self.ready or site in self.members

    def refusal(
        self, site: str, held: Held, task: tuple[int, int] | None, versions: dict[int, str], current: int
    ) -> str | None:
        """Why a ready announcement is not taken (None: queue it). ``task`` is the buffered task the site holds."""
        if site in self.ready or site in self.members:
            return f"site {site!r} already holds an update for a buffer"
        if task != (held.number, held.attempt):
            return f"site {site!r} holds no buffered task for round {held.number} attempt {held.attempt}"
        if versions.get(held.number) != held.version:
            return "the update was computed against another model version than its task named"
        if current - held.number > self.max_staleness:
            return self.too_old(held, current)
        return None

    def too_old(self, held: Held, current: int) -> str:
        return (
            f"update is {current - held.number} model versions old (trained for round {held.number}, the model is "
            f"at round {current}); strategy.max_staleness is {self.max_staleness}: the site trains again"
        )

    def stale(self, current: int) -> list[str]:
        """Drop queued updates grown older than max_staleness; their sites (to train again)."""
        old = [s for s, h in self.ready.items() if current - h.number > self.max_staleness]
        for site in old:
            del self.ready[site]
        return old

    def take(self) -> dict[str, Held] | None:
        """The next instance's sites, the first K queued, or None while fewer are queued or an instance runs."""
        if self.members or len(self.ready) < self.size:
            return None
        chosen = list(self.ready)[: self.size]
        self.members = {s: self.ready.pop(s) for s in chosen}
        return dict(self.members)

    def forget(self, site: str) -> None:
        """The site's session ended: its kept update is gone with it (a restarted daemon holds nothing)."""
        self.ready.pop(site, None)

    def instance_over(self) -> None:
        self.members = {}


def staleness_of(held: Held, current: int) -> int:
    return current - held.number


def instance_task(
    base: pb.TrainTask, setup: pb.SecAggSetup, held: Held, current: int, strategy: StrategyConfig, deadline: float
) -> pb.TrainTask:
    """What one site of a buffer's instance is sent: the instance (round, attempt, SecAgg setup, deadline), the model
    version its kept update was trained on, and its public staleness weight."""
    task = pb.TrainTask()
    task.CopyFrom(base)
    task.buffered = True
    task.model_version = held.version
    task.deadline_unix = deadline
    task.staleness_weight = strategy.staleness_weight(staleness_of(held, current))
    task.secagg.CopyFrom(setup)
    return task
