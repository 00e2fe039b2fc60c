"""Pull a peer from the registry: typed outcomes over one or several servers.

The gateway token is scoped `gateway`: it can read peers and the change feed,
nothing else, so a stolen gateway cannot rewrite the registry. Which server
answers, and what happens when one fails, is `failover.RegistryServers`' job.
"""

from __future__ import annotations

import logging

import requests

from appliance.gateway.failover import RegistryServers
from appliance.gateway.metrics import GatewayMetrics
from appliance.gateway.peer import (
    CursorMismatch,
    PeerNotFound,
    RegistryPeer,
    RegistryUnavailable,
)
from appliance.registry.client import RegistryClient, RegistryError

log = logging.getLogger(__name__)


class GatewayRegistry:
    """The registry's gateway API (peer lookups, change feed) as the daemon uses it.

    Peer lookups are counted here (`wgjit_gateway_registry_calls_total`, and
    `..._errors_total` for those the registry could not answer), and the last
    one's result is the registry's health in /healthz; each server's own health
    is `servers.health()`.
    """

    def __init__(self, servers: RegistryServers, metrics: GatewayMetrics) -> None:
        self.servers = servers
        self.metrics = metrics
        self.lookups_ok: bool | None = None  # None until the first lookup
        self._batch_route = True  # until a registry without POST /v1/gateway/lookup says 404

    def _call(self, fn, *args):
        try:
            return self.servers.call(lambda client: fn(client, *args))
        except RegistryError as e:
            if e.status == 404:
                raise PeerNotFound(str(e)) from None
            if e.status == 409 and e.error == "cursor_mismatch":
                raise CursorMismatch(e.message) from None
            if e.status in (401, 403):
                # Retrying will not fix a bad token; say so loudly, once per call.
                log.error("registry refused the gateway token: %s", e.message)
            raise RegistryUnavailable(str(e)) from None

    def _lookup_call(self, fn, arg, n_keys: int):
        """One lookup call, counted: a call, its keys, and an error if it got no answer."""
        self.metrics.registry_calls.inc()
        self.metrics.registry_lookup_keys.inc(n_keys)
        try:
            data = self._call(fn, arg)
        except PeerNotFound:
            self.lookups_ok = True  # an answer
            raise
        except RegistryUnavailable:
            self.lookups_ok = False
            self.metrics.registry_errors.inc()
            raise
        self.lookups_ok = True
        return data

    def peer(self, public_key: str) -> RegistryPeer:
        return RegistryPeer.from_json(
            self._lookup_call(RegistryClient.gateway_peer, public_key, 1))

    def health(self) -> str:
        """The last peer lookup: "unknown" (none yet), "ok" or "unavailable"."""
        return {None: "unknown", True: "ok", False: "unavailable"}[self.lookups_ok]

    def lookup(self, keys: list[str]) -> dict[str, RegistryPeer | None]:
        """Each key's peer, or None when the registry says no; one call for them all.

        One key goes the single-lookup way (GET, the registry's fast path). A
        registry older than the batch route gets single lookups, key by key.
        Raises RegistryUnavailable for the whole call; it fails over between
        servers as a single lookup does (failover.py), being one call.
        """
        if len(keys) == 1 or not self._batch_route:
            return {key: self._single(key) for key in keys}
        try:
            answer = self._lookup_call(RegistryClient.gateway_lookup, keys, len(keys))
        except PeerNotFound:
            log.warning("the registry has no POST /v1/gateway/lookup: looking keys up one "
                        "by one")
            self._batch_route = False
            return self.lookup(keys)
        found: dict[str, RegistryPeer | None] = dict.fromkeys(keys)
        for data in answer["peers"]:
            found[data["public_key"]] = RegistryPeer.from_json(data)
        return found

    def _single(self, key: str) -> RegistryPeer | None:
        try:
            return self.peer(key)
        except PeerNotFound:
            return None

    def keys(self, salt: bytes) -> dict:
        """Salted digests of the active keys (keyfilter.py)."""
        return self._call(RegistryClient.gateway_keys, salt)

    def changes(self, since: int, limit: int = 1000, digest: str | None = None) -> dict:
        """A feed page; CursorMismatch when `digest` no longer names the change at `since`."""
        return self._call(RegistryClient.changes, since, limit, digest)


def build_gateway_registry(urls: list[str], token: str, metrics: GatewayMetrics, *,
                           timeout: float = 3.0, ca_file: str | None = None) -> GatewayRegistry:
    """A client per registry server URL, in the order given (the order of preference).

    https:// servers are verified against ca_file (None: the system trust store).
    """
    clients = []
    for url in urls:
        session = requests.Session()
        # Pooled keep-alive connections: a pull is one round trip, not a TCP handshake too.
        adapter = requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=16)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        clients.append(RegistryClient(url, token, timeout=timeout, session=session,
                                      ca_file=ca_file))
    return GatewayRegistry(RegistryServers(clients, metrics), metrics)
