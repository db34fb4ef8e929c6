"""The ``job.strategy`` section: how a round's cohort is chosen and how its aggregate becomes the next global model.

Three independent choices, each validated here and carried out in one module of this package:

- ``name``, the server optimizer (:mod:`coordinator.strategy.server_opt`): ``fedavg`` applies the round's mean update
  (times ``server_lr``); ``fedavgm`` adds server momentum (Hsu et al. 2019); ``fedadam``, ``fedyogi`` and
  ``fedadagrad`` are the adaptive optimizers of Reddi et al. 2021 ("Adaptive Federated Optimization", Algorithm 2).
- ``aggregation``, how the sites' updates become one update (:mod:`coordinator.strategy.robust`): the weighted
  ``mean`` (FedAvg), or a rule that tolerates malicious sites: coordinate-wise ``median``, ``trimmed_mean``, ``krum``
  or ``multi_krum``. ``norm_bound`` (any rule) scales each update down to that L2 norm first.
- ``selection``, who trains (:mod:`coordinator.strategy.selection`): a seeded ``random`` fraction, ``round_robin``
  coverage, or ``availability``-aware sampling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from common.errors import ConfigError

ServerOptimizer = Literal["fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad"]
AggregationRule = Literal["mean", "median", "trimmed_mean", "krum", "multi_krum"]
Selection = Literal["random", "round_robin", "availability"]
Mode = Literal["sync", "async"]

ADAPTIVE = ("fedadam", "fedyogi", "fedadagrad")
ORDER_STATISTICS = ("median", "trimmed_mean", "krum", "multi_krum")


@dataclass(frozen=True)
class StrategyConfig:
    name: ServerOptimizer = "fedavg"
    # Server learning rate eta; None: 1.0 for fedavg and fedavgm, 0.1 for the adaptive optimizers.
    server_lr: float | None = None
    server_momentum: float = 0.9  # fedavgm: beta
    beta1: float = 0.9  # adaptive: first-moment decay
    beta2: float = 0.99  # fedadam and fedyogi: second-moment decay
    tau: float = 1e-3  # adaptive: degree of adaptivity (v starts at tau^2)
    aggregation: AggregationRule = "mean"
    trim_fraction: float = 0.1  # trimmed_mean: share cut from each end, per coordinate
    byzantine_sites: int = 1  # krum and multi_krum: f, the malicious sites to tolerate
    multi_krum_keep: int = 0  # multi_krum: updates averaged (0: n - f)
    norm_bound: float = 0.0  # scale each update to at most this L2 norm before aggregating (0: off)
    selection: Selection = "random"
    availability_window: int = 10  # availability: how many of a site's recent selections count
    # Asynchronous rounds (FedBuff, Nguyen et al. 2022): every idle site trains on the newest model; a new model is
    # made as soon as ``buffer_size`` updates are in (0: job.min_sites), each weighted by (1 + s)^-staleness_exponent
    # for an update s versions old; older than ``max_staleness`` versions is refused. With secure aggregation each
    # buffer is one secure-aggregation instance over the sites that filled it (coordinator/round/buffered.py).
    mode: Mode = "sync"
    buffer_size: int = 0
    max_staleness: int = 4
    staleness_exponent: float = 0.5

    @property
    def learning_rate(self) -> float:
        if self.server_lr is not None:
            return self.server_lr
        return 0.1 if self.name in ADAPTIVE else 1.0

    @property
    def stateful(self) -> bool:
        """Whether the optimizer keeps model-sized state between rounds (moments)."""
        return self.name != "fedavg"

    def check(self, path: str) -> None:
        where = path or "strategy"
        if self.server_lr is not None and not 0 < self.server_lr <= 100:
            raise ConfigError(f"{where}.server_lr: must be > 0 and <= 100")
        if not 0 <= self.server_momentum < 1:
            raise ConfigError(f"{where}.server_momentum: must be in [0, 1)")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError(f"{where}.beta1 and beta2: must be in [0, 1)")
        if not 0 < self.tau <= 1:
            raise ConfigError(f"{where}.tau: must be in (0, 1]")
        if not 0 <= self.trim_fraction < 0.5:
            raise ConfigError(f"{where}.trim_fraction: must be in [0, 0.5)")
        if not 0 <= self.byzantine_sites <= 1000 or self.multi_krum_keep < 0:
            raise ConfigError(f"{where}.byzantine_sites: must be between 0 and 1000; multi_krum_keep >= 0")
        if self.norm_bound < 0:
            raise ConfigError(f"{where}.norm_bound: must be >= 0 (0: off)")
        if not 1 <= self.availability_window <= 10_000:
            raise ConfigError(f"{where}.availability_window: must be between 1 and 10000")
        if self.buffer_size < 0 or not 0 <= self.max_staleness <= 1000 or not 0 <= self.staleness_exponent <= 10:
            raise ConfigError(
                f"{where}: buffer_size must be >= 0 (0: min_sites), max_staleness between 0 and 1000, "
                "staleness_exponent between 0 and 10"
            )

    def staleness_weight(self, staleness: int) -> float:
        """FedBuff's down-weighting of an update ``staleness`` model versions old."""
        return float((1 + staleness) ** -self.staleness_exponent)

    def min_sites_needed(self) -> int:
        """The fewest updates the aggregation rule is defined for."""
        if self.aggregation in ("krum", "multi_krum"):
            return 2 * self.byzantine_sites + 3  # Blanchard et al. 2017: n > 2f + 2
        return 1

    def check_with(self, where: str, *, min_sites: int, secure: bool, site_dp: bool) -> None:
        """Combinations with the rest of the job that cannot work, refused with what to change."""
        rule = self.aggregation
        if rule in ORDER_STATISTICS and secure:
            raise ConfigError(
                f"{where}.aggregation: {rule} needs each site's own update, which secure aggregation hides from the "
                "coordinator; use aggregation: mean (with norm_bound to limit any one site) or turn "
                "secure_aggregation off"
            )
        if rule in ORDER_STATISTICS and site_dp:
            raise ConfigError(
                f"{where}.aggregation: {rule} with site-level differential privacy is not supported: the noise is "
                "calibrated to the mean of clipped updates (privacy.clip_norm already bounds every site); use "
                "aggregation: mean"
            )
        if self.mode == "async":
            if secure and self.buffer_size == 1:
                raise ConfigError(
                    f"{where}.buffer_size: with secure aggregation each buffer is one secure sum over the sites that "
                    "filled it, and a sum of one update is that update; use buffer_size >= 2 (and >= job.min_sites)"
                )
            if site_dp:
                raise ConfigError(
                    f"{where}.mode: asynchronous rounds with site-level differential privacy are not accounted "
                    "(the accountant assumes one sampled cohort per round); use mode: sync, or record-level DP"
                )
            if self.buffer_size and self.buffer_size < min_sites:
                raise ConfigError(
                    f"{where}.buffer_size: {self.buffer_size} is below job.min_sites ({min_sites}); a buffer closes "
                    "with at least min_sites updates"
                )
        if self.norm_bound > 0 and site_dp:
            raise ConfigError(
                f"{where}.norm_bound: with site-level differential privacy every update is already clipped to "
                "privacy.clip_norm; leave norm_bound at 0"
            )
        if rule in ("krum", "multi_krum") and min_sites < self.min_sites_needed():
            raise ConfigError(
                f"{where}.aggregation: {rule} tolerating {self.byzantine_sites} malicious sites needs at least "
                f"{self.min_sites_needed()} updates per round (2f + 3); raise job.min_sites to "
                f"{self.min_sites_needed()} or lower {where}.byzantine_sites"
            )
        if rule == "multi_krum" and self.multi_krum_keep > max(1, min_sites - self.byzantine_sites):
            raise ConfigError(
                f"{where}.multi_krum_keep: {self.multi_krum_keep} is more than the n - f = "
                f"{min_sites - self.byzantine_sites} updates a round of job.min_sites is sure to keep"
            )
