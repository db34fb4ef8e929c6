"""A site's own record-level privacy budget: epsilon(delta) over all its DP-SGD steps, kept on disk.

Record-level DP protects each record (a patient, a transaction) of this site. Every round of local training with
``TrainSettings.record_dp`` is ``steps`` DP-SGD steps, each a Poisson-subsampled Gaussian mechanism: records are
sampled independently with probability ``sample_rate``, each one's gradient is clipped to norm C, and Gaussian noise
of standard deviation ``noise_multiplier * C`` is added to their sum. :class:`SiteBudget` composes these as
``PoissonSampledDpEvent(sample_rate, GaussianDpEvent(noise_multiplier))`` repeated ``steps`` times in
``dp-accounting``'s RDP accountant under add/remove-one adjacency: the same analysis as Opacus's own RDP
accountant (Mironov, Talwar and Zhang 2019), with the same conversion to (epsilon, delta) (Balle et al. 2020).

The budget belongs to the site, not to the coordinator: the site refuses to train when one more round would take
its epsilon past its own target, whatever the job asks. The events are written to ``state_path`` after every round
(owner-only, atomically: temp file, fsync, rename), and read back when the participant starts, so a restart never
forgets what was spent. An unreadable state file is an error, never a fresh budget; so is one that group or others may
write (or that lies in a folder they may write), since whoever can write it can reset the budget.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import dp_accounting
from dp_accounting.rdp import rdp_privacy_accountant

from common import files
from common.errors import ConfigError

# dp-accounting's default RDP orders: 1.1 to 10.9 by 0.1, 11 to 63, and 128 to 1024. A superset of Opacus's
# defaults apart from order 11 and the large orders, which only make epsilon tighter (it is a minimum over orders).
ORDERS: tuple[float, ...] = tuple(rdp_privacy_accountant.DEFAULT_RDP_ORDERS)
STATE_VERSION = 1
WHAT = "privacy.state_file"
WHAT_DIR = "privacy.state_file's directory"


@dataclass(frozen=True)
class LocalTraining:
    """One round of DP-SGD at this site: ``steps`` Poisson-sampled Gaussian steps."""

    steps: int
    sample_rate: float
    noise_multiplier: float

    def check(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"steps must be an integer >= 0, got {self.steps!r}")
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate!r}")
        if not 0 <= self.noise_multiplier < math.inf:
            raise ValueError(f"noise_multiplier must be a finite number >= 0, got {self.noise_multiplier!r}")

    def dp_event(self) -> dp_accounting.DpEvent:
        step = dp_accounting.PoissonSampledDpEvent(
            self.sample_rate, dp_accounting.GaussianDpEvent(self.noise_multiplier)
        )
        return dp_accounting.SelfComposedDpEvent(step, self.steps)


def planned_training(num_samples: int, batch_size: int, local_epochs: int) -> LocalTraining:
    """The steps and sampling rate a round of DP-SGD will use, known before it runs (noise multiplier left 0).

    Mirrors Opacus (``DPDataLoader.from_data_loader``): ``sample_rate = 1 / ceil(n / batch_size)`` and
    ``int(1 / sample_rate)`` steps per epoch, computed the same way so the float rounding agrees too.
    """
    if num_samples < 1 or batch_size < 1 or local_epochs < 1:
        raise ValueError("num_samples, batch_size and local_epochs must all be at least 1")
    sample_rate = 1 / math.ceil(num_samples / batch_size)
    return LocalTraining(steps=local_epochs * int(1 / sample_rate), sample_rate=sample_rate, noise_multiplier=0.0)


def _accountant(events: list[LocalTraining]) -> rdp_privacy_accountant.RdpAccountant:
    accountant = rdp_privacy_accountant.RdpAccountant(list(ORDERS))
    for event in events:
        if event.steps:
            accountant.compose(event.dp_event())
    return accountant


def epsilon_of(events: list[LocalTraining], delta: float) -> float:
    """Epsilon at ``delta`` of the composition of ``events`` (RDP accountant, add/remove-one, :data:`ORDERS`)."""
    return float(_accountant(events).get_epsilon(delta))


class SiteBudget:
    """The record-level privacy this site has spent, against its own target epsilon at ``delta``.

    With a ``state_path``, the events already recorded there are loaded now (a missing file is an empty budget) and
    every :meth:`record` rewrites it. ``state_path=None`` keeps the budget in memory only (tests, simulations).
    """

    def __init__(self, target_epsilon: float, delta: float, state_path: Path | None = None) -> None:
        if not 0 < target_epsilon < math.inf:
            raise ValueError(f"target_epsilon must be a positive number, got {target_epsilon!r}")
        if not 0 < delta < 1:
            raise ValueError(f"delta must be between 0 and 1 (exclusive), got {delta!r}")
        self.target_epsilon = target_epsilon
        self.delta = delta
        self.state_path = state_path
        self._events: list[LocalTraining] = load_events(state_path) if state_path is not None else []
        # Kept composed, so a check costs one event's RDP curve, not a replay of every round.
        self._accountant = _accountant(self._events)

    @property
    def events(self) -> tuple[LocalTraining, ...]:
        return tuple(self._events)

    @property
    def steps(self) -> int:
        """DP-SGD steps spent so far, over all rounds."""
        return sum(e.steps for e in self._events)

    def epsilon(self) -> float:
        """Epsilon at this budget's delta spent so far (0.0 before any step)."""
        return float(self._accountant.get_epsilon(self.delta))

    def epsilon_after(self, steps: int, sample_rate: float, noise_multiplier: float) -> float:
        """Epsilon if one more round of ``steps`` steps at ``sample_rate`` and ``noise_multiplier`` were spent."""
        event = LocalTraining(steps, sample_rate, noise_multiplier)
        event.check()
        trial = copy.deepcopy(self._accountant)
        if event.steps:
            trial.compose(event.dp_event())
        return float(trial.get_epsilon(self.delta))

    def would_exceed(self, steps: int, sample_rate: float, noise_multiplier: float) -> bool:
        """True when that round would take epsilon past the target: the site must not train it."""
        return self.epsilon_after(steps, sample_rate, noise_multiplier) > self.target_epsilon

    def record(self, steps: int, sample_rate: float, noise_multiplier: float) -> float:
        """Add a round of local training that has run, persist it, and return epsilon so far.

        Recorded even when it passes the target (training already spent it); callers check :meth:`would_exceed`
        before training.
        """
        event = LocalTraining(steps, sample_rate, noise_multiplier)
        event.check()
        events = [*self._events, event]
        if self.state_path is not None:
            save_events(self.state_path, events)  # on disk first: a crash after training must not forget it
        self._events = events
        if event.steps:
            self._accountant.compose(event.dp_event())
        return self.epsilon()


def save_events(path: Path, events: list[LocalTraining]) -> None:
    """Write ``events`` as JSON, owner-only and atomically (:func:`common.files.write_atomic`)."""
    files.private_dir(path.parent, WHAT_DIR, tighten=False)
    text = json.dumps({"version": STATE_VERSION, "events": [asdict(e) for e in events]}, indent=1)
    files.write_atomic(path, (text + "\n").encode())


def load_events(path: Path) -> list[LocalTraining]:
    """The events saved at ``path``; ``[]`` when it does not exist. Raises ConfigError when it cannot be trusted."""
    # Whoever can write the ledger or its folder can reset this site's budget: refuse that, never trust it.
    files.check_not_shared(path.parent, WHAT_DIR)
    files.private_file(path, WHAT)
    if not path.exists():
        return []
    try:
        data: Any = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"privacy.state_file: {path} is unreadable ({exc}); refusing to reset the budget") from None
    if not isinstance(data, dict) or data.get("version") != STATE_VERSION or not isinstance(data.get("events"), list):
        raise ConfigError(f"privacy.state_file: {path} is not a version-{STATE_VERSION} privacy ledger")
    events: list[LocalTraining] = []
    for i, item in enumerate(data["events"]):
        try:
            if not isinstance(item, dict) or set(item) != {"steps", "sample_rate", "noise_multiplier"}:
                raise ValueError("expected steps, sample_rate and noise_multiplier")
            event = LocalTraining(item["steps"], _number(item["sample_rate"]), _number(item["noise_multiplier"]))
            event.check()
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"privacy.state_file: {path}: event {i}: {exc}") from None
        events.append(event)
    return events


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected a number, got {value!r}")
    return float(value)
