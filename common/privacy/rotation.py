"""Randomized Hadamard rotation with public per-round randomness.

``rotate(x, seed) = H D x_pad / sqrt(n)``: ``x`` zero-padded to ``n = 2**k >= len(x)``, ``D`` a diagonal of random
signs, ``H`` the (Sylvester) Walsh-Hadamard matrix. ``H / sqrt(n)`` is orthonormal and symmetric, so the rotation keeps
L2 norms and its inverse is ``D H y / sqrt(n)``. After it, each coordinate of a norm-C vector is sub-Gaussian with
scale ``C / sqrt(n)`` whatever the input, which is what lets a fixed-point ring hold DP updates without spiky
coordinates (Kairouz et al. 2021; Agarwal et al. 2021).

The signs are public (everyone must use the same): they are the bits of SHAKE-256 over a domain tag and the round's
seed (e.g. derived from job id and round number), so both sides expand the same stream. The transform is vectorised
numpy, O(n log n).
"""

from __future__ import annotations

import hashlib

import numpy as np
from numpy.typing import NDArray

from common.errors import InvalidArgument

_TAG = b"cohort/privacy/rotation-signs/v1\x00"


def padded_length(d: int) -> int:
    """The next power of two >= d (and >= 1)."""
    if d < 1:
        raise InvalidArgument(f"cannot rotate an empty vector (d={d})")
    return 1 << (d - 1).bit_length()


def signs(seed: bytes, n: int) -> NDArray[np.float64]:
    """``n`` public random signs (+1.0 / -1.0) expanded from ``seed``."""
    stream = hashlib.shake_256(_TAG + seed).digest((n + 7) // 8)
    bits = np.unpackbits(np.frombuffer(stream, dtype=np.uint8), bitorder="little")[:n]
    return 1.0 - 2.0 * bits.astype(np.float64)


def fwht(x: NDArray[np.float64]) -> NDArray[np.float64]:
    """The orthonormal fast Walsh-Hadamard transform of a vector whose length is a power of two (returns a copy)."""
    n = len(x)
    if n & (n - 1):
        raise InvalidArgument(f"the Hadamard transform needs a power-of-two length, got {n}")
    y = np.array(x, dtype=np.float64)
    h = 1
    while h < n:
        blocks = y.reshape(-1, 2, h)
        a, b = blocks[:, 0, :].copy(), blocks[:, 1, :]
        blocks[:, 0, :] += b
        blocks[:, 1, :] = a - b
        h *= 2
    y /= np.sqrt(n)
    return y


def rotate(x: NDArray[np.floating], seed: bytes) -> NDArray[np.float64]:
    """Pad ``x`` (1-D) to a power of two, flip signs from ``seed``, Hadamard-transform (orthonormal)."""
    if x.ndim != 1:
        raise InvalidArgument(f"rotate takes a 1-D vector, got shape {x.shape}")
    n = padded_length(len(x))
    padded = np.zeros(n, dtype=np.float64)
    padded[: len(x)] = x
    padded *= signs(seed, n)
    return fwht(padded)


def unrotate(y: NDArray[np.floating], seed: bytes, dim: int) -> NDArray[np.float64]:
    """Inverse of :func:`rotate`: the first ``dim`` coordinates of ``D H y / sqrt(n)``."""
    n = len(y)
    if y.ndim != 1 or n != padded_length(max(dim, 1)) or dim > n:
        raise InvalidArgument(f"a rotated vector of length {n} cannot hold {dim} coordinates")
    x = fwht(np.asarray(y, dtype=np.float64))
    x *= signs(seed, n)
    return x[:dim]
