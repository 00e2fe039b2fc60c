"""The lookup queue: verified initiations waiting for a worker, served fairly.

Before this queue the gateway had one first-come set of 1,024 pending lookups.
600 valid random-key initiations a second (0.7 Mbit/s) filled it within 2 s
and a real client was refused on every try (issue 13). Here:

- Two lanes with their own budgets: keys the gateway has reason to expect
  (the known-key filter or the cache knows them) and keys it does not. The
  unknown lane cannot take the known lane's places, and a worker serves
  KNOWN_SHARE known items for each unknown one while both have work.
- Within a lane, sources (sourcelimit.source_key) take turns, one item each,
  and a source holds at most `per_source` items: a new item from a source at
  its cap displaces that source's oldest. One source, however fast, holds a
  few places and gets one turn in N; a real client's item is served after at
  most one item of every other waiting source.
- When a lane is full, a newcomer displaces the item at the head of the
  rotation (the work waiting longest for its turn), and work older than
  `max_age` is dropped when it comes up: after REKEY_TIMEOUT (5 s) its client
  has retried, and the retry refreshed the queued item (same key: endpoint and
  time replaced in place, so the queue always holds a key's latest source).

A key is in the queue once, from put until done(): a key being looked up is not
queued again, but its newest item is kept (latest()): a client that retried
during a slow pull accepts a response to its latest initiation only, and
re-injection must hand that one to the data plane. The queue counts its drops
by reason in `dropped` (the daemon copies them into its metrics) and never
blocks a producer.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

# Only a holder of a registered key can put an item in the known lane (a verified,
# fresh initiation from a key the filter knows; one item per key), so its budget
# is sized for a herd, not a flood: at 768 places, 10,000 clients in one second
# lost 9,529 items to displacement and most waited for their 5 s retry, their
# initiations verified twice (bench/herd.py). 16,384 items take ~10 MB.
KNOWN_CAPACITY = 16_384
UNKNOWN_CAPACITY = 256
PER_SOURCE = 4
MAX_AGE = 5.0  # REKEY_TIMEOUT: by then the client has sent a newer initiation
KNOWN_SHARE = 3  # known items served per unknown one when both lanes wait

DROP_REASONS = (
    "pending",  # the key is already queued or being looked up (a queued one is refreshed)
    "source_full",  # displaced by a newer item from the same source
    "lane_full",  # displaced by a newcomer while the lane was full
    "stale",  # waited longer than max_age
)


@dataclass(slots=True)
class Work:
    key: str  # the initiator's public key (base64)
    endpoint: str  # where the initiation came from (host:port)
    source: bytes  # sourcelimit.source_key of the endpoint's address
    known: bool  # in the known lane
    seen_at: float  # wall clock (events and latency metrics)
    timestamp: bytes = b""  # the initiation's TAI64N (replay memory, once installed)
    datagram: object = None  # the captured initiation (capture.Datagram), to re-inject
    queued_at: float = 0.0  # the queue's clock, set by put


class _Lane:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.sources: OrderedDict[bytes, deque[Work]] = OrderedDict()  # rotation order
        self.size = 0

    def push(self, work: Work, per_source: int) -> Work | None:
        """Queue `work`; returns an item it displaced, if any."""
        displaced = None
        items = self.sources.get(work.source)
        if items is not None and len(items) >= per_source:
            displaced = items.popleft()
            self.size -= 1
        elif self.size >= self.capacity:
            displaced = self.pop()
        if items is None or work.source not in self.sources:  # pop may have emptied it
            items = self.sources[work.source] = deque()
        items.append(work)
        self.size += 1
        return displaced

    def pop(self) -> Work | None:
        """The head item of the source whose turn it is; that source goes to the back."""
        if not self.sources:
            return None
        source, items = next(iter(self.sources.items()))
        work = items.popleft()
        self.size -= 1
        if items:
            self.sources.move_to_end(source)
        else:
            del self.sources[source]
        return work


class FairQueue:
    def __init__(self, *, known_capacity: int = KNOWN_CAPACITY,
                 unknown_capacity: int = UNKNOWN_CAPACITY, per_source: int = PER_SOURCE,
                 max_age: float = MAX_AGE, clock: Callable[[], float] = time.monotonic) -> None:
        if min(known_capacity, unknown_capacity, per_source) < 1:
            raise ValueError("capacities and per_source must be at least 1")
        self._lanes = {True: _Lane(known_capacity), False: _Lane(unknown_capacity)}
        self.per_source = per_source
        self.max_age = max_age
        self._clock = clock
        self._queued: dict[str, Work] = {}  # key -> its item in a lane
        self._busy: dict[str, Work] = {}  # keys a worker took -> their newest item
        self._known_served = 0  # known items served since the last unknown one
        self._cond = threading.Condition()
        self._closed = False
        self.dropped: Counter[str] = Counter()

    def __len__(self) -> int:
        with self._cond:
            return len(self._queued)

    @property
    def capacity(self) -> int:
        return sum(lane.capacity for lane in self._lanes.values())

    def unknown_fill(self) -> float:
        """The unknown lane's items as a fraction of its places (0..1): a load signal."""
        with self._cond:
            lane = self._lanes[False]
            return lane.size / lane.capacity

    def put(self, work: Work) -> str | None:
        """Queue a lookup; None if queued, else the DROP_REASONS entry saying why not.

        A key already queued is refreshed in place (endpoint and time), keeping its
        turn; a key a worker is busy with is dropped.
        """
        with self._cond:
            if work.key in self._busy:
                self._busy[work.key] = work
                self.dropped["pending"] += 1
                return "pending"
            now = self._clock()
            queued = self._queued.get(work.key)
            if queued is not None:
                queued.endpoint, queued.seen_at, queued.timestamp, queued.datagram = \
                    work.endpoint, work.seen_at, work.timestamp, work.datagram
                queued.queued_at = now
                self.dropped["pending"] += 1
                return "pending"
            work.queued_at = now
            displaced = self._lanes[work.known].push(work, self.per_source)
            self._queued[work.key] = work
            if displaced is not None:
                del self._queued[displaced.key]
                self.dropped["source_full" if displaced.source == work.source
                             else "lane_full"] += 1
            self._cond.notify()
            return None

    def get(self, timeout: float | None = None) -> Work | None:
        """The next item by turn (stale ones dropped), marked busy; None on timeout/close."""
        deadline = None if timeout is None else self._clock() + timeout
        with self._cond:
            while True:
                if self._closed:
                    return None
                work = self._next()
                if work is not None:
                    del self._queued[work.key]
                    self._busy[work.key] = work
                    return work
                remaining = None if deadline is None else deadline - self._clock()
                if remaining is not None and remaining <= 0:
                    return None
                self._cond.wait(remaining)

    def get_many(self, limit: int, timeout: float | None = None) -> list[Work]:
        """The next item as `get` does (waiting for it), then up to limit - 1 more that
        are ready, in turn order, all marked busy; [] on timeout/close.

        A worker that takes the waiting items together looks their keys up in one
        batch (cache.lookup_many); the order of service is the same as item by item.
        """
        first = self.get(timeout)
        if first is None:
            return []
        works = [first]
        with self._cond:
            while len(works) < limit and not self._closed:
                work = self._next()
                if work is None:
                    break
                del self._queued[work.key]
                self._busy[work.key] = work
                works.append(work)
        return works

    def _next(self) -> Work | None:
        known, unknown = self._lanes[True], self._lanes[False]
        while known.size or unknown.size:
            take_known = known.size and (not unknown.size
                                         or self._known_served < KNOWN_SHARE)
            work = (known if take_known else unknown).pop()
            self._known_served = self._known_served + 1 if take_known else 0
            if self._clock() - work.queued_at > self.max_age:
                del self._queued[work.key]
                self.dropped["stale"] += 1
                continue
            return work
        return None

    def latest(self, key: str) -> Work | None:
        """The newest item for a key a worker is busy with (a retry may have come)."""
        with self._cond:
            return self._busy.get(key)

    def done(self, key: str) -> None:
        """A worker finished with `key`: it may be queued again."""
        with self._cond:
            self._busy.pop(key, None)

    def take_dropped(self) -> Counter[str]:
        """Drops by reason since the last call (for the daemon's metrics)."""
        with self._cond:
            dropped, self.dropped = self.dropped, Counter()
        return dropped

    def close(self) -> None:
        """Wake every waiting worker with None; later gets return None at once."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
