"""One secure-aggregation instance as the job's state machine drives it: the key stages, the masked inputs and the
unmasking stages, each closed when everyone it waits for answered or at its deadline. No I/O and no clock.

A training round under secure aggregation is one instance (inputs: the encoded update plus metadata lanes); so is
each evaluation under secure aggregation (inputs: the evaluation's lanes only). The owner (the machine) passes every
site message, dropout, accepted masked input and clock tick in, with a ``send`` function that delivers a work item
to a connected site (False when the site is gone), and acts on the :class:`Done` that comes out: ``ok`` means the
unmasking stages finished and :meth:`SecAggRound.finish` can compute the sum of the survivors' inputs.

Dropouts at any stage are expected: a site that stops answering, goes away, declines or *aborts* the instance
(it says it found tampering) is left behind, and the instance goes on while the survivors still meet the threshold
(Bonawitz et al.'s U1 ⊇ U2 ⊇ U3 ⊇ U4). Only what the coordinator itself establishes fails it: too few sites left
for the threshold, too few inputs for ``min_inputs``, or a reconstruction that contradicts a site's commitments.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

from common.errors import FailedPrecondition
from common.proto.cohort.v1 import cohort_pb2 as pb
from common.secagg.errors import SecAggAborted
from common.secagg.server import ServerStage
from coordinator.round.rules import DeadlinePassed, RoundState, SiteLost, Stop, UploadAccepted
from coordinator.round.secagg import SecAggRound

Send = Callable[[str, pb.WorkItem], bool]


class SumStage(enum.StrEnum):
    KEYS = "keys"  # 0 advertise, 1 share keys
    INPUTS = "inputs"  # 2 masked inputs
    UNMASK = "unmask"  # 3 consistency check, 4 unmask
    DONE = "done"


@dataclass(frozen=True)
class Done:
    ok: bool
    reason: str


@dataclass(eq=False)
class SecureSum:
    sa: SecAggRound
    min_inputs: int
    target: int | None
    upload_deadline: float  # masked inputs are taken until then
    deadline: float  # the unmasking stages end by then
    stage_timeout: float
    now: float
    stage: SumStage = SumStage.KEYS
    stage_deadline: float | None = None
    inputs: RoundState = field(init=False)
    aborted: dict[str, str] = field(default_factory=dict)  # site -> the reason it gave
    close_reason: str = ""

    def __post_init__(self) -> None:
        cohort = frozenset(self.sa.params.cohort)
        self.inputs = RoundState(cohort, min(self.min_inputs, len(cohort)), self._target(cohort))
        self.stage_deadline = self.now + self._timeout(self.upload_deadline, self.now, stages_left=3)

    def _target(self, members: frozenset[str]) -> int | None:
        if self.target is None:
            return None
        low = min(self.min_inputs, len(members))
        return max(low, min(self.target, len(members)))

    def _timeout(self, deadline: float, now: float, stages_left: int = 1) -> float:
        """A stage waits at most stage_timeout, never past ``deadline``, and leaves the stages after it their share
        of the time that is left (a site that hangs in one stage must not starve the next)."""
        return max(0.0, min(self.stage_timeout, (deadline - now) / stages_left))

    @property
    def uploads_open(self) -> bool:
        return self.stage is SumStage.INPUTS

    def wake_at(self) -> float | None:
        times = [self.stage_deadline] if self.stage_deadline is not None else []
        if self.stage is SumStage.INPUTS:
            times.append(self.upload_deadline)
        return min(times, default=None)

    # -- what happens -----------------------------------------------------------------------------------------
    def receive(self, site: str, msg: pb.SecAggMessage, now: float, send: Send) -> Done | None:
        """A site's message for a key or unmasking stage (refusals raise before anything changes)."""
        if site in self.aborted:
            raise FailedPrecondition(f"site {site!r} aborted this secure-aggregation round; it takes no further part")
        if self.stage not in (SumStage.KEYS, SumStage.UNMASK):
            raise FailedPrecondition(f"the secure-aggregation round is at stage {self.stage.value}")
        self.sa.receive(site, msg)
        if msg.WhichOneof("stage") == "abort_reason":
            self.aborted[site] = msg.abort_reason[:500]
            return self.lost(site, now, send, "aborted the secure aggregation")
        return self.advance(now, send)

    def lost(self, site: str, now: float, send: Send, cause: str = "") -> Done | None:
        """``site`` is gone (disconnected, declined, aborted): a dropout of whatever stage is open; ``cause`` is why,
        when known (a failed round's reason counts the causes)."""
        self.sa.site_lost(site)
        if self.stage in (SumStage.KEYS, SumStage.INPUTS) and self.inputs.open:
            for close in self.inputs.handle(SiteLost(site, cause)):
                return self._inputs_closed(close.succeeded, close.reason, now, send)
        return self.advance(now, send)

    def input_accepted(self, site: str, now: float, send: Send) -> Done | None:
        """``site``'s masked input is folded into the sum."""
        for close in self.inputs.handle(UploadAccepted(site)):
            return self._inputs_closed(close.succeeded, close.reason, now, send)
        return None

    def advance(self, now: float, send: Send) -> Done | None:
        """Close whatever stage is complete or due, and open the next."""
        try:
            return self._advance(now, send)
        except SecAggAborted as exc:
            return self._end(False, f"secure aggregation: {exc}")

    def stop(self, reason: str) -> Done:
        return self._end(False, reason)

    # -- stage transitions ------------------------------------------------------------------------------------
    def _route(self, items: dict[str, pb.WorkItem], send: Send) -> None:
        for site, item in items.items():
            if not send(site, item):
                self.sa.site_lost(site)

    def _due(self, now: float) -> bool:
        return self.stage_deadline is not None and now >= self.stage_deadline

    def _advance(self, now: float, send: Send) -> Done | None:
        server, sa = self.sa.server, self.sa
        if self.stage is SumStage.KEYS:
            if server.stage is ServerStage.ADVERTISE and (sa.stage_complete or self._due(now)):
                self._route(sa.close_advertise(), send)
                self.stage_deadline = now + self._timeout(self.upload_deadline, now, stages_left=2)
            if server.stage is ServerStage.SHARE_KEYS and (sa.stage_complete or self._due(now)):
                self._route(sa.close_share_keys(), send)
                return self._open_inputs(now, send)
            return None
        if self.stage is SumStage.INPUTS:
            if now >= self.upload_deadline:
                for close in self.inputs.handle(DeadlinePassed()):
                    return self._inputs_closed(close.succeeded, close.reason, now, send)
            return None
        if self.stage is SumStage.UNMASK:
            if server.stage is ServerStage.CONSISTENCY and (sa.stage_complete or self._due(now)):
                self._route(sa.close_consistency(), send)
                self.stage_deadline = now + self._timeout(self.deadline, now)
            if server.stage is ServerStage.UNMASK and (sa.stage_complete or self._due(now)):
                return self._end(True, self.close_reason)
        return None

    def _open_inputs(self, now: float, send: Send) -> Done | None:
        """After the key stages only the sites that shared their keys (U2) may send a masked input."""
        u2 = self.sa.u2
        if len(u2) < self.min_inputs:
            return self._end(False, f"only {len(u2)} sites shared their keys; the round needs {self.min_inputs}")
        old = self.inputs
        self.inputs = RoundState(frozenset(u2), min(self.min_inputs, len(u2)), self._target(frozenset(u2)))
        self.stage, self.stage_deadline = SumStage.INPUTS, None
        for site in sorted(old.lost & u2):  # sites lost during the key stages may already decide the round
            for close in self.inputs.handle(SiteLost(site, old.causes.get(site, ""))):
                return self._inputs_closed(close.succeeded, close.reason, now, send)
        return None

    def _inputs_closed(self, ok: bool, reason: str, now: float, send: Send) -> Done | None:
        if not ok:
            return self._end(False, reason)
        self.close_reason = reason
        self.stage = SumStage.UNMASK
        try:
            self._route(self.sa.close_masked_input(), send)
        except SecAggAborted as exc:
            return self._end(False, f"secure aggregation: {exc}")
        self.stage_deadline = now + self._timeout(self.deadline, now, stages_left=2)
        return self.advance(now, send)

    def _end(self, ok: bool, reason: str) -> Done:
        self.stage, self.stage_deadline = SumStage.DONE, None
        if self.inputs.open:
            self.inputs.handle(Stop(reason))
        return Done(ok, reason)
