"""Which installed peer the gateway last saw at each source address.

An initiation from the address an installed peer is served at is that peer's
rekey or retry (every active client rekeys every 2 minutes): the data plane
answers it, and the daemon has nothing to learn from it. Recognising the
source skips the two X25519 operations for it, so the verification budget goes
to newcomers. A forged packet from that address costs the data plane what it
always did and the daemon nothing.

One caveat, accepted: if another client takes over an address and port an
installed peer still points at (NAT port reuse), the daemon ignores the
newcomer's initiations until that peer moves or is evicted.
"""

from __future__ import annotations

import threading


class ServedEndpoints:
    """endpoint (host:port) <-> public key, for installed peers; one endpoint per key."""

    def __init__(self) -> None:
        self._by_endpoint: dict[str, str] = {}
        self._by_key: dict[str, str] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._by_key)

    def serving(self, endpoint: str) -> str | None:
        """The key of the installed peer served at `endpoint`, if any."""
        return self._by_endpoint.get(endpoint)

    def note(self, key: str, endpoint: str) -> None:
        """`key` is installed and was last seen at `endpoint`."""
        with self._lock:
            old = self._by_key.get(key)
            if old == endpoint:
                return
            if old is not None and self._by_endpoint.get(old) == key:
                del self._by_endpoint[old]
            other = self._by_endpoint.get(endpoint)
            if other is not None and self._by_key.get(other) == endpoint:
                del self._by_key[other]  # the address moved to another key
            self._by_endpoint[endpoint] = key
            self._by_key[key] = endpoint

    def drop(self, key: str) -> None:
        """`key` is no longer installed."""
        with self._lock:
            endpoint = self._by_key.pop(key, None)
            if endpoint is not None and self._by_endpoint.get(endpoint) == key:
                del self._by_endpoint[endpoint]
