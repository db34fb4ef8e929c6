"""Per-site L2 clipping and adaptive clipping (Andrew, Thakkar, McMahan and Ramaswamy, NeurIPS 2021,
"Differentially Private Learning with Adaptive Clipping").

**Adaptive clipping.** Each round every site also reports whether its update norm was within the clip C. Sent as the
centred value ``+1`` (norm <= C) or ``-1`` (this is ``2 * (b - 1/2)`` for the paper's bit b), the count has
sensitivity 1 and is summed like any other coordinate -- under secure aggregation as one more integer lane. With noise
of std ``2 * sigma_b`` on that sum (the paper's std ``sigma_b`` on ``sum (b - 1/2)``), the coordinator estimates the
clipped fraction ``b_bar = (noised_sum / n + 1) / 2`` and updates geometrically::

    C <- C * exp(-eta_C * (b_bar - gamma))

(gamma: target quantile, e.g. 0.5 for the median norm).

**Privacy cost.** Releasing the update sum (sensitivity C, noise ``z_delta * C``) and the count (sensitivity 1/2 in
the paper's units, noise ``sigma_b``) together is one Gaussian mechanism with noise multiplier z where
``z**-2 = z_delta**-2 + (2 sigma_b)**-2`` (Andrew et al., Sec. 3). To spend the budget of a planned multiplier z,
noise the update with ``z_delta = (z**-2 - (2 sigma_b)**-2) ** -1/2`` (:func:`update_noise_multiplier`) and account
events with z.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from common.errors import ConfigError


def clip_l2(x: NDArray[np.floating], clip: float) -> tuple[NDArray[np.float64], float]:
    """``(x * min(1, clip / ||x||), ||x||)``: the update scaled into the L2 ball of radius ``clip``, and its norm
    before clipping (NaN or infinite values raise :class:`ConfigError`: they have no norm)."""
    if not (math.isfinite(clip) and clip > 0):
        raise ConfigError(f"privacy.l2_clip must be positive, got {clip!r}")
    v = np.asarray(x, dtype=np.float64)
    norm = float(np.linalg.norm(v))
    if not math.isfinite(norm):
        raise ConfigError("the update has NaN or infinite values; it cannot be clipped")
    if norm <= clip:
        return v.copy(), norm
    return v * (clip / norm), norm


def effective_noise_multiplier(update_noise_multiplier: float, count_noise_std: float) -> float:
    """z with ``z**-2 = z_delta**-2 + (2 sigma_b)**-2`` (Andrew et al. 2021): what the accountant is given."""
    return float((update_noise_multiplier**-2 + (2 * count_noise_std) ** -2) ** -0.5)


def update_noise_multiplier(target_noise_multiplier: float, count_noise_std: float) -> float:
    """``z_delta = (z**-2 - (2 sigma_b)**-2) ** -1/2``; :class:`ConfigError` when ``2 sigma_b <= z`` (the count
    alone would spend the whole budget)."""
    rest = target_noise_multiplier**-2 - (2 * count_noise_std) ** -2
    if rest <= 0:
        raise ConfigError(
            f"count noise {count_noise_std} is too small for noise multiplier {target_noise_multiplier}: "
            "need 2 * sigma_b > z"
        )
    return float(rest**-0.5)


@dataclass
class AdaptiveClip:
    """The coordinator's adaptive clip state (no I/O): ``clip`` is the current C."""

    clip: float
    target_quantile: float = 0.5
    learning_rate: float = 0.2
    count_noise_std: float = 10.0  # sigma_b, the paper's units (noise on sum(b - 1/2)); Andrew et al. use m/20

    def __post_init__(self) -> None:
        if not (self.clip > 0 and 0 <= self.target_quantile <= 1 and self.learning_rate > 0):
            raise ConfigError("adaptive clipping needs clip > 0, target quantile in [0, 1], learning rate > 0")
        if self.count_noise_std < 0:
            raise ConfigError("count noise std must be non-negative")

    @staticmethod
    def site_bit(norm: float, clip: float) -> int:
        """What a site adds to the count lane: +1 if its update norm was ``<= clip``, else -1."""
        return 1 if norm <= clip else -1

    @property
    def sum_noise_std(self) -> float:
        """Std of the noise to put on the sum of :meth:`site_bit` values: ``2 * sigma_b``."""
        return 2 * self.count_noise_std

    def update(self, noised_count_sum: float, n: int) -> float:
        """Take the noised sum of the ``n`` reporting sites' bits; set and return the new C."""
        if n < 1:
            raise ConfigError("adaptive clipping needs at least one reporting site")
        fraction = min(1.0, max(0.0, (noised_count_sum / n + 1) / 2))
        self.clip *= math.exp(-self.learning_rate * (fraction - self.target_quantile))
        return self.clip
