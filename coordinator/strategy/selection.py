"""Who trains in a round: the cohort of ``size`` sites drawn from the eligible ones.

- ``random``: a uniform sample, seeded by job, round and attempt (reproducible; not a secret: which sites train is
  visible to them anyway).
- ``round_robin``: coverage: the sites selected least often so far go first (ties broken by a seeded shuffle), so
  over R rounds every eligible site is selected ``floor(R k / N)`` or ``ceil(R k / N)`` times.
- ``availability``: sites that recently delivered are preferred: each site's weight is
  ``(on_time + 1) / (selected + 2)`` over its last ``availability_window`` selections (a site never tried counts as
  1/2), and the cohort is a weighted sample without replacement, so a slow site is still tried now and then.

What each policy remembers (:class:`Participation`: per site, its recent selections and whether each delivered) is
saved with every committed round and restored on resume, so a restarted job selects as the uninterrupted one would.
It holds site names and outcomes that the coordinator learns anyway, never anything about a site's data.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from coordinator.strategy.config import StrategyConfig


@dataclass
class Participation:
    """Per site: how often it was selected, and its recent outcomes (1: delivered in time, 0: did not), newest last."""

    selected: dict[str, int] = field(default_factory=dict)
    recent: dict[str, list[int]] = field(default_factory=dict)

    def record(self, cohort: Iterable[str], delivered: Iterable[str], window: int) -> None:
        done = set(delivered)
        for site in cohort:
            self.selected[site] = self.selected.get(site, 0) + 1
            history = [*self.recent.get(site, []), int(site in done)][-window:]
            self.recent[site] = history

    def weight(self, site: str) -> float:
        history = self.recent.get(site, [])
        return (sum(history) + 1) / (len(history) + 2)

    def to_json(self) -> dict[str, object]:
        return {"selected": dict(sorted(self.selected.items())), "recent": dict(sorted(self.recent.items()))}

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> Participation:
        selected = dict(data.get("selected", {}))  # type: ignore[call-overload]
        recent = dict(data.get("recent", {}))  # type: ignore[call-overload]
        return cls(
            {str(k): int(v) for k, v in selected.items()},
            {str(k): [int(x) for x in v] for k, v in recent.items()},
        )


def select(cfg: StrategyConfig, eligible: list[str], size: int, seed: str, participation: Participation) -> list[str]:
    """``size`` of the ``eligible`` sites (sorted), by the job's selection policy."""
    size = min(size, len(eligible))
    rng = random.Random(seed)  # noqa: S311 - reproducible, not secret
    if cfg.selection == "random" or size == len(eligible):
        return sorted(rng.sample(eligible, size))
    if cfg.selection == "round_robin":
        order = list(eligible)
        rng.shuffle(order)
        order.sort(key=lambda s: participation.selected.get(s, 0))  # stable: the shuffle breaks ties
        return sorted(order[:size])
    return sorted(_weighted_sample(rng, eligible, [participation.weight(s) for s in eligible], size))


def _weighted_sample(rng: random.Random, items: list[str], weights: list[float], size: int) -> list[str]:
    """Weighted sampling without replacement (Efraimidis and Spirakis 2006): the ``size`` largest ``u^(1/w)``."""
    keyed = sorted(((rng.random() ** (1.0 / w), item) for item, w in zip(items, weights, strict=True)), reverse=True)
    return [item for _, item in keyed[:size]]
