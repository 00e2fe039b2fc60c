"""Per-source limits on handshake initiations, before the expensive work.

Anyone who knows the gateway's public key can send initiations that pass mac1;
each costs two X25519 operations (~110 us) and, for a key we have not seen, a
place in the lookup queue. WireGuard itself meters handshake messages per
source: 20 a second with a burst of 5, per IPv4 address or IPv6 /64 (the
smallest block one subscriber is usually given; limiting single IPv6 addresses
would let one host rotate through 2^64 of them). The gateway uses the same
numbers: a real client sends at most one initiation per REKEY_TIMEOUT (5 s)
per peer, so only a crowd behind one NAT address comes near 20/s.

Memory is bounded two ways: an entry idle for EXPIRE_AFTER seconds is dropped
(its bucket is full again by then, so forgetting it changes no decision), and
at most `max_sources` are tracked, the least recently seen going first. A
flood from more than `max_sources` addresses a second can so reset a bucket
early; such a flood is spoofed and is what cookie replies are for (cookie.py).

Bytes and time in, decisions out: no I/O, and the clock is injected.
Not thread-safe: the capture thread is its only caller.
"""

from __future__ import annotations

import socket
import time
from collections import OrderedDict
from collections.abc import Callable

PACKETS_PER_SECOND = 20.0
PACKETS_BURSTABLE = 5
# A bucket refills completely in burst/rate = 0.25 s; after 1 s idle it is full.
EXPIRE_AFTER = 1.0
# ~220 bytes per tracked source on CPython (tracemalloc): 65,536 sources cost 14.5 MB.
MAX_SOURCES = 65_536
IPV6_PREFIX_BYTES = 8  # /64
_V4_MAPPED = bytes(10) + b"\xff\xff"


def source_key(ip: str) -> bytes:
    """What one source is: the IPv4 address, or the /64 of an IPv6 address.

    An IPv4-mapped IPv6 address counts as the IPv4 address it carries.
    inet_pton rather than ipaddress: 0.3 us against 5 us a packet, which was
    most of the limiter's cost (addresses come from the capture's inet_ntop).
    """
    if ":" in ip:
        packed = socket.inet_pton(socket.AF_INET6, ip)
        if packed[:12] == _V4_MAPPED:
            return packed[12:]
        return packed[:IPV6_PREFIX_BYTES]
    return socket.inet_pton(socket.AF_INET, ip)


class SourceLimiter:
    """A token bucket per source, refilled lazily when the source is seen."""

    def __init__(self, rate: float = PACKETS_PER_SECOND, burst: int = PACKETS_BURSTABLE, *,
                 max_sources: int = MAX_SOURCES, expire_after: float = EXPIRE_AFTER,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0 or burst < 1 or max_sources < 1:
            raise ValueError("rate must be > 0, burst and max_sources >= 1")
        self.rate = rate
        self.burst = burst
        self.max_sources = max_sources
        self.expire_after = expire_after
        self._clock = clock
        # source -> [tokens, last refill]; ordered by last use, oldest first.
        self._buckets: OrderedDict[bytes, list[float]] = OrderedDict()
        self.evicted = 0  # entries dropped for the cap before they expired

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, ip: str) -> bool:
        """Spend one token of `ip`'s source; False when it has none left."""
        now = self._clock()
        self._expire(now)
        key = source_key(ip)
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_sources:
                self._buckets.popitem(last=False)
                self.evicted += 1
            self._buckets[key] = [self.burst - 1.0, now]
            return True
        self._buckets.move_to_end(key)
        tokens = min(float(self.burst), bucket[0] + (now - bucket[1]) * self.rate)
        bucket[1] = now
        if tokens < 1.0:
            bucket[0] = tokens
            return False
        bucket[0] = tokens - 1.0
        return True

    def _expire(self, now: float) -> None:
        # Oldest first, so the loop stops at the first entry still in use.
        buckets = self._buckets
        while buckets:
            key, (_, stamp) = next(iter(buckets.items()))
            if now - stamp < self.expire_after:
                return
            del buckets[key]
