"""Token-bucket rate limiting per client identity (API key, or client address when the server has no keys).

Two buckets per identity: requests per minute and tokens per minute. A request is admitted when both buckets hold
enough; the token cost is reserved up front (prompt + max_tokens x n, what the request may use) and the unused part is
refunded when it finishes. A request dearer than a whole bucket is admitted against a full bucket and leaves it in
debt, so it is slow but never impossible. Refused requests get the seconds until they would be admitted.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(slots=True)
class TokenBucket:
    capacity: float
    refill_per_s: float
    level: float
    updated: float

    @classmethod
    def full(cls, per_minute: int, now: float) -> TokenBucket:
        return cls(float(per_minute), per_minute / 60.0, float(per_minute), now)

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.updated) * self.refill_per_s)
        self.updated = now

    def wait_for(self, cost: float) -> float:
        """Seconds until `cost` can be taken (0 when it can now); call after refill."""
        need = min(cost, self.capacity) - self.level
        return 0.0 if need <= 0 else need / self.refill_per_s


@dataclass(slots=True)
class Decision:
    allowed: bool
    retry_after_s: float = 0.0
    limit: str | None = None  # "requests" or "tokens": which bucket refused


class RateLimiter:
    """Thread-safe; `None` limits mean unlimited. `clock` is injectable for tests."""

    _PRUNE_AT = 10_000  # identities kept before full (= forgotten-equivalent) buckets are dropped

    def __init__(self, requests_per_minute: int | None, tokens_per_minute: int | None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rpm = requests_per_minute
        self.tpm = tokens_per_minute
        self._clock = clock
        self._lock = threading.Lock()
        self._requests: dict[str, TokenBucket] = {}
        self._tokens: dict[str, TokenBucket] = {}

    @property
    def enabled(self) -> bool:
        return self.rpm is not None or self.tpm is not None

    def acquire(self, identity: str, tokens: int) -> Decision:
        """Admit one request costing `tokens` (both buckets are charged) or say how long to wait (none is)."""
        if not self.enabled:
            return Decision(True)
        now = self._clock()
        with self._lock:
            req = self._bucket(self._requests, self.rpm, identity, now)
            tok = self._bucket(self._tokens, self.tpm, identity, now)
            waits = [(b.wait_for(cost), name) for b, cost, name in ((req, 1, "requests"), (tok, tokens, "tokens"))
                     if b is not None]
            wait, name = max(waits)
            if wait > 0:
                return Decision(False, wait, name)
            if req is not None:
                req.level -= 1
            if tok is not None:
                tok.level -= tokens
            if len(self._requests) + len(self._tokens) > self._PRUNE_AT:
                self._prune()
            return Decision(True)

    def refund(self, identity: str, tokens: int) -> None:
        """Give back reserved tokens a request did not use."""
        if self.tpm is None or tokens <= 0:
            return
        with self._lock:
            bucket = self._tokens.get(identity)
            if bucket is not None:
                bucket.level = min(bucket.capacity, bucket.level + tokens)

    def _bucket(self, buckets: dict[str, TokenBucket], per_minute: int | None, identity: str,
                now: float) -> TokenBucket | None:
        if per_minute is None:
            return None
        bucket = buckets.get(identity)
        if bucket is None:
            bucket = buckets[identity] = TokenBucket.full(per_minute, now)
        bucket.refill(now)
        return bucket

    def _prune(self) -> None:
        now = self._clock()
        for buckets in (self._requests, self._tokens):
            for identity, bucket in list(buckets.items()):
                bucket.refill(now)
                if bucket.level >= bucket.capacity:
                    del buckets[identity]
