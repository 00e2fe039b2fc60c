"""Loading the known-key filter (keyfilter.py) from the registry, as a scheduled job.

The job runs every KNOWN_KEYS_RETRY seconds: until the filter is loaded each run
tries, after that a run reloads only once KNOWN_KEYS_RELOAD has passed (the feed
adds new keys in between; a rebuild drops revoked ones).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from appliance.gateway import events
from appliance.gateway.keyfilter import KnownKeys, load_filter
from appliance.gateway.metrics import GatewayMetrics
from appliance.gateway.peer import PeerNotFound, RegistryUnavailable

log = logging.getLogger(__name__)

KNOWN_KEYS_RETRY = 30.0
KNOWN_KEYS_RELOAD = 3600.0


class FilterLoader:
    def __init__(self, known: KnownKeys, keys: Callable[[bytes], dict],
                 changes: Callable[[int], dict], metrics: GatewayMetrics,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.known = known
        self._keys = keys  # GatewayRegistry.keys
        self._changes = changes  # GatewayRegistry.changes
        self.metrics = metrics
        self._clock = clock
        self._loaded_at = float("-inf")

    def run(self) -> None:
        if self._clock() - self._loaded_at < KNOWN_KEYS_RELOAD:
            return
        try:
            load_filter(self.known, self._keys, self._changes)
        except PeerNotFound:
            log.warning("the registry has no /v1/gateway/keys: no known-key filter; "
                        "every key is looked up")
            self._loaded_at = self._clock()  # ask again at the next reload
            return
        except RegistryUnavailable as e:
            log.warning("known-key filter not loaded (registry unavailable: %s); retrying "
                        "in %.0f s", e, KNOWN_KEYS_RETRY)
            return
        self._loaded_at = self._clock()
        self.metrics.known_keys.set(len(self.known))
        events.emit("known_keys_loaded", keys=len(self.known),
                    bytes=self.known.memory_bytes(), cursor=self.known.cursor)
