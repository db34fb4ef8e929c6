"""Masks from seeds: the AES-256-CTR keystream read as little-endian uint32 lanes, reduced mod 2**b.

A mask is what a site adds to its encoded update so that the coordinator sees uniform noise. Pairwise masks cancel in
the sum; self masks are removed once the round knows who survived. Both sides must expand a 32-byte seed into the
same d lanes, fast: the coordinator may remove hundreds of masks of millions of coordinates per round.

Why AES-CTR: it is a PRF-based PRG with hardware support (AES-NI), about 0.5 ms per 10**6 lanes here, from a
well-kept library. Each seed is used as an AES-256 key exactly once per round and purpose (pairwise seeds come from
HKDF with job, round, pair and purpose in ``info``; self-mask seeds are fresh random bytes), so the all-zero IV is
safe: no (key, counter) pair ever repeats.

Lane i is keystream bytes [4i, 4i+4). Taking the low b bits of a uniform 32-bit lane gives a uniform value mod 2**b,
and since 2**b divides 2**32, uint32 wrap-around arithmetic followed by one final ``& (2**b - 1)`` equals arithmetic
mod 2**b. So masks are added on raw 32-bit lanes and the vector is reduced once per block, not once per mask.

Memory stays O(block): the keystream is written with ``update_into`` into one reused buffer per thread and folded into
the caller's vector block by block, all seeds per block, so the block stays in cache while every mask passes over it.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes
from numpy.typing import NDArray

from common.errors import InvalidArgument

SEED_LEN = 32
MIN_BITS, MAX_BITS = 16, 32
BLOCK = 1 << 16  # lanes per block: a 256 KiB keystream buffer fits in L2 cache
_IV = bytes(16)
_AES_BLOCK = 16

U32Array = NDArray[np.uint32]
Mask = tuple[bytes, int]  # (seed, sign): sign +1 adds the mask, -1 subtracts it


def check_bits(bits: int) -> int:
    """``bits`` if it is a supported ring size (16..32), else :class:`InvalidArgument`."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise InvalidArgument(f"bits must be an integer from {MIN_BITS} to {MAX_BITS}, got {bits!r}")
    return bits


def check_vector(vec: NDArray[np.generic], what: str = "vector") -> U32Array:
    """``vec`` if it is a writable, contiguous, one-dimensional uint32 array; else :class:`InvalidArgument`."""
    if vec.dtype != np.uint32 or vec.ndim != 1 or not vec.flags.c_contiguous or not vec.flags.writeable:
        raise InvalidArgument(f"{what} must be a writable contiguous 1-D uint32 array, got {vec.dtype} {vec.shape}")
    return vec  # type: ignore[return-value]


def keystream(seed: bytes) -> CipherContext:
    """The AES-256-CTR encryptor whose output is ``seed``'s keystream (all-zero IV: each seed is used once)."""
    return Cipher(algorithms.AES(seed), modes.CTR(_IV)).encryptor()


class Lanes:
    """One reused buffer of ``block`` uint32 lanes that keystreams are read into (not thread-safe)."""

    def __init__(self, block: int = BLOCK) -> None:
        if block < 1:
            raise InvalidArgument("block must be positive")
        self.block = block
        self._zeros = memoryview(bytes(4 * block))
        # cryptography asks for len(data) + block_size - 1 bytes of room in update_into.
        self._buf = bytearray(4 * block + _AES_BLOCK - 1)
        self._lanes: U32Array = np.frombuffer(self._buf, dtype=np.uint32, count=block)

    def fill(self, stream: CipherContext, n: int) -> U32Array:
        """The next ``n`` (at most ``block``) lanes of ``stream``, in the buffer (valid until the next fill)."""
        stream.update_into(self._zeros[: 4 * n], self._buf)
        return self._lanes[:n]


class MaskStream:
    """Reusable keystream buffers; one per thread (the buffers are shared state, so it is not thread-safe)."""

    def __init__(self, block: int = BLOCK) -> None:
        self._lanes = Lanes(block)
        self.block = block

    def apply(self, vec: U32Array, masks: Sequence[Mask], bits: int) -> None:
        """Add (+1) or subtract (-1) each seed's mask into ``vec`` in place, then reduce ``vec`` mod 2**bits."""
        check_vector(vec)
        check_bits(bits)
        encryptors = []
        for seed, sign in masks:
            if len(seed) != SEED_LEN:
                raise InvalidArgument(f"mask seeds are {SEED_LEN} bytes, got {len(seed)}")
            if sign not in (1, -1):
                raise InvalidArgument(f"mask sign must be +1 or -1, got {sign!r}")
            encryptors.append((keystream(seed), sign))
        low = np.uint32((1 << bits) - 1)
        for start in range(0, len(vec), self.block):
            part = vec[start : start + self.block]
            for enc, sign in encryptors:
                ks = self._lanes.fill(enc, len(part))
                if sign > 0:
                    np.add(part, ks, out=part)
                else:
                    np.subtract(part, ks, out=part)
            if bits < 32:
                np.bitwise_and(part, low, out=part)
        for enc, _ in encryptors:
            enc.finalize()


_local = threading.local()


def _stream() -> MaskStream:
    stream: MaskStream | None = getattr(_local, "stream", None)
    if stream is None:
        stream = _local.stream = MaskStream()
    return stream


def apply_masks(vec: U32Array, masks: Sequence[Mask], bits: int) -> None:
    """Add or subtract several seeds' masks into ``vec`` in place and reduce mod 2**bits (one pass over ``vec``)."""
    _stream().apply(vec, masks, bits)


def apply_mask(vec: U32Array, seed: bytes, sign: int, bits: int) -> None:
    """Add (``sign`` = +1) or subtract (-1) the mask of ``seed`` into ``vec`` in place, mod 2**bits."""
    _stream().apply(vec, [(seed, sign)], bits)


def mask_of(seed: bytes, d: int, bits: int) -> U32Array:
    """The mask of ``seed`` as a new array of ``d`` values mod 2**bits (allocates; for tests and encoding)."""
    vec = np.zeros(d, dtype=np.uint32)
    apply_mask(vec, seed, 1, bits)
    return vec
