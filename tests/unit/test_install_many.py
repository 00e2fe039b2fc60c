"""Installer.install_many: a worker's batch written to the device in one call.

Against an in-memory device; the same path runs against real wireguard-go in
tests/lab/test_gateway_connect.py and bench/herd.py.
"""

from __future__ import annotations

from collections.abc import Iterable

import pytest

from appliance.gateway.install import Installer
from appliance.gateway.overlap import OverlapRefused
from appliance.gateway.peer import RegistryPeer
from appliance.wg import PeerConfig, WgError
from tests.unit.test_evict import FakeDevice, key

ENDPOINT = "198.51.100.2:41000"


class CountingDevice(FakeDevice):
    """Records each set_peers call; refuses any batch holding a key in `refuse`."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[list[str]] = []
        self.refuse: set[str] = set()

    def set_peers(self, peers: Iterable[PeerConfig], *, update_only: bool = False) -> None:
        peers = list(peers)
        self.calls.append([p.public_key for p in peers])
        for p in peers:  # applied in order up to the bad one, as wireguard-go does
            if p.public_key in self.refuse:
                raise WgError("invalid argument")
            super().set_peers([p], update_only=update_only)


def peer(k: str, net: str) -> RegistryPeer:
    return RegistryPeer(k, (net,), None)


def test_a_batch_is_one_device_call_and_every_peer_is_installed() -> None:
    dev = CountingDevice()
    inst = Installer(dev)
    keys = [key() for _ in range(32)]
    results = inst.install_many([(peer(k, f"198.18.1.{i}/32"), ENDPOINT)
                                 for i, k in enumerate(keys)], reinject=True)
    assert results == dict.fromkeys(keys, True)
    assert dev.calls == [keys]
    assert set(dev.table) == set(keys) and all(k in inst for k in keys)
    assert sorted(inst.pending_triggers()) == sorted(keys)
    assert all(inst.is_reinjected(k) for k in keys)


def test_installed_peers_and_overlaps_are_answered_per_key_without_a_device_write() -> None:
    dev = CountingDevice()
    inst = Installer(dev)
    old, new, clash = key(), key(), key()
    inst.install(peer(old, "198.18.1.1/32"), ENDPOINT)
    dev.calls.clear()
    results = inst.install_many([(peer(old, "198.18.1.1/32"), ENDPOINT),
                                 (peer(new, "198.18.2.0/24"), ENDPOINT),
                                 (peer(clash, "198.18.2.7/32"), ENDPOINT)])  # inside new's
    assert results[old] is False and results[new] is True
    assert isinstance(results[clash], OverlapRefused)
    assert dev.calls == [[new]] and clash not in inst and clash not in dev.table


def test_a_refused_batch_is_rewritten_peer_by_peer_so_only_the_bad_one_fails() -> None:
    dev = CountingDevice()
    inst = Installer(dev)
    a, bad, c = key(), key(), key()
    dev.refuse.add(bad)
    results = inst.install_many([(peer(a, "198.18.1.1/32"), ENDPOINT),
                                 (peer(bad, "198.18.1.2/32"), ENDPOINT),
                                 (peer(c, "198.18.1.3/32"), ENDPOINT)])
    assert results[a] is True and results[c] is True
    assert isinstance(results[bad], WgError)
    assert dev.calls == [[a, bad, c], [a], [bad], [c]]
    assert a in inst and c in inst and bad not in inst
    # The failed peer's network is free again: another key may hold it.
    other = key()
    assert inst.install(peer(other, "198.18.1.2/32"), ENDPOINT)


def test_install_of_one_peer_raises_what_the_batch_answers() -> None:
    dev = CountingDevice()
    inst = Installer(dev)
    bad = key()
    dev.refuse.add(bad)
    with pytest.raises(WgError):
        inst.install(peer(bad, "198.18.1.2/32"), ENDPOINT)
    assert dev.calls == [[bad]] and bad not in inst
