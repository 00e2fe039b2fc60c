"""Replay guard: per initiator key, accept only a strictly newer TAI64N timestamp.

WireGuard's own defence against a replayed initiation is the same rule
(whitepaper 5.1: the responder keeps the greatest timestamp per peer). The
gateway needs its own copy because it acts on a message before the data plane
knows the peer: without it, anyone who recorded one initiation could replay it
to make the gateway pull and install that peer again and again.

Memory is bounded: at most `capacity` keys, least recently accepted evicted
first. About 220 bytes per key on CPython (measured), so the default 100,000 keys
cost ~22 MB. A key that was evicted (or forgotten by a restart) can be replayed
once more. The worst that buys an attacker is one rate-limited registry lookup
and the install of a peer the registry already allows, with the replay's source
as its endpoint: the gateway's own handshake towards it completes only if that is
the real client, and the never-handshaken grace period evicts it otherwise.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

DEFAULT_CAPACITY = 100_000


class ReplayGuard:
    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._latest: OrderedDict[bytes, bytes] = OrderedDict()
        self._lock = threading.Lock()
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._latest)

    def accept(self, public_key: bytes, timestamp: bytes) -> bool:
        """Record and accept `timestamp` if it is newer than any seen for this key.

        Call only with a timestamp that decrypted (Responder.consume_initiation):
        an unauthenticated timestamp recorded here would lock the real client out.
        TAI64N is big-endian, so byte order is time order.
        """
        with self._lock:
            last = self._latest.get(public_key)
            if last is not None and timestamp <= last:
                return False
            self._latest[public_key] = timestamp
            self._latest.move_to_end(public_key)
            while len(self._latest) > self.capacity:
                self._latest.popitem(last=False)
                self.evictions += 1
            return True

    def forget(self, public_key: bytes) -> None:
        with self._lock:
            self._latest.pop(public_key, None)
