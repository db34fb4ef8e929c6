"""Rate limits without I/O: token buckets for Join, and a throttle that keeps floods out of the audit log.

Both take an injectable monotonic clock so tests drive them directly. Memory is bounded: callers are certificate
holders (the federation CA issues every identity), and idle entries are forgotten once ``max_keys`` is reached.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from common.errors import RateLimited

AUDIT_WINDOW_S = 60.0  # one audit event per caller and kind of flood per minute, carrying the count it stood for


@dataclass
class TokenBucket:
    """``burst`` tokens at most, refilled at ``rate_per_s``; one call takes one token."""

    rate_per_s: float
    burst: float
    tokens: float
    updated: float

    @classmethod
    def full(cls, rate_per_s: float, burst: float, now: float) -> TokenBucket:
        return cls(rate_per_s, burst, burst, now)

    def refill(self, now: float) -> None:
        if now > self.updated:
            self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate_per_s)
        self.updated = now

    def wait_s(self) -> float:
        """Seconds until a token is available (0 when one is)."""
        return 0.0 if self.tokens >= 1 else (1 - self.tokens) / self.rate_per_s

    @property
    def is_full(self) -> bool:
        return self.tokens >= self.burst


class JoinLimiter:
    """Join calls per caller (``per_min`` refill, ``burst`` bucket) and from everyone together."""

    def __init__(
        self,
        per_min: float,
        burst: int,
        global_per_min: float,
        global_burst: int,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 10_000,
    ) -> None:
        self.per_min, self.burst = per_min, burst
        self.global_per_min, self.global_burst = global_per_min, global_burst
        self._clock = clock
        self._max_keys = max_keys
        self._buckets: dict[str, TokenBucket] = {}
        self._global = TokenBucket.full(global_per_min / 60, global_burst, clock())

    def _bucket(self, key: str, now: float) -> TokenBucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self._max_keys:
                self._forget_full(now)
            bucket = self._buckets[key] = TokenBucket.full(self.per_min / 60, self.burst, now)
        bucket.refill(now)
        return bucket

    def _forget_full(self, now: float) -> None:
        # A full bucket is the same as a new one, so dropping it loses nothing.
        for key, bucket in list(self._buckets.items()):
            bucket.refill(now)
            if bucket.is_full:
                del self._buckets[key]
        if len(self._buckets) >= self._max_keys:  # all busy: forget the oldest (a flood of distinct identities)
            del self._buckets[next(iter(self._buckets))]

    def take(self, key: str) -> None:
        """Take one token for ``key`` (and one from the global bucket), or raise :class:`RateLimited`."""
        now = self._clock()
        mine = self._bucket(key, now)
        self._global.refill(now)
        if mine.tokens < 1:
            wait = mine.wait_s()
            raise RateLimited(
                f"too many Join calls from {key!r}: at most {self.burst} at once and {self.per_min:g} per minute "
                f"(server.join_rate_per_min); retry in {wait:.1f} s",
                wait,
                audit_kind="join_rate_limited",
            )
        if self._global.tokens < 1:
            wait = self._global.wait_s()
            raise RateLimited(
                f"the coordinator is taking no more Join calls for a moment: more than {self.global_per_min:g} per "
                f"minute from all sites (server.join_global_rate_per_min); retry in {wait:.1f} s",
                wait,
                audit_kind="join_rate_limited",
            )
        mine.tokens -= 1
        self._global.tokens -= 1


class AuditThrottle:
    """Admit one audit event per key and window; the next admitted event carries how many were held back."""

    def __init__(
        self, window_s: float = AUDIT_WINDOW_S, clock: Callable[[], float] = time.monotonic, max_keys: int = 10_000
    ) -> None:
        self.window_s = window_s
        self._clock = clock
        self._max_keys = max_keys
        self._last: dict[Hashable, float] = {}
        self._held: dict[Hashable, int] = {}

    def admit(self, key: Hashable) -> int | None:
        """None: do not write this event (it is counted). Otherwise write it, with this many held back before it."""
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self.window_s:
            self._held[key] = self._held.get(key, 0) + 1
            return None
        if last is None and len(self._last) >= self._max_keys:
            oldest = min(self._last, key=self._last.__getitem__)
            del self._last[oldest]
            self._held.pop(oldest, None)
        self._last[key] = now
        return self._held.pop(key, 0)
