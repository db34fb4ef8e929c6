"""Noise generators seeded from OS entropy.

A fixed or 32-bit seed makes DP noise reproducible (or guessable by brute force), which voids the guarantee. Every
generator here takes 128 bits from :mod:`secrets` (the OS CSPRNG) as the seed of numpy's PCG64; tests may inject
their own :class:`numpy.random.Generator` instead.
"""

from __future__ import annotations

import secrets

import numpy as np


def secure_generator() -> np.random.Generator:
    """A fresh numpy Generator seeded with 128 bits of OS entropy."""
    return np.random.default_rng(secrets.randbits(128))


def generator_or_secure(rng: np.random.Generator | None) -> np.random.Generator:
    """``rng`` if given (tests), else :func:`secure_generator`."""
    return secure_generator() if rng is None else rng
