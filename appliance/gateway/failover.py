"""Several registry servers: which one to ask, and moving on when one fails.

Registry servers over one database are interchangeable: any of them answers a
lookup or a feed page the same way (they share the feed's `feed_id`, so a
cursor read from one is valid on the next). The gateway keeps the operator's
order as a preference and tracks each server's health:

- a call goes to the first server that is up; when it fails (unreachable,
  reset, timed out, 5xx, 429) the server is marked down and the same call is
  made at once on the next server, so a registry server dying mid-lookup costs
  the waiting client at most that one extra round trip, not its 5 s retry;
- an answer is not a failure: 404 (unknown or revoked key), 401/403 (our
  token) or any other 4xx would be the same on every server over the same
  database, so the call ends there;
- a down server is left alone for a backoff (1 s, doubling per consecutive
  failure up to 30 s), then `probe` (a scheduler job) asks its /healthz; only
  when it answers does it take calls again. Client lookups never wait on a
  server that is known to be down while another one is up;
- when every server is down, calls still try them all (in order), with the
  jittered pause between rounds that a single server always had.

Health is exported as `wgjit_gateway_registry_up{server=URL}` and in /healthz.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from appliance.gateway import events
from appliance.gateway.metrics import GatewayMetrics
from appliance.registry.client import RegistryClient, RegistryError

log = logging.getLogger(__name__)

T = TypeVar("T")

DOWN_FIRST = 1.0  # seconds a failed server is left alone before the first probe
DOWN_MAX = 30.0  # the longest backoff, for a server that keeps failing
ATTEMPTS = 3  # tries per call, at least one per server
PROBE_EVERY = 1.0  # seconds between looks for down servers due a probe
ROUND_BACKOFF = 0.2  # base of the jittered pause once every server failed in one call


def is_failure(e: RegistryError) -> bool:
    """Did the server fail (so another may answer), rather than answer with an error?"""
    return e.status == 0 or e.status == 429 or e.status >= 500


@dataclass
class Server:
    url: str
    client: RegistryClient
    up: bool = True  # until a call to it fails
    failures: int = 0  # consecutive backoff steps, probes included; reset by any answer
    retry_at: float = 0.0  # monotonic time of the next probe while down
    last_error: str | None = None


class RegistryServers:
    """Registry clients in order of preference, each with its health."""

    def __init__(self, clients: list[RegistryClient], metrics: GatewayMetrics, *,
                 attempts: int = ATTEMPTS, backoff: float = ROUND_BACKOFF,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if not clients:
            raise ValueError("at least one registry server")
        self.servers = [Server(c.base_url, c) for c in clients]
        self.metrics = metrics
        self.attempts = max(attempts, len(self.servers))
        self.backoff = backoff
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        for s in self.servers:
            metrics.registry_up.labels(s.url).set(1)

    def _order(self) -> list[Server]:
        with self._lock:
            return ([s for s in self.servers if s.up]
                    + [s for s in self.servers if not s.up])

    def call(self, fn: Callable[[RegistryClient], T]) -> T:
        """fn(client) on the preferred server, and on the next at once if that one fails.

        Raises the RegistryError of an answer (404, 401, ...) at once, or of the
        last failure when every attempt failed.
        """
        order = self._order()
        n = len(order)
        for attempt in range(self.attempts):
            if attempt and attempt % n == 0:
                # Every server failed once in this call. Full jitter: a herd of
                # gateways must not come back in lockstep.
                self._sleep(random.uniform(0, self.backoff * 2 ** (attempt // n - 1)))
            server = order[attempt % n]
            try:
                result = fn(server.client)
            except RegistryError as e:
                if not is_failure(e):
                    self._answered(server)
                    raise
                self._failed(server, e)
                if attempt + 1 == self.attempts:
                    raise
                if n > 1:
                    self.metrics.registry_failovers.inc()
                continue
            self._answered(server)
            return result
        raise AssertionError("unreachable")

    def probe(self) -> None:
        """Ask each down server whose backoff is over whether it is back."""
        now = self._clock()
        with self._lock:
            due = [s for s in self.servers if not s.up and s.retry_at <= now]
        for server in due:
            try:
                server.client.request("GET", "/healthz")
            except RegistryError as e:
                self._failed(server, e)
            else:
                self._answered(server)

    def _failed(self, server: Server, e: RegistryError) -> None:
        self.metrics.registry_server_failures.labels(server.url).inc()
        now = self._clock()
        with self._lock:
            was_up = server.up
            # Calls that were already under way when the server went down fail
            # together: one outage, one step of the backoff, not one per call.
            if was_up or now >= server.retry_at:
                server.failures += 1
                server.retry_at = now + min(DOWN_MAX, DOWN_FIRST * 2 ** (server.failures - 1))
            server.up = False
            server.last_error = e.message if e.status == 0 else str(e)
            # Under the lock, so that the gauge ends as the state does when
            # one thread's failure and another's answer cross.
            self.metrics.registry_up.labels(server.url).set(0)
        if was_up:
            events.emit("registry_server_down", level=logging.WARNING, server=server.url,
                        error=server.last_error)

    def _answered(self, server: Server) -> None:
        with self._lock:
            was_up = server.up
            server.up = True
            server.failures = 0
            server.last_error = None
            self.metrics.registry_up.labels(server.url).set(1)
        if not was_up:
            events.emit("registry_server_up", server=server.url)

    def health(self) -> list[dict]:
        """Each server's state, in the configured order (for /healthz)."""
        now = self._clock()
        with self._lock:
            return [{"url": s.url, "up": s.up, "failures": s.failures,
                     "last_error": s.last_error,
                     "probe_in": None if s.up else round(max(0.0, s.retry_at - now), 2)}
                    for s in self.servers]
