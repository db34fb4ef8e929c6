"""RDP curves that ``dp-accounting`` does not have: the Skellam mechanism and generic Poisson subsampling.

**Skellam.** Agarwal, Kairouz and Liu, "The Skellam Mechanism for Differentially Private Federated Learning"
(NeurIPS 2021, arXiv:2110.04995), Theorem 3.5 (multi-dimensional Skellam, RDP). Written there for noise
``Sk(mu, mu)`` per coordinate (variance ``2 mu``); restated here with ``V`` = the total noise *variance* per
coordinate (``V = 2 mu``), for an integer-valued query whose values on neighbouring inputs differ by a vector with
``||.||_1 <= D1`` and ``||.||_2 <= D2``::

    eps(alpha) <= alpha * D2**2 / (2 V) + min( ((2 alpha - 1) * D2**2 + 6 * D1) / (4 V**2),  3 * D1 / (2 V) )

The first term is the Gaussian mechanism's RDP with the same variance; the second vanishes as ``V`` grows (more
scale / more bits), so Skellam converges to the Gaussian. :func:`skellam_rdp` implements exactly this; a test checks it
against the exact Renyi divergence of a shifted one-dimensional Skellam.

**Poisson subsampling of a general mechanism.** Zhu and Wang, "Poisson Subsampled Renyi Differential Privacy"
(ICML 2019), Theorem 6 (general upper bound), for integer ``alpha >= 2``, sampling rate ``g`` and base RDP ``e(.)``::

    eps'(alpha) <= 1/(alpha-1) * log( (1-g)**(alpha-1) * (alpha*g - g + 1)
                                      + C(alpha,2) * g**2 * (1-g)**(alpha-2) * exp(e(2))
                                      + 3 * sum_{l=3..alpha} C(alpha,l) * (1-g)**(alpha-l) * g**l * exp((l-1) e(l)) )

It holds under add/remove adjacency for any base mechanism; non-integer orders get ``inf`` (they are then simply not
used by the RDP -> (eps, delta) conversion, which minimises over orders).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
from numpy.typing import NDArray
from scipy.special import gammaln, logsumexp

F64Array = NDArray[np.float64]


def skellam_rdp(orders: Sequence[float] | F64Array, variance: float, l1: float, l2: float) -> F64Array:
    """RDP of the Skellam mechanism at ``orders`` (Agarwal et al. 2021, Thm 3.5; see the module docstring).

    ``variance`` is the total Skellam noise variance per coordinate (sum over the sites' shares), ``l1``/``l2`` the
    L1/L2 sensitivities of the integer vector the noise is added to, in the same integer units.
    """
    a = np.asarray(orders, dtype=np.float64)
    if variance <= 0:
        return np.full_like(a, np.inf)
    gauss = a * l2**2 / (2 * variance)
    extra = np.minimum(((2 * a - 1) * l2**2 + 6 * l1) / (4 * variance**2), 3 * l1 / (2 * variance))
    return np.asarray(gauss + extra, dtype=np.float64)


def _log_comb(n: int, k: NDArray[np.int64]) -> F64Array:
    return np.asarray(gammaln(n + 1) - gammaln(k + 1) - gammaln(n - k + 1), dtype=np.float64)


def poisson_subsampled_rdp(
    orders: Sequence[float] | F64Array, q: float, base: Callable[[F64Array], F64Array]
) -> F64Array:
    """RDP of the Poisson-subsampled mechanism whose RDP curve is ``base`` (Zhu & Wang 2019, Thm 6).

    ``base`` maps an array of integer orders to the base mechanism's RDP at those orders. Orders that are not
    integers >= 2 get ``inf``.
    """
    a = np.asarray(orders, dtype=np.float64)
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"sampling rate must be in [0, 1], got {q!r}")
    if q == 1.0:
        return np.asarray(base(a), dtype=np.float64)
    out = np.full_like(a, np.inf)
    if q == 0.0:
        return np.zeros_like(a)
    lq, l1q = math.log(q), math.log1p(-q)
    ints = sorted({int(x) for x in a if x >= 2 and float(x).is_integer()})
    if not ints:
        return out
    eps_base = np.asarray(base(np.arange(2, ints[-1] + 1, dtype=np.float64)), dtype=np.float64)  # e(2), e(3), ...
    for alpha in ints:
        terms = [(alpha - 1) * l1q + math.log(alpha * q - q + 1)]
        terms.append(float(_log_comb(alpha, np.array([2]))[0]) + 2 * lq + (alpha - 2) * l1q + float(eps_base[0]))
        if alpha >= 3:
            ls = np.arange(3, alpha + 1, dtype=np.int64)
            rest = math.log(3) + _log_comb(alpha, ls) + (alpha - ls) * l1q + ls * lq + (ls - 1) * eps_base[ls - 2]
            terms.extend(rest.tolist())
        out[a == alpha] = float(logsumexp(terms)) / (alpha - 1)
    return out
