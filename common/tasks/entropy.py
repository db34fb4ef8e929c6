"""DP noise from OS entropy: a torch generator whose whole Mersenne Twister state is drawn with ``secrets``."""

from __future__ import annotations

import secrets

import numpy as np
import torch

# torch's CPU generator state (CPUGeneratorImplStateLegacy): uint64 seed, int left, int seeded, uint64 next, then the
# 624 Mersenne Twister words, each stored as a uint64.
_MT_WORDS = 624
_MT_OFFSET = 24


def _mt19937_seeded(seed: int) -> list[int]:
    """The Mersenne Twister state words after ``init_genrand(seed)``: what ``manual_seed`` produces."""
    words = [seed & 0xFFFFFFFF]
    for i in range(1, _MT_WORDS):
        prev = words[-1]
        words.append((1812433253 * (prev ^ (prev >> 30)) + i) & 0xFFFFFFFF)
    return words


def entropy_generator() -> torch.Generator:
    """A CPU ``torch.Generator`` whose entire Mersenne Twister state (624 words, 19,968 bits) comes from OS entropy.

    Why not ``manual_seed(secrets.randbits(64))``: torch seeds its Mersenne Twister from the low 32 bits of the seed
    only, so noise seeded that way could be found by trying 2**32 seeds. The state layout is checked against a
    known seed first; a torch whose layout differs raises RuntimeError instead of yielding a weak generator.
    """
    generator = torch.Generator().manual_seed(1)
    state = generator.get_state().numpy().copy()
    words = state[_MT_OFFSET : _MT_OFFSET + 8 * _MT_WORDS].view("<u8")
    if words.tolist() != _mt19937_seeded(1):
        raise RuntimeError("torch's CPU generator state has an unexpected layout; cannot seed DP noise from OS entropy")
    words[:] = np.frombuffer(secrets.token_bytes(4 * _MT_WORDS), dtype="<u4")
    new_state = torch.from_numpy(state)
    generator.set_state(new_state)
    if not torch.equal(generator.get_state(), new_state):
        raise RuntimeError("torch's CPU generator did not accept an OS-entropy state; cannot seed DP noise")
    return generator
