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

    def peer(self, public_key: str) -> RegistryPeer:
        self.metrics.registry_calls.inc()
        try:
            data = self._call(RegistryClient.gateway_peer, public_key)
        except PeerNotFound:
            self.lookups_ok = True  # an answer
            raise
        except RegistryUnavailable:
            self.lookups_ok = False
            self.metrics.registry_errors.inc()
            raise
        self.lookups_ok = True
        return RegistryPeer.from_json(data)

    def health(self) -> str:
        """The last peer lookup: "unknown" (none yet), "ok" or "unavailable"."""
        return {None: "unknown", True: "ok", False: "unavailable"}[self.lookups_ok]

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
