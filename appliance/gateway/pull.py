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
from appliance.gateway.peer import PeerNotFound, RegistryPeer, RegistryUnavailable
from appliance.registry.client import RegistryClient, RegistryError

log = logging.getLogger(__name__)


class GatewayRegistry:
    """The registry's gateway API (peer lookups, change feed) as the daemon uses it."""

    def __init__(self, servers: RegistryServers) -> None:
        self.servers = servers

    def _call(self, fn, *args):
        try:
            return self.servers.call(lambda client: fn(client, *args))
        except RegistryError as e:
            if e.status == 404:
                raise PeerNotFound(str(e)) from None
            if e.status in (401, 403):
                # Retrying will not fix a bad token; say so loudly, once per call.
                log.error("registry refused the gateway token: %s", e.message)
            raise RegistryUnavailable(str(e)) from None

    def peer(self, public_key: str) -> RegistryPeer:
        return RegistryPeer.from_json(self._call(RegistryClient.gateway_peer, public_key))

    def keys(self, salt: bytes) -> dict:
        """Salted digests of the active keys (keyfilter.py)."""
        return self._call(RegistryClient.gateway_keys, salt)

    def changes(self, since: int, limit: int = 1000) -> dict:
        return self._call(RegistryClient.changes, since, limit)


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
    return GatewayRegistry(RegistryServers(clients, metrics))
