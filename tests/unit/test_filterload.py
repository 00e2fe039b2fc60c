"""Loading the known-key filter as a job (filterload.py): retried while the registry
is down, not asked again soon by a registry without the endpoint. The real
endpoint: tests/registry/test_gateway_keys.py; the daemon with it:
tests/lab/test_gateway_flood.py."""

from __future__ import annotations

from appliance.gateway.filterload import KNOWN_KEYS_RELOAD, FilterLoader
from appliance.gateway.keyfilter import KnownKeys
from appliance.gateway.metrics import GatewayMetrics
from appliance.gateway.peer import PeerNotFound, RegistryUnavailable
from tests.unit.test_evict import sample


class Registry:
    def __init__(self) -> None:
        self.answer: Exception | None = None
        self.asked = 0

    def keys(self, salt: bytes) -> dict:
        self.asked += 1
        if self.answer is not None:
            raise self.answer
        return {"digest_size": 4, "digests": "", "cursor": 7}

    def changes(self, since: int, limit: int = 1000) -> dict:
        return {"changes": [], "cursor": since, "more": False}


def make() -> tuple[FilterLoader, Registry, KnownKeys, list[float], GatewayMetrics]:
    reg, known, now, metrics = Registry(), KnownKeys(), [0.0], GatewayMetrics()
    return (FilterLoader(known, reg.keys, reg.changes, metrics, clock=lambda: now[0]),
            reg, known, now, metrics)


def test_down_is_retried_every_run_then_loaded_then_reloaded_hourly() -> None:
    loader, reg, known, now, metrics = make()
    reg.answer = RegistryUnavailable("down")
    loader.run()
    loader.run()
    assert reg.asked == 2 and not known.loaded
    reg.answer = None
    loader.run()
    assert known.loaded and known.cursor == 7 and reg.asked == 3
    assert sample(metrics.known_keys) == 0  # an empty registry
    now[0] += KNOWN_KEYS_RELOAD / 2
    loader.run()
    assert reg.asked == 3
    now[0] += KNOWN_KEYS_RELOAD / 2
    loader.run()
    assert reg.asked == 4


def test_a_registry_without_the_endpoint_is_asked_again_only_at_the_reload() -> None:
    loader, reg, known, now, _ = make()
    reg.answer = PeerNotFound("404")
    loader.run()
    loader.run()
    assert reg.asked == 1 and not known.loaded, "every key is looked up meanwhile"
    now[0] += KNOWN_KEYS_RELOAD
    loader.run()
    assert reg.asked == 2
