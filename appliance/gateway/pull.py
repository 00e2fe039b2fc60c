"""Pull a peer from the registry: timeouts, jittered retries, typed outcomes.

The gateway token is scoped `gateway`: it can read peers and the change feed,
nothing else, so a stolen gateway cannot rewrite the registry.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass

import requests

from appliance.registry.client import RegistryClient, RegistryError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RegistryPeer:
    """What a gateway needs to install a peer."""

    public_key: str
    allowed_ips: tuple[str, ...]
    preshared_key: str | None
    tenant: str = ""

    @classmethod
    def from_json(cls, data: dict) -> RegistryPeer:
        return cls(data["public_key"], tuple(data["allowed_ips"]), data.get("preshared_key"),
                   data.get("tenant", ""))

    def to_json(self) -> dict:
        return {"public_key": self.public_key, "allowed_ips": list(self.allowed_ips),
                "preshared_key": self.preshared_key, "tenant": self.tenant}


class PeerNotFound(Exception):
    """The registry says no: unknown or revoked."""


class RegistryUnavailable(Exception):
    """The registry could not answer (down, timing out, 5xx, refusing our token)."""


class GatewayRegistry:
    def __init__(self, url: str, token: str, *, timeout: float = 3.0, attempts: int = 3,
                 backoff: float = 0.2) -> None:
        session = requests.Session()
        # Pooled keep-alive connections: a pull is one round trip, not a TCP handshake too.
        adapter = requests.adapters.HTTPAdapter(pool_connections=2, pool_maxsize=16)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        self.client = RegistryClient(url, token, timeout=timeout, session=session)
        self.attempts = attempts
        self.backoff = backoff
        self.calls = 0
        self.errors = 0

    def _call(self, fn, *args):
        for attempt in range(1, self.attempts + 1):
            self.calls += 1
            try:
                return fn(*args)
            except RegistryError as e:
                if e.status == 404:
                    raise PeerNotFound(str(e)) from None
                self.errors += 1
                if e.status in (401, 403):
                    # Retrying will not fix a bad token; say so loudly, once per call.
                    log.error("registry refused the gateway token: %s", e.message)
                    raise RegistryUnavailable(str(e)) from None
                if attempt == self.attempts:
                    raise RegistryUnavailable(str(e)) from None
                # Full jitter: a herd of gateways must not retry in lockstep.
                time.sleep(random.uniform(0, self.backoff * 2 ** (attempt - 1)))
        raise AssertionError("unreachable")

    def peer(self, public_key: str) -> RegistryPeer:
        return RegistryPeer.from_json(self._call(self.client.gateway_peer, public_key))

    def changes(self, since: int, limit: int = 1000) -> dict:
        return self._call(self.client.changes, since, limit)
