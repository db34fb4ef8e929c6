"""Privacy events and the accountant: epsilon(delta) of a job so far, and the noise a budget needs.

Every round appends a :class:`PrivacyEvent`; the :class:`Accountant` turns the list into epsilon for the job's delta
with Google's ``dp-accounting`` library. Events are plain JSON-able dicts so the coordinator can persist them and
rebuild the accountant after a restart (:meth:`Accountant.from_json` replays them).

**Units.** ``noise_multiplier`` sigma is the noise standard deviation over the L2 clip C of one site's update (add/
remove sensitivity of the clipped sum). Adjacency is *site level* (one site's data in or out).

**How each event is accounted** (never a silent fallback: what the library cannot do raises :class:`ConfigError`):

=====================  ============================================  ================================================
sampling               method="pld" (add/remove)                     method="rdp"
=====================  ============================================  ================================================
``full`` Gaussian      ``GaussianDpEvent(sigma)``; when every event   ``GaussianDpEvent(sigma)``
                       is a full Gaussian, the T-fold composition is
                       the Gaussian with ``(sum 1/sigma_i**2)**-1/2``
                       and epsilon is exact (``get_epsilon_gaussian``)
``poisson`` Gaussian   ``PoissonSampledDpEvent(q, Gaussian(sigma))``  same event, RDP accountant
``fixed`` Gaussian     not supported by the PLD accountant: error     ``SampledWithoutReplacementDpEvent(N, m,
                                                                       Gaussian(sigma / 2))``, REPLACE_ONE
``full`` Skellam       error (no PLD for Skellam)                     Agarwal et al. 2021 RDP (:mod:`.rdp`)
``poisson`` Skellam    error                                          Zhu & Wang 2019 Thm 6 over the Skellam curve
=====================  ============================================  ================================================

**Fixed cohorts.** A cohort of exactly m of N sites per round is sampling *without* replacement; Poisson amplification
does not apply to it. ``dp-accounting`` supports it only in its RDP accountant and only under replace-one adjacency
(Wang, Balle and Kasiviswanathan 2019, Thm 27), so ``fixed`` events need ``Accountant(method="rdp",
neighboring="replace_one")``. Under replace-one the clipped sum's L2 sensitivity is 2C, not C, so the library (whose
noise multiplier is std / sensitivity) is given ``sigma / 2``; likewise full-participation Gaussian events under
replace-one use ``sigma / 2`` and Skellam events doubled sensitivities. Poisson events need add/remove.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, cast, get_args

import dp_accounting
import numpy as np
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from common.errors import ConfigError
from common.privacy.rdp import F64Array, poisson_subsampled_rdp
from common.privacy.skellam import SkellamParams

Sampling = Literal["poisson", "full", "fixed"]
Mechanism = Literal["gaussian", "skellam"]
Method = Literal["pld", "rdp"]
Neighboring = Literal["add_remove", "replace_one"]

_NEIGHBORING = {
    "add_remove": dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
    "replace_one": dp_accounting.NeighboringRelation.REPLACE_ONE,
}


@dataclass(frozen=True)
class PrivacyEvent:
    """``count`` identical rounds of one mechanism.

    ``rate`` is the Poisson sampling probability q (``poisson``), ``m / N`` (``fixed``, with ``population`` = N),
    or 1 (``full``). ``skellam`` holds the round's Skellam parameters when ``mechanism == "skellam"``; their
    ``noise_multiplier`` is the one the event reports, but the accounting uses the exact variance and sensitivities.
    """

    mechanism: Mechanism
    noise_multiplier: float
    sampling: Sampling
    rate: float = 1.0
    count: int = 1
    skellam: SkellamParams | None = None
    population: int | None = None

    def __post_init__(self) -> None:
        if self.mechanism not in get_args(Mechanism):
            raise ConfigError(f"unknown DP mechanism {self.mechanism!r}")
        if self.sampling not in get_args(Sampling):
            raise ConfigError(f"unknown sampling {self.sampling!r}; use poisson, full or fixed")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise ConfigError(f"noise multiplier must be positive and finite, got {self.noise_multiplier!r}")
        if not 0.0 < self.rate <= 1.0:
            raise ConfigError(f"sampling rate must be in (0, 1], got {self.rate!r}")
        if self.count < 1:
            raise ConfigError(f"event count must be positive, got {self.count!r}")
        if self.sampling == "full" and self.rate != 1.0:
            raise ConfigError("full participation has rate 1")
        if self.mechanism == "skellam" and self.skellam is None:
            raise ConfigError("a Skellam event needs its SkellamParams")
        if self.sampling == "fixed":
            if self.population is None or self.population < 1:
                raise ConfigError("a fixed-cohort event needs the population size N")
            if abs(self.cohort * 1.0 / self.population - self.rate) > 1e-9 or self.cohort < 1:
                raise ConfigError(f"fixed cohort rate {self.rate} is not m/N for an integer m with N={self.population}")

    @property
    def cohort(self) -> int:
        """m for a fixed cohort: ``round(rate * N)``."""
        return round(self.rate * (self.population or 0))

    @classmethod
    def fixed_cohort(cls, noise_multiplier: float, cohort: int, population: int, count: int = 1) -> PrivacyEvent:
        """A Gaussian event for exactly ``cohort`` of ``population`` sites per round."""
        return cls("gaussian", noise_multiplier, "fixed", cohort / population, count, None, population)

    def to_dict(self) -> dict[str, Any]:
        return {
            "mechanism": self.mechanism,
            "noise_multiplier": self.noise_multiplier,
            "sampling": self.sampling,
            "rate": self.rate,
            "count": self.count,
            "skellam": None if self.skellam is None else self.skellam.to_dict(),
            "population": self.population,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrivacyEvent:
        known = {"mechanism", "noise_multiplier", "sampling", "rate", "count", "skellam", "population"}
        if not isinstance(data, dict) or set(data) - known:
            raise ConfigError(f"bad privacy event: {data!r}")
        sk = data.get("skellam")
        try:
            return cls(
                mechanism=data["mechanism"],
                noise_multiplier=float(data["noise_multiplier"]),
                sampling=data["sampling"],
                rate=float(data.get("rate", 1.0)),
                count=int(data.get("count", 1)),
                skellam=None if sk is None else SkellamParams.from_dict(sk),
                population=data.get("population"),
            )
        except KeyError as exc:
            raise ConfigError(f"privacy event lacks {exc}") from exc

    def _key(self) -> tuple[Any, ...]:
        return (self.mechanism, self.noise_multiplier, self.sampling, self.rate, self.skellam, self.population)


@dataclass
class Accountant:
    """epsilon(delta) of a sequence of :class:`PrivacyEvent` s (see the module docstring for the choices).

    ``compose`` checks the event against the method and adjacency at once, so an unsupported event is refused when
    it is added, not when epsilon is asked for.
    """

    method: Method
    delta: float
    neighboring: Neighboring = "add_remove"
    events: list[PrivacyEvent] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.method not in get_args(Method):
            raise ConfigError(f"privacy.accountant must be pld or rdp, got {self.method!r}")
        if self.neighboring not in _NEIGHBORING:
            raise ConfigError(f"privacy.neighboring must be add_remove or replace_one, got {self.neighboring!r}")
        if not 0.0 < self.delta < 1.0:
            raise ConfigError(f"privacy.delta must be in (0, 1), got {self.delta!r}")
        events, self.events = list(self.events), []
        for e in events:
            self.compose(e)

    def compose(self, event: PrivacyEvent) -> None:
        """Append ``event`` (checked: see the table in the module docstring)."""
        self._check(event)
        self.events.append(event)

    def _check(self, e: PrivacyEvent) -> None:
        if self.method == "pld" and e.mechanism == "skellam":
            raise ConfigError("the PLD accountant has no Skellam mechanism; use privacy.accountant = rdp")
        if e.sampling == "fixed":
            if self.method != "rdp" or self.neighboring != "replace_one":
                raise ConfigError(
                    "a fixed cohort (sampling without replacement) is accounted only by the RDP accountant under "
                    "replace-one adjacency; it is never treated as Poisson sampling"
                )
            if e.mechanism != "gaussian":
                raise ConfigError("fixed-cohort sampling is supported for the Gaussian mechanism only")
        if e.sampling == "poisson" and self.neighboring != "add_remove":
            raise ConfigError("Poisson sampling is accounted under add/remove adjacency")

    def _grouped(self) -> list[PrivacyEvent]:
        counts: dict[tuple[Any, ...], tuple[PrivacyEvent, int]] = {}
        for e in self.events:
            first, n = counts.get(e._key(), (e, 0))
            counts[e._key()] = (first, n + e.count)
        return [
            PrivacyEvent(f.mechanism, f.noise_multiplier, f.sampling, f.rate, n, f.skellam, f.population)
            for f, n in counts.values()
        ]

    def epsilon(self) -> float:
        """epsilon at ``delta`` for all events so far (0 with none)."""
        events = self._grouped()
        if not events:
            return 0.0
        if self.method == "pld":
            return self._pld_epsilon(events)
        return self._rdp_epsilon(events)

    def _half(self) -> float:
        return 2.0 if self.neighboring == "replace_one" else 1.0

    def _pld_epsilon(self, events: list[PrivacyEvent]) -> float:
        if all(e.sampling == "full" for e in events):  # exact: composed Gaussians are one Gaussian
            precision = sum(e.count / (e.noise_multiplier / self._half()) ** 2 for e in events)
            return float(dp_accounting.get_epsilon_gaussian(1.0 / math.sqrt(precision), self.delta))
        acc = pld_privacy_accountant.PLDAccountant(neighboring_relation=_NEIGHBORING["add_remove"])
        for e in events:
            acc.compose(_gaussian_dp_event(e, self._half()), e.count)
        return float(acc.get_epsilon(self.delta))

    def rdp_curve(self) -> tuple[F64Array, F64Array]:
        """(orders, total RDP) of all events (RDP method)."""
        acc = rdp_privacy_accountant.RdpAccountant(neighboring_relation=_NEIGHBORING[self.neighboring])
        extra = np.zeros(len(acc.orders), dtype=np.float64)
        for e in self._grouped():
            if e.mechanism == "gaussian":
                acc.compose(_gaussian_dp_event(e, self._half()), e.count)
            else:
                sk = cast(SkellamParams, e.skellam)

                def base(orders: F64Array, sk: SkellamParams = sk) -> F64Array:
                    return sk.rdp(orders, self.neighboring == "replace_one")

                rate = 1.0 if e.sampling == "full" else e.rate
                extra += e.count * poisson_subsampled_rdp(acc.orders, rate, base)
        return np.asarray(acc.orders, dtype=np.float64), np.asarray(acc.rdp, dtype=np.float64) + extra

    def _rdp_epsilon(self, events: list[PrivacyEvent]) -> float:
        orders, rdp = self.rdp_curve()
        eps, _ = rdp_privacy_accountant.compute_epsilon(orders, rdp, self.delta)
        return float(eps)

    def to_json(self) -> str:
        return json.dumps(
            {
                "method": self.method,
                "delta": self.delta,
                "neighboring": self.neighboring,
                "events": [e.to_dict() for e in self.events],
            }
        )

    @classmethod
    def from_json(cls, text: str) -> Accountant:
        try:
            data = json.loads(text)
            return cls(
                method=data["method"],
                delta=float(data["delta"]),
                neighboring=data.get("neighboring", "add_remove"),
                events=[PrivacyEvent.from_dict(e) for e in data["events"]],
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"bad accountant state: {exc}") from exc


def _gaussian_dp_event(e: PrivacyEvent, half: float) -> dp_accounting.DpEvent:
    """The dp-accounting event for a Gaussian round; ``half`` = 2 under replace-one (sensitivity 2C)."""
    sigma = e.noise_multiplier / half
    gaussian = dp_accounting.GaussianDpEvent(sigma)
    if e.sampling == "full":
        return gaussian
    if e.sampling == "poisson":
        return dp_accounting.PoissonSampledDpEvent(e.rate, gaussian)
    return dp_accounting.SampledWithoutReplacementDpEvent(e.population, e.cohort, gaussian)


def epsilon_for(
    noise_multiplier: float,
    delta: float,
    rounds: int,
    sampling: Sampling = "full",
    rate: float = 1.0,
    method: Method = "pld",
    population: int | None = None,
) -> float:
    """epsilon after ``rounds`` identical Gaussian rounds (fixed cohorts: RDP, replace-one, as documented above)."""
    if rounds < 1:
        raise ConfigError(f"rounds must be positive, got {rounds!r}")
    neighboring: Neighboring = "replace_one" if sampling == "fixed" else "add_remove"
    event = PrivacyEvent(
        "gaussian", noise_multiplier, sampling, 1.0 if sampling == "full" else rate, rounds, None, population
    )
    return Accountant(method, delta, neighboring, [event]).epsilon()


def plan_noise_multiplier(
    target_epsilon: float,
    delta: float,
    rounds: int,
    sampling: Sampling = "full",
    rate: float = 1.0,
    method: Method = "pld",
    population: int | None = None,
    *,
    max_sigma: float = 1e4,
) -> float:
    """The smallest sigma (to 1e-3 relative, rounded up) whose epsilon over ``rounds`` rounds is ``<= target``.

    Binary search: epsilon decreases in sigma. Raises :class:`ConfigError` when even ``max_sigma`` is not enough.
    """

    def eps(sigma: float) -> float:
        return epsilon_for(sigma, delta, rounds, sampling, rate, method, population)

    return smallest_noise_multiplier(eps, target_epsilon, max_sigma=max_sigma)


def smallest_noise_multiplier(eps: Callable[[float], float], target_epsilon: float, *, max_sigma: float = 1e4) -> float:
    """The smallest sigma (to 1e-3 relative, rounded up) with ``eps(sigma) <= target_epsilon``, for any accountant
    whose epsilon decreases in sigma (binary search). Raises :class:`ConfigError` when even ``max_sigma`` is not
    enough."""
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ConfigError(f"target epsilon must be positive, got {target_epsilon!r}")
    hi = 1.0
    while eps(hi) > target_epsilon:
        hi *= 2
        if hi > max_sigma:
            raise ConfigError(f"no noise multiplier up to {max_sigma} reaches epsilon {target_epsilon}")
    lo = hi / 2
    while eps(lo) <= target_epsilon:
        hi, lo = lo, lo / 2
        if lo < 1e-4:
            return hi
    while hi - lo > 1e-3 * hi:
        mid = (lo + hi) / 2
        if eps(mid) <= target_epsilon:
            hi = mid
        else:
            lo = mid
    return hi
