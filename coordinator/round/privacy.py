"""The job's differential-privacy state on the coordinator: the accountant, the budget, and reported epsilons.

Site-level DP (DP-FedAvg): one privacy event per completed round, accounted as what the cohort draw is: every
allowed site every round ("full"), or a fixed-size cohort drawn from the allow-list ("fixed", replace-one
adjacency; never treated as Poisson). The job is refused when its whole plan exceeds the budget, and stopped before
a round whose event would exceed it. Events are kept in the round records, so the epsilon survives a restart.

Record-level DP: each site runs DP-SGD and owns its budget (it refuses to train past it); the coordinator only
collects the epsilon each site reports with its upload and shows the largest.
"""

from __future__ import annotations

import math

import numpy as np

from common.errors import FailedPrecondition
from common.privacy.accounting import Accountant, PrivacyEvent
from common.privacy.clipping import AdaptiveClip, update_noise_multiplier
from common.privacy.randomness import secure_generator
from common.privacy.skellam import SkellamParams
from coordinator.config import PrivacyConfig, SecureAggregationConfig


class JobPrivacy:
    def __init__(
        self,
        cfg: PrivacyConfig,
        population: int,
        fraction: float = 1.0,
        *,
        secure_aggregation: SecureAggregationConfig | None = None,
        min_survivors: int = 1,
        model_numel: int = 0,
    ) -> None:
        self.cfg = cfg
        self.population = population
        # Site-level DP under secure aggregation: each site adds its share of Skellam noise in the integer domain
        # (distributed DP), calibrated to the minimum number of survivors a round accepts; accounted by RDP.
        self.secagg = secure_aggregation if secure_aggregation is not None and secure_aggregation.enabled else None
        self.min_survivors = min_survivors
        self.model_numel = model_numel
        # Every round takes every available site: no amplification by sampling is claimed ("full", which is
        # conservative when some sites are offline). A random fixed-size cohort is sampling without replacement,
        # accounted with replace-one adjacency in the RDP accountant.
        self.fixed = fraction < 1.0
        self.accountant = self._new_accountant()
        self.site_epsilon: dict[str, float] = {}
        self.adaptive: AdaptiveClip | None = None
        if cfg.unit == "site" and cfg.adaptive_clipping:
            self.adaptive = AdaptiveClip(
                cfg.clip_norm, cfg.target_quantile, cfg.clip_learning_rate, cfg.count_noise_std
            )

    @property
    def clip_norm(self) -> float:
        """This round's L2 bound C (it moves with adaptive clipping)."""
        return self.adaptive.clip if self.adaptive is not None else self.cfg.clip_norm

    @property
    def update_noise_multiplier(self) -> float:
        """The sigma applied to the update sum: all of it, or with adaptive clipping what the count leaves."""
        if self.adaptive is None:
            return self.cfg.noise_multiplier
        return update_noise_multiplier(self.cfg.noise_multiplier, self.cfg.count_noise_std)

    def adapt_clip(self, bits: list[int]) -> float:
        """Adaptive clipping after a round: noise the sum of the sites' bits, move C; returns the new C."""
        assert self.adaptive is not None
        noised = float(sum(bits)) + float(secure_generator().normal(0.0, self.adaptive.sum_noise_std))
        return self.adaptive.update(noised, len(bits))

    def _new_accountant(self) -> Accountant:
        if self.fixed:
            return Accountant("rdp", self.cfg.delta, "replace_one")
        if self.distributed:
            return Accountant("rdp", self.cfg.delta)
        return Accountant(self.cfg.accountant, self.cfg.delta)

    @property
    def distributed(self) -> bool:
        return self.cfg.unit == "site" and self.secagg is not None

    def skellam(self, cohort_size: int) -> SkellamParams:
        assert self.secagg is not None
        return SkellamParams.choose(
            l2_clip=self.cfg.clip_norm,
            noise_multiplier=self.cfg.noise_multiplier,
            dim=max(1, self.model_numel),
            min_survivors=min(self.min_survivors, cohort_size),
            max_n=cohort_size,
            bits=self.secagg.bits,
        )

    @property
    def unit(self) -> str:
        return self.cfg.unit

    @property
    def site_level(self) -> bool:
        return self.cfg.unit == "site"

    def event(self, cohort_size: int, count: int = 1) -> PrivacyEvent:
        sigma = self.cfg.noise_multiplier
        if self.distributed and self.model_numel > 0:
            return PrivacyEvent("skellam", sigma, "full", 1.0, count, self.skellam(cohort_size))
        if self.fixed and cohort_size < self.population:
            return PrivacyEvent.fixed_cohort(sigma, cohort_size, self.population, count=count)
        if self.fixed:  # the whole population was drawn: no sampling, but keep the accountant's adjacency
            return PrivacyEvent.fixed_cohort(sigma, self.population, self.population, count=count)
        return PrivacyEvent("gaussian", sigma, "full", 1.0, count)

    def plan_epsilon(self, rounds: int, cohort_size: int) -> float:
        if not self.site_level:
            return 0.0
        plan = self._new_accountant()
        plan.compose(self.event(cohort_size, rounds))
        return plan.epsilon()

    def check_plan(self, rounds: int, cohort_size: int) -> None:
        """Refuse a job whose plan exceeds its budget (site level)."""
        if not self.site_level or self.cfg.target_epsilon <= 0 or not self.cfg.refuse_over_budget:
            return
        try:
            eps = self.plan_epsilon(rounds, cohort_size)
        except (ArithmeticError, ValueError) as exc:
            raise FailedPrecondition(
                f"the accountant cannot evaluate this privacy plan ({type(exc).__name__}: {exc}); check "
                "noise_multiplier, delta and the number of rounds"
            ) from None
        if eps > self.cfg.target_epsilon:
            raise FailedPrecondition(
                f"the job's privacy plan spends epsilon {eps:.3f} over {rounds} rounds (delta {self.cfg.delta:g}), "
                f"more than its budget of {self.cfg.target_epsilon:g}; use fewer rounds or a larger noise multiplier "
                "(see `cohort privacy plan`)"
            )

    def would_exceed(self, cohort_size: int) -> float | None:
        """The epsilon the next round would reach, when that passes the budget; else None."""
        if not self.site_level or self.cfg.target_epsilon <= 0:
            return None
        trial = Accountant.from_json(self.accountant.to_json())
        trial.compose(self.event(cohort_size))
        eps = trial.epsilon()
        return eps if eps > self.cfg.target_epsilon else None

    def record_round(self, cohort_size: int) -> float:
        if self.site_level:
            self.accountant.compose(self.event(cohort_size))
        return self.epsilon()

    def state(self) -> dict[str, object]:
        """What a restart needs to continue exactly: the accountant's events, the adaptive C, the sites' epsilons."""
        return {
            "accountant": self.accountant.to_json(),
            "clip_norm": self.adaptive.clip if self.adaptive is not None else None,
            "site_epsilon": dict(self.site_epsilon),
        }

    def restore(self, state: dict[str, object]) -> None:
        """Continue from :meth:`state` (a job resumed after a coordinator restart)."""
        accountant = state.get("accountant")
        if isinstance(accountant, str):
            self.accountant = Accountant.from_json(accountant)
        clip = state.get("clip_norm")
        if self.adaptive is not None and isinstance(clip, int | float):
            self.adaptive.clip = float(clip)
        sites = state.get("site_epsilon")
        if isinstance(sites, dict):
            self.site_epsilon = {str(k): float(v) for k, v in sites.items()}

    def record_site(self, site: str, epsilon: float) -> None:
        if math.isfinite(epsilon) and epsilon >= 0:
            self.site_epsilon[site] = max(epsilon, self.site_epsilon.get(site, 0.0))

    def epsilon(self) -> float:
        if self.site_level:
            return float(self.accountant.epsilon()) if self.accountant.events else 0.0
        return max(self.site_epsilon.values(), default=0.0)

    def central_noise(self, dim: int) -> np.ndarray:
        """Central DP: Gaussian noise of std sigma * C per coordinate for the sum, from OS entropy."""
        from common.privacy.central import add_gaussian_noise

        noise: np.ndarray = add_gaussian_noise(np.zeros(dim), self.update_noise_multiplier, self.clip_norm)
        return noise
