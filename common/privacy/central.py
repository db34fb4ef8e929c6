"""Central DP (the mode without secure aggregation): the coordinator noises the sum of clipped updates.

``sum + N(0, (sigma * C)**2)`` per coordinate: the Gaussian mechanism on a sum whose add/remove L2 sensitivity is C.
The normal draws come from numpy's PCG64 seeded with 128 bits of OS entropy (never a fixed or 32-bit seed). Known
limit: floating-point Gaussian sampling leaks a little through the low-order bits (Mironov 2012); the distributed
mode (:mod:`.skellam`) uses integer noise, which does not have that problem.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray

from common.errors import ConfigError
from common.privacy.randomness import generator_or_secure


def add_gaussian_noise(
    sum_vec: NDArray[np.floating], sigma: float, clip: float, rng: np.random.Generator | None = None
) -> NDArray[np.float64]:
    """``sum_vec`` plus independent ``N(0, (sigma * clip)**2)`` per coordinate (a new array)."""
    if not (math.isfinite(sigma) and sigma >= 0 and math.isfinite(clip) and clip > 0):
        raise ConfigError(f"need sigma >= 0 and clip > 0, got {sigma!r} and {clip!r}")
    v = np.asarray(sum_vec, dtype=np.float64)
    return v + generator_or_secure(rng).normal(0.0, sigma * clip, size=v.shape)
