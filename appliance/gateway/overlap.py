"""Which installed peer holds which network, and refusing a peer that would share one.

All tenants' peers sit on one WireGuard interface, where an allowed IP belongs
to one peer only: installing a second peer with it moves it there, and the
first peer's traffic with it. The registry keeps allowed IPs unique across
tenants, but a gateway must not trust that alone (an older database, a bug, a
row written behind the API's back): a peer whose networks overlap another
installed peer's is refused, counted under the drop reason "overlap", and
logged at most once per key every LOG_EVERY seconds (a refused client retries
every 5 s for as long as it wants in).

Two CIDRs overlap only when one contains the other. So a new network N
overlaps an installed one M when M starts inside N (a sorted list of starts,
bisected), or when M is a strict supernet of N: one dict probe per prefix
length that is installed at all (a gateway holds a handful of lengths, e.g.
/32 and /128). Both stay exact even if installed networks overlap one another
(peers adopted after a restart, whose networks the gateway learns later).
"""

from __future__ import annotations

import bisect
import ipaddress
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable

from appliance.gateway import events
from appliance.wg.model import parse_network

# A refused key is logged again after this many seconds at the earliest.
LOG_EVERY = 60.0
# Keys remembered for that; past this many the memory starts afresh (one burst of logs).
LOG_KEYS_MAX = 4096
DROP_REASON = "overlap"

Net = tuple[int, int, int, int]  # (family, prefix length, first address, last address)


class OverlapRefused(Exception):
    """The peer's `network` overlaps `other_network` of installed peer `other_key`."""

    def __init__(self, public_key: str, network: str, other_key: str,
                 other_network: str) -> None:
        super().__init__(f"{network} of {public_key} overlaps {other_network} of {other_key}")
        self.public_key = public_key
        self.network = network
        self.other_key = other_key
        self.other_network = other_network


def parse(text: str) -> Net:
    net = parse_network(text)  # its fast parser, and its cache (model.py)
    first = int(net.network_address)
    return (net.version, net.prefixlen, first, first | int(net.hostmask))


def _text(n: Net) -> str:
    kind = ipaddress.IPv4Network if n[0] == 4 else ipaddress.IPv6Network
    return str(kind((n[2], n[1])))


class OverlapGuard:
    """The networks of installed peers, indexed for overlap checks.

    `on_refused(e)` hears every refusal (the daemon counts it); logging is done
    here, rate-limited per key. Safe for several threads.
    """

    def __init__(self, on_refused: Callable[[OverlapRefused], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.on_refused = on_refused
        self._clock = clock
        self._lock = threading.Lock()
        # Per family: sorted (first, last, prefix, key) of every installed network.
        self._starts: dict[int, list[tuple[int, int, int, str]]] = {4: [], 6: []}
        # (family, prefix, first) -> keys holding exactly that network.
        self._exact: dict[tuple[int, int, int], set[str]] = {}
        self._prefixes: dict[int, Counter[int]] = {4: Counter(), 6: Counter()}
        self._held: dict[str, tuple[Net, ...]] = {}
        self._logged: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._held)

    def clash(self, public_key: str, networks: Iterable[str]) -> OverlapRefused | None:
        """The first overlap of `networks` with another key's installed ones, or None."""
        with self._lock:
            for text in networks:
                found = self._find(public_key, parse(text))
                if found is not None:
                    return OverlapRefused(public_key, text, found[0], _text(found[1]))
        return None

    def _find(self, key: str, n: Net) -> tuple[str, Net] | None:
        family, prefix, first, last = n
        starts = self._starts[family]
        # Installed networks starting inside n.
        i = bisect.bisect_left(starts, (first,))
        while i < len(starts) and starts[i][0] <= last:
            s_first, s_last, s_prefix, s_key = starts[i]
            if s_key != key:
                return s_key, (family, s_prefix, s_first, s_last)
            i += 1
        # Installed networks containing n (starting before it: strict supernets).
        bits = 32 if family == 4 else 128
        for p in self._prefixes[family]:
            if p >= prefix:
                continue
            start = first & ~((1 << (bits - p)) - 1)
            holders = self._exact.get((family, p, start), ())
            for other in holders:
                if other != key:
                    return other, (family, p, start, start | ((1 << (bits - p)) - 1))
        return None

    def refuse(self, e: OverlapRefused) -> None:
        """Count (through on_refused) and log, at most every LOG_EVERY s per key."""
        if self.on_refused is not None:
            self.on_refused(e)
        now = self._clock()
        with self._lock:
            last = self._logged.get(e.public_key)
            if last is not None and now - last < LOG_EVERY:
                return
            if len(self._logged) >= LOG_KEYS_MAX:
                self._logged.clear()
            self._logged[e.public_key] = now
        events.emit("peer_refused", level=logging.WARNING, public_key=e.public_key,
                    reason=DROP_REASON, network=e.network, overlaps_key=e.other_key,
                    overlaps_network=e.other_network)

    def hold(self, public_key: str, networks: Iterable[str] | None) -> None:
        """Record the networks `public_key` now holds (replacing what it held).
        None (an adopted peer's networks are unknown) records nothing."""
        with self._lock:
            self._release(public_key)
            if networks is None:
                return
            held = tuple(parse(t) for t in networks)
            for family, prefix, first, last in held:
                bisect.insort(self._starts[family], (first, last, prefix, public_key))
                self._exact.setdefault((family, prefix, first), set()).add(public_key)
                self._prefixes[family][prefix] += 1
            self._held[public_key] = held

    def release(self, public_keys: Iterable[str]) -> None:
        with self._lock:
            for key in public_keys:
                self._release(key)

    def _release(self, key: str) -> None:
        for family, prefix, first, last in self._held.pop(key, ()):
            starts = self._starts[family]
            i = bisect.bisect_left(starts, (first, last, prefix, key))
            if i < len(starts) and starts[i] == (first, last, prefix, key):
                del starts[i]
            holders = self._exact.get((family, prefix, first))
            if holders is not None:
                holders.discard(key)
                if not holders:
                    del self._exact[(family, prefix, first)]
            self._prefixes[family][prefix] -= 1
            if not self._prefixes[family][prefix]:
                del self._prefixes[family][prefix]
