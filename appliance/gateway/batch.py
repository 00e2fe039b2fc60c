"""Registry lookups coalesced into batches: one rate-limit token buys up to N answers.

With one token per key, a herd set the pace: 200 fresh clients at an empty
gateway needed 2.36 s because the 200th lookup could not start before
(200 - burst 100) / rate 50 = 2 s, and 10,000 would have needed 200 s, while
the registry answers thousands of keys a second. Here every cache miss is
submitted as a waiter; one dispatcher thread turns the waiting keys into
registry calls of at most `max_batch` keys (`POST /v1/gateway/lookup`), each
costing one token:

- a call starts at once when no other call is under way (a lone client waits
  for nobody), else when `max_batch` keys wait or `linger` seconds after the
  first of them arrived;
- at most `in_flight` calls run at once; while every slot is busy, or the
  bucket has no token, keys keep arriving and the next call carries them all
  (up to `max_batch`): the busier the gateway, the larger its batches;
- a token that does not come within `token_wait` fails that batch's waiters
  with RateLimited (the cache serves what it has), as a single lookup was;
- each waiter gets its own key's answer; a call that fails (RegistryUnavailable,
  or anything else) fails only the waiters of that call.

`max_batch` 1 is the path before batching: one GET per key, one token each.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from appliance.gateway.peer import RegistryUnavailable
from appliance.gateway.ratelimit import TokenBucket

log = logging.getLogger(__name__)

# Chosen with bench/herd.py (README "Herds"): see there for the measurements.
MAX_BATCH = 128
LINGER = 0.005
TOKEN_WAIT = 1.0  # how long a batch may wait for a registry token


class RateLimited(Exception):
    """No registry token came in time for this lookup's batch."""


# keys -> {key: peer or None (not found)}; raises for the whole batch when it fails.
FetchMany = Callable[[list[str]], dict]


class LookupBatcher:
    def __init__(self, fetch_many: FetchMany, bucket: TokenBucket, *,
                 max_batch: int = MAX_BATCH, linger: float = LINGER, in_flight: int = 8,
                 token_wait: float = TOKEN_WAIT,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_batch < 1 or in_flight < 1 or linger < 0:
            raise ValueError("max_batch and in_flight must be >= 1, linger >= 0")
        self._fetch_many = fetch_many
        self.bucket = bucket
        self.max_batch = max_batch
        self.linger = linger
        self.token_wait = token_wait
        self._clock = clock
        self._pending: deque[tuple[str, Future, float]] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._running = 0  # calls under way
        self._slots = threading.Semaphore(in_flight)
        self._pool = ThreadPoolExecutor(in_flight, thread_name_prefix="lookup_batch")
        self.calls = 0  # registry calls made
        self.keys = 0  # keys asked in them
        self._dispatcher = threading.Thread(target=self._dispatch, name="lookup_batcher",
                                            daemon=True)
        self._dispatcher.start()

    def submit(self, keys: list[str]) -> list[Future]:
        """A future per key: its RegistryPeer, None (not found), or the batch's error."""
        futures: list[Future] = [Future() for _ in keys]
        now = self._clock()
        with self._cond:
            if self._closed:
                for f in futures:
                    f.set_exception(RegistryUnavailable("lookup batcher closed"))
                return futures
            self._pending.extend((k, f, now) for k, f in zip(keys, futures, strict=True))
            self._cond.notify()
        return futures

    def configure(self, rate: float, burst: int, max_batch: int, linger: float) -> None:
        """New limits (a reload), taken by the next batch; in_flight stays until a restart."""
        if max_batch < 1 or linger < 0:
            raise ValueError("max_batch must be >= 1, linger >= 0")
        self.bucket.configure(rate, burst)
        with self._cond:
            self.max_batch, self.linger = max_batch, linger

    def close(self) -> None:
        """Fail what still waits (RegistryUnavailable: the cache then serves what it
        has), finish the calls under way. Safe to repeat."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._dispatcher.join(timeout=10)
        self._pool.shutdown(wait=True)

    def _dispatch(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed:
                    self._fail(list(self._pending), RegistryUnavailable("lookup batcher closed"))
                    self._pending.clear()
                    return
                # Linger for company while other calls are under way (a herd),
                # unless a full batch already waits; alone, go at once.
                linger = self.linger if self._running else 0.0
                deadline = self._pending[0][2] + linger
                while len(self._pending) < self.max_batch and not self._closed:
                    remaining = deadline - self._clock()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
            self._slots.acquire()
            got = self.bucket.acquire(self.token_wait)
            with self._cond:
                n = min(self.max_batch, len(self._pending))
                batch = [self._pending.popleft() for _ in range(n)]
            if not batch:  # only when closing
                self._slots.release()
                continue
            if not got:
                self._slots.release()
                self._fail(batch, RateLimited(f"no registry token within {self.token_wait:g} s"))
                continue
            with self._cond:
                self._running += 1
            self._pool.submit(self._call, batch)

    def _call(self, batch: list[tuple[str, Future, float]]) -> None:
        keys = list(dict.fromkeys(k for k, _, _ in batch))
        with self._cond:
            self.calls += 1
            self.keys += len(keys)
        try:
            answers = self._fetch_many(keys)
        except Exception as e:  # noqa: BLE001 - handed to this batch's waiters, and only theirs
            self._fail(batch, e)
        else:
            for key, future, _ in batch:
                future.set_result(answers.get(key))
        finally:
            with self._cond:
                self._running -= 1
            self._slots.release()

    @staticmethod
    def _fail(batch: list[tuple[str, Future, float]], error: BaseException) -> None:
        for _, future, _ in batch:
            future.set_exception(error)
