"""The close rule of one round attempt's uploads (plaintext uploads, or a secure round's masked inputs).

:class:`RoundState` decides when the collection closes (everyone still connected reported, the over-selection target
was reached, too many dropped out, the deadline passed, a stop) and whether it succeeded. Pure: events in, a verdict
out; the job's state machine (coordinator/round/machine.py) owns it.
"""

from __future__ import annotations

import enum
from collections import Counter
from dataclasses import dataclass, field


class RoundPhase(enum.Enum):
    TRAINING = "training"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


@dataclass(frozen=True)
class UploadAccepted:
    site: str


@dataclass(frozen=True)
class SiteLost:
    """``site`` will not report; ``cause`` says why when it is known (e.g. "declined: <the site's reason>")."""

    site: str
    cause: str = ""


@dataclass(frozen=True)
class SiteBack:
    site: str


@dataclass(frozen=True)
class DeadlinePassed:
    pass


@dataclass(frozen=True)
class Stop:
    reason: str


RoundEvent = UploadAccepted | SiteLost | SiteBack | DeadlinePassed | Stop


@dataclass(frozen=True)
class CloseRound:
    succeeded: bool
    reason: str


@dataclass
class RoundState:
    """When one attempt's collection of uploads closes, and whether it succeeded."""

    cohort: frozenset[str]
    min_sites: int
    # Over-selection: the round closes as soon as ``target`` sites have reported (None: wait for the whole cohort,
    # up to the deadline). The cohort is then larger than the target, so stragglers do not hold the round.
    target: int | None = None
    phase: RoundPhase = RoundPhase.TRAINING
    reported: set[str] = field(default_factory=set)
    lost: set[str] = field(default_factory=set)
    causes: dict[str, str] = field(default_factory=dict)  # lost site -> why, when known

    def __post_init__(self) -> None:
        if not 1 <= self.min_sites <= len(self.cohort):
            raise ValueError("min_sites must be between 1 and the cohort size")
        if self.target is not None and not self.min_sites <= self.target <= len(self.cohort):
            raise ValueError("the over-selection target must be between min_sites and the cohort size")

    @property
    def open(self) -> bool:
        return self.phase is RoundPhase.TRAINING

    def refusal(self, site: str) -> str | None:
        """Why an upload from ``site`` cannot be taken now, or None when it can."""
        if site not in self.cohort:
            return f"site {site!r} is not in this round's cohort"
        if not self.open:
            return f"the round is already closed ({self.phase.value})"
        if site in self.reported:
            return f"site {site!r} already reported in this round"
        return None

    def handle(self, event: RoundEvent) -> list[CloseRound]:
        if not self.open:
            return []
        if isinstance(event, UploadAccepted):
            if self.refusal(event.site) is not None:
                raise ValueError(f"upload from {event.site!r} was not acceptable: {self.refusal(event.site)}")
            self.reported.add(event.site)
            self.lost.discard(event.site)
            self.causes.pop(event.site, None)
        elif isinstance(event, SiteLost):
            if event.site in self.cohort and event.site not in self.reported:
                self.lost.add(event.site)
                if event.cause:
                    self.causes[event.site] = event.cause
        elif isinstance(event, SiteBack):
            self.lost.discard(event.site)
            self.causes.pop(event.site, None)
        elif isinstance(event, DeadlinePassed):
            if len(self.reported) >= self.min_sites:
                return self._close(True, f"deadline passed with {len(self.reported)} of {len(self.cohort)} sites")
            return self._close(
                False,
                f"deadline passed with {len(self.reported)} uploads; the round needs {self.min_sites}{self._why()}",
            )
        elif isinstance(event, Stop):
            return self._close(False, event.reason)
        return self._progress()

    def _progress(self) -> list[CloseRound]:
        if self.target is not None and len(self.reported) >= self.target:
            return self._close(
                True, f"{len(self.reported)} of {len(self.cohort)} sites reported (target {self.target})"
            )
        pending = self.cohort - self.reported - self.lost
        if pending:
            if len(self.reported) + len(pending) < self.min_sites:
                return self._close(
                    False,
                    f"too many sites dropped out: at most "
                    f"{len(self.reported) + len(pending)} of {self.min_sites} can report{self._why()}",
                )
            return []
        # Everyone still connected has reported.
        if len(self.reported) >= self.min_sites:
            return self._close(True, f"{len(self.reported)} of {len(self.cohort)} sites reported")
        return self._close(
            False, f"only {len(self.reported)} sites reported; the round needs {self.min_sites}{self._why()}"
        )

    def _why(self) -> str:
        """How many of the cohort were lost, and for the known causes how many each (most frequent first)."""
        counts = Counter(self.causes[s] for s in self.lost if s in self.causes)
        if not counts:
            return ""
        parts = [f"{n} {'site' if n == 1 else 'sites'} {cause}" for cause, n in counts.most_common(3)]
        if len(counts) > 3:
            parts.append(f"{sum(n for _, n in counts.most_common()[3:])} for other reasons")
        unknown = len(self.lost) - sum(counts.values())
        if unknown:
            parts.append(f"{unknown} disconnected or did not answer")
        return f" ({len(self.lost)} of {len(self.cohort)} lost: {'; '.join(parts)})"

    def _close(self, ok: bool, reason: str) -> list[CloseRound]:
        self.phase = RoundPhase.SUCCEEDED if ok else RoundPhase.FAILED
        return [CloseRound(ok, reason)]
