"""Put back the endpoint a replayed initiation stole, with bounded work.

Role inversion means the data plane never saw the initiation that brought a
peer in, so it accepts a replay of it and aims the peer at the replayer. The
daemon undoes that: after REPAIR_DELAY (time for the data plane to act on the
replay) it sets the peer's endpoint back to the last one the client itself
used. Before this module each replay queued its own task on the lookup pool,
and each task read the whole device: 1,000 replays in 0.2 s delayed the next
real client by 25 s (issue 13). Now:

- a repair per replayed initiation, not per copy: the data plane accepts a
  captured initiation once (then it knows that timestamp and refuses the
  copies), so only a replay newer than the last one repaired for the key can
  have moved the endpoint. 10,000 copies of one capture cost one repair;
- at most one repair per key is waiting; replays meanwhile fold into it;
- the queue holds at most `capacity` keys; beyond that requests are refused
  (counted), the next replay after the queue drains asks again;
- the repair is one direct set of the known endpoint, no device read: neither
  backend reads a single peer, and a whole-device read at 50,000 peers takes
  about a second. If the client itself roamed within those 0.2 s, its next
  authenticated packet moves the endpoint again (WireGuard's roaming).
- one worker thread does them in order, so a replay flood costs one thread
  and at most one device write per key per REPAIR_DELAY.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from appliance.gateway import events

log = logging.getLogger(__name__)

REPAIR_DELAY = 0.2  # seconds for the data plane to act on a replay before we undo it
REPAIR_CAPACITY = 1024


@dataclass(slots=True)
class _Repair:
    key: str
    good: str  # the endpoint to put back
    replayer: str  # the latest replay's source, for the event
    due: float  # monotonic
    replays: int = 1


class EndpointRepair:
    def __init__(self, set_endpoint: Callable[[str, str], None], *,
                 delay: float = REPAIR_DELAY, capacity: int = REPAIR_CAPACITY,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._set_endpoint = set_endpoint
        self.delay = delay
        self.capacity = capacity
        self._clock = clock
        self._waiting: OrderedDict[str, _Repair] = OrderedDict()  # due order (FIFO)
        # key -> the newest replayed timestamp repaired (or waiting) for it.
        # Installed keys only; forget() drops a key when it leaves the device.
        self._repaired: dict[str, bytes] = {}
        self._cond = threading.Condition()
        self._closed = False
        self.refused = 0  # requests turned away because the queue was full
        self.folded = 0  # requests folded into a repair already waiting
        self.done = 0  # endpoint writes made
        self._thread = threading.Thread(target=self._run, name="repair", daemon=True)
        self._thread.start()

    def request(self, key: str, replayer: str, good: str, timestamp: bytes) -> str:
        """Ask for `key`'s endpoint to be set back to `good` after a replay of an
        initiation stamped `timestamp` (TAI64N) from `replayer`.

        Returns "queued", "folded" (into a repair of that key already waiting),
        "repeat" (a copy of an initiation already repaired for: the data plane
        refuses it) or "refused" (the queue is full).
        """
        with self._cond:
            if timestamp <= self._repaired.get(key, b""):
                return "repeat"
            waiting = self._waiting.get(key)
            if waiting is not None:
                waiting.replayer = replayer
                waiting.replays += 1
                self._repaired[key] = timestamp
                self.folded += 1
                return "folded"
            if len(self._waiting) >= self.capacity:
                self.refused += 1
                return "refused"
            self._repaired[key] = timestamp
            self._waiting[key] = _Repair(key, good, replayer, self._clock() + self.delay)
            self._cond.notify()
            return "queued"

    def __len__(self) -> int:
        with self._cond:
            return len(self._waiting)

    def _next_due(self) -> _Repair | None:
        """Wait for the oldest repair to fall due and take it; None once closed."""
        with self._cond:
            while not self._closed:
                if not self._waiting:
                    self._cond.wait()
                    continue
                first = next(iter(self._waiting.values()))
                wait = first.due - self._clock()
                if wait <= 0:
                    del self._waiting[first.key]
                    return first
                self._cond.wait(wait)
            return None

    def _run(self) -> None:
        while (repair := self._next_due()) is not None:
            try:
                self._set_endpoint(repair.key, repair.good)
                self.done += 1
                events.emit("endpoint_restored", level=logging.WARNING, public_key=repair.key,
                            endpoint=repair.good, replayer=repair.replayer,
                            replays=repair.replays)
            except Exception as e:  # the device refused: log, keep serving others
                log.error("restoring the endpoint of %s failed: %s", repair.key, e)

    def forget(self, key: str) -> None:
        """`key` left the device: a later install starts a new data-plane history."""
        with self._cond:
            self._repaired.pop(key, None)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=5)
