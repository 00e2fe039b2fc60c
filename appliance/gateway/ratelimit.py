"""A token bucket: the cap on how hard one gateway may lean on the registry.

Retry storms (a client retries every 5 s, a herd of clients all at once) must
not become API storms. Callers wait a bounded time for a token and give up
otherwise: nothing queues without bound behind the bucket.
"""

from __future__ import annotations

import threading
import time


class TokenBucket:
    def __init__(self, rate: float, burst: int, clock=time.monotonic) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._stamp = clock()
        self._lock = threading.Lock()

    def configure(self, rate: float, burst: int) -> None:
        """A new rate and burst (a reload); tokens already earned stay, up to the new burst."""
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        with self._lock:
            self._refill(self._clock())
            self.rate, self.burst = rate, burst
            self._tokens = min(self._tokens, float(burst))

    def _refill(self, now: float) -> None:
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    def try_acquire(self) -> bool:
        with self._lock:
            self._refill(self._clock())
            if self._tokens >= 1:
                self._tokens -= 1
                return True
            return False

    def acquire(self, timeout: float) -> bool:
        """Take a token, waiting at most `timeout` seconds; False if none came."""
        deadline = self._clock() + timeout
        while True:
            with self._lock:
                now = self._clock()
                self._refill(now)
                if self._tokens >= 1:
                    self._tokens -= 1
                    return True
                wait = (1 - self._tokens) / self.rate
            if now + wait > deadline:
                return False
            time.sleep(wait)
