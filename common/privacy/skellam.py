"""Distributed DP under secure aggregation: the Skellam mechanism (Agarwal, Kairouz and Liu, NeurIPS 2021).

Each site clips its update to L2 norm ``C`` (:mod:`.clipping`), rotates it with the round's public randomized
Hadamard transform (:mod:`.rotation`: spreads the mass so no coordinate is spiky), encodes it with
:func:`common.secagg.encoding.encode` under :meth:`SkellamParams.encoding` (scale, stochastic rounding, mod 2**b), and
adds integer noise ``Sk(mu_i/2, mu_i/2) = Poisson(mu_i/2) - Poisson(mu_i/2)`` (variance ``mu_i``) before masking.
The coordinator only ever sees the masked, then the noised, sum: a sum of independent Skellams is Skellam with the
summed variance, so the aggregate carries ``n * mu_i`` of integer noise for n survivors, exactly, with no floating-point
sampling (the floating-point attack on naive Gaussian sampling does not apply to integer noise).

**Calibration to the minimum number of survivors.** The rotated, scaled vector has L2 norm ``<= C * scale``; the
encoder's rounding moves each coordinate by less than one unit, so the integer vector has (worst case, independent
stochastic rounding as in :func:`~common.secagg.encoding.encode`; no conditional rounding)::

    D2 = C * scale + sqrt(d_pad)        (L2 sensitivity, add/remove; doubled for replace-one)
    D1 = min(sqrt(d_pad) * D2, D2**2)   (L1: Cauchy-Schwarz, and |k| <= k**2 for integers)

Each site's variance is ``mu_i = (sigma * D2)**2 / min_survivors``, so any set of at least ``min_survivors`` sites adds
total variance ``>= (sigma * D2)**2 >= (sigma * C * scale)**2``: in float units after decoding, ``>= (sigma * C)**2``
per coordinate for every number of dropouts the round tolerates. The protected site's own share is counted in that sum
(as in the paper); a deployment that does not want to rely on it sets ``min_survivors`` one lower. The RDP of the
aggregate is :func:`common.privacy.rdp.skellam_rdp` with ``V = min_survivors * mu_i`` (fewer shares never happen: the
round aborts below ``min_survivors``; more shares only add noise).

**Ring and wrap-around ("modular clipping").** Values live mod ``2**bits``. The encoder bounds each site's signal by
``|q| <= L`` (``levels``), and the noise of n sites is a Skellam of variance ``V_n = n * mu_i``. By the Chernoff bound
for Skellam (log-MGF ``V (cosh t - 1)``)::

    P(|X| >= t) <= 2 * exp(-(t * asinh(t / V) - sqrt(V**2 + t**2) + V))

we choose the per-site ``headroom`` h as the smallest integer with ``d_pad * P(|X_n| >= n * h) <= wrap_probability``
for every n in [min_survivors, max_n]. Then ``max_n * (L + h) < 2**(bits-1)`` (checked by
:class:`~common.secagg.encoding.EncodingParams`) means the centred sum is exact except with probability at most
``wrap_probability`` per round; when the tail event happens the sum wraps mod ``2**bits`` (that garbles utility for the
round, never privacy: wrapping is post-processing of the noised sum). ``levels`` is the largest L that leaves room for
its own headroom (``h`` grows with L through ``D2``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from common.errors import ConfigError
from common.privacy.randomness import generator_or_secure
from common.privacy.rdp import F64Array, skellam_rdp
from common.privacy.rotation import padded_length, rotate, unrotate
from common.secagg.encoding import EncodingParams, decode_sum, encode
from common.secagg.prg import U32Array, check_bits

DEFAULT_WRAP_PROBABILITY = 1e-10


@dataclass(frozen=True)
class SkellamParams:
    """Public parameters of one round's Skellam mechanism (they go into the round's task).

    ``levels`` (L) and ``headroom`` feed :class:`EncodingParams` (clip = ``l2_clip``); ``scale = levels / l2_clip``;
    ``per_site_mu`` is the variance of each site's noise ``Sk(mu/2, mu/2)``. Build with :meth:`choose`.
    """

    bits: int
    l2_clip: float
    noise_multiplier: float
    min_survivors: int
    max_n: int
    dim: int
    padded_dim: int
    levels: int
    per_site_mu: float
    headroom: int
    wrap_probability: float = DEFAULT_WRAP_PROBABILITY

    @property
    def scale(self) -> float:
        """Integer units per unit of update (the same value :class:`EncodingParams` uses)."""
        return self.encoding().scale

    @property
    def l2_sensitivity(self) -> float:
        """D2 of one site's integer vector (add/remove): ``C * scale + sqrt(d_pad)`` (worst-case rounding)."""
        return self.levels + math.sqrt(self.padded_dim)  # C * scale == levels exactly

    @property
    def l1_sensitivity(self) -> float:
        """D1 of one site's integer vector: ``min(sqrt(d_pad) * D2, D2**2)``."""
        d2 = self.l2_sensitivity
        return min(math.sqrt(self.padded_dim) * d2, d2 * d2)

    @property
    def total_variance(self) -> float:
        """The noise variance (integer units) the analysis counts on: ``min_survivors * per_site_mu``."""
        return self.min_survivors * self.per_site_mu

    @property
    def effective_noise_multiplier(self) -> float:
        """``sqrt(total_variance) / D2``: at least ``noise_multiplier`` by construction."""
        return math.sqrt(self.total_variance) / self.l2_sensitivity

    def encoding(self) -> EncodingParams:
        """The fixed-point parameters every site and the coordinator use for this round."""
        return EncodingParams(
            bits=self.bits, clip=self.l2_clip, max_n=self.max_n, levels=self.levels, headroom=self.headroom
        )

    def rdp(self, orders: F64Array, replace_one: bool = False) -> F64Array:
        """RDP curve of one round (full participation) at ``orders``; replace-one doubles both sensitivities."""
        k = 2.0 if replace_one else 1.0
        return skellam_rdp(orders, self.total_variance, k * self.l1_sensitivity, k * self.l2_sensitivity)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SkellamParams:
        try:
            return cls(**data)
        except TypeError as exc:
            raise ConfigError(f"bad Skellam parameters: {exc}") from exc

    @classmethod
    def choose(
        cls,
        *,
        l2_clip: float,
        noise_multiplier: float,
        dim: int,
        min_survivors: int,
        max_n: int,
        bits: int = 32,
        wrap_probability: float = DEFAULT_WRAP_PROBABILITY,
    ) -> SkellamParams:
        """The largest scale the ring allows with noise headroom (see the module docstring).

        Raises :class:`ConfigError` when the ring is too small for any level.
        """
        check_bits(bits)
        if not (math.isfinite(l2_clip) and l2_clip > 0):
            raise ConfigError(f"privacy.l2_clip must be positive, got {l2_clip!r}")
        if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
            raise ConfigError(f"privacy.noise_multiplier must be positive, got {noise_multiplier!r}")
        if not 1 <= min_survivors <= max_n:
            raise ConfigError(f"need 1 <= min_survivors <= max_n, got {min_survivors} and {max_n}")
        if dim < 1 or not 0 < wrap_probability < 1:
            raise ConfigError("dim must be positive and wrap_probability in (0, 1)")
        d_pad = padded_length(dim)
        room = ((1 << (bits - 1)) - 1) // max_n  # L + h per site

        def mu_for(levels: int) -> float:
            d2 = levels + math.sqrt(d_pad)
            return (noise_multiplier * d2) ** 2 / min_survivors * (1 + 1e-12)

        def fits(levels: int) -> bool:
            return levels + noise_headroom(mu_for(levels), d_pad, min_survivors, max_n, wrap_probability) <= room

        if room < 2 or not fits(1):
            raise ConfigError(
                f"a {bits}-bit ring cannot hold Skellam noise for {max_n} sites at noise multiplier "
                f"{noise_multiplier}; use more bits"
            )
        lo, hi = 1, room
        while lo < hi:  # largest L with fits(L); fits is monotone (headroom grows with L)
            mid = (lo + hi + 1) // 2
            if fits(mid):
                lo = mid
            else:
                hi = mid - 1
        mu = mu_for(lo)
        return cls(
            bits=bits,
            l2_clip=float(l2_clip),
            noise_multiplier=float(noise_multiplier),
            min_survivors=min_survivors,
            max_n=max_n,
            dim=dim,
            padded_dim=d_pad,
            levels=lo,
            per_site_mu=mu,
            headroom=noise_headroom(mu, d_pad, min_survivors, max_n, wrap_probability),
            wrap_probability=wrap_probability,
        )


def skellam_tail(t: float, variance: float) -> float:
    """Chernoff bound on ``P(|X| >= t)`` for X Skellam with the given variance (symmetric)."""
    if t <= 0:
        return 1.0
    exponent = t * math.asinh(t / variance) - math.sqrt(variance * variance + t * t) + variance
    return min(1.0, 2.0 * math.exp(-exponent))


def _tail_threshold(variance: float, coords: int, probability: float) -> float:
    """Smallest t (to 1e-6 relative) with ``coords * skellam_tail(t, variance) <= probability``."""
    lo, hi = 0.0, max(1.0, math.sqrt(variance))
    while coords * skellam_tail(hi, variance) > probability:
        lo, hi = hi, hi * 2
    while hi - lo > 1e-6 * hi:
        mid = (lo + hi) / 2
        if coords * skellam_tail(mid, variance) > probability:
            lo = mid
        else:
            hi = mid
    return hi


def noise_headroom(mu: float, coords: int, min_survivors: int, max_n: int, probability: float) -> int:
    """Per-site integer range h such that n sites' summed noise stays below ``n * h`` in every coordinate except
    with probability ``<= probability``, for every n in [min_survivors, max_n]."""
    h = 0
    for n in range(min_survivors, max_n + 1):
        h = max(h, math.ceil(_tail_threshold(n * mu, coords, probability) / n))
    return h


def skellam_noise(d: int, mu: float, rng: np.random.Generator | None = None) -> NDArray[np.int64]:
    """``d`` independent draws of ``Sk(mu/2, mu/2)`` (variance ``mu``) as int64.

    ``rng`` defaults to a fresh generator seeded with 128 bits from the OS (never a fixed seed); tests inject one.
    """
    g = generator_or_secure(rng)
    return (g.poisson(mu / 2, d) - g.poisson(mu / 2, d)).astype(np.int64)


def add_noise_mod(encoded: U32Array, noise: NDArray[np.int64], bits: int) -> U32Array:
    """``(encoded + noise) mod 2**bits`` as uint32 (the form masking expects)."""
    check_bits(bits)
    return ((encoded.astype(np.int64) + noise) & ((1 << bits) - 1)).astype(np.uint32)


def privatize(
    update: NDArray[np.floating],
    params: SkellamParams,
    seed: bytes,
    weight: float = 1.0,
    rng: np.random.Generator | None = None,
) -> U32Array:
    """A site's side: rotate (public ``seed``), encode, add its Skellam share. ``update`` must already be clipped to
    L2 norm ``l2_clip`` (:func:`common.privacy.clipping.clip_l2`); its length must be ``params.dim``."""
    if update.shape != (params.dim,):
        raise ConfigError(f"update has shape {update.shape}, the round's Skellam parameters expect ({params.dim},)")
    encoded = encode(rotate(np.asarray(update, dtype=np.float64), seed), params.encoding(), weight)
    return add_noise_mod(encoded, skellam_noise(params.padded_dim, params.per_site_mu, rng), params.bits)


def decode_private(total: U32Array, params: SkellamParams, n: int, seed: bytes) -> NDArray[np.float64]:
    """The coordinator's side: the unmasked sum mod 2**bits of ``n`` sites' :func:`privatize` outputs back to the
    (noised) float sum in the original coordinates."""
    return unrotate(decode_sum(total, params.encoding(), n), seed, params.dim)
