"""Install modes against an in-memory device: what each puts on the device, the
fallback from re-injection to role inversion, and the setting's sources.

The same paths run against real wireguard-go in tests/lab/test_reinject.py.
"""

from __future__ import annotations

import pytest

from appliance.cli import build_parser
from appliance.config import ConfigError
from appliance.gateway.cli import settings_from
from appliance.gateway.install import REINJECT_DEADLINE, TRIGGER_KEEPALIVE, Installer
from appliance.gateway.modes import DEFAULT_INSTALL_MODE
from appliance.gateway.peer import RegistryPeer
from tests.unit.test_evict import FakeDevice, key

ENDPOINT = "198.51.100.2:41000"


def peer(k: str) -> RegistryPeer:
    return RegistryPeer(k, ("198.18.1.4/32",), None)


def test_reinject_installs_a_responder_watched_until_its_handshake() -> None:
    dev, k = FakeDevice(), key()
    inst = Installer(dev)
    assert inst.install(peer(k), ENDPOINT, reinject=True)
    on_device = dev.table[k]
    # No endpoint and no keepalive: the device sends nothing of its own; the
    # re-injected initiation gives it the client's endpoint.
    assert on_device.endpoint is None and on_device.persistent_keepalive == 0
    assert inst.pending_triggers() == [k] and inst.is_reinjected(k)
    assert not inst.retrigger_due(k, 1e12)  # crossed handshakes need a gateway initiation
    inst.reinjection_answered(k)
    assert not inst.is_reinjected(k) and inst.pending_triggers() == [k]
    assert not inst.reinjection_overdue(k, 1e12)
    inst.handshake_done([k])
    assert inst.pending_triggers() == []
    assert dev.table[k].persistent_keepalive == 0


def test_unanswered_reinjection_falls_back_to_role_inversion() -> None:
    dev, k = FakeDevice(), key()
    inst = Installer(dev)
    inst.install(peer(k), ENDPOINT, reinject=True)
    put_at = inst.get(k).triggered_at
    assert not inst.reinjection_overdue(k, put_at + REINJECT_DEADLINE / 2)
    assert inst.reinjection_overdue(k, put_at + REINJECT_DEADLINE * 2)
    assert inst.fall_back(k)
    assert str(dev.table[k].endpoint) == ENDPOINT
    assert dev.table[k].persistent_keepalive == TRIGGER_KEEPALIVE
    assert not inst.fall_back(k)  # once
    assert not inst.reinjection_overdue(k, 1e12)
    # From here on it is a role-inversion peer: crossed handshakes are broken,
    # and the trigger is cleared after the handshake.
    assert inst.retrigger_due(k, 1e12)
    inst.handshake_done([k])
    assert dev.table[k].persistent_keepalive == 0


def test_no_fallback_without_role_inversion() -> None:
    dev, k = FakeDevice(), key()
    inst = Installer(dev, trigger_keepalive=0)
    inst.install(peer(k), ENDPOINT, reinject=True)
    assert not inst.fall_back(k)
    assert dev.table[k].endpoint is None and dev.table[k].persistent_keepalive == 0


def test_invert_installs_endpoint_and_trigger() -> None:
    dev, k = FakeDevice(), key()
    inst = Installer(dev)
    inst.install(peer(k), ENDPOINT)
    assert str(dev.table[k].endpoint) == ENDPOINT
    assert dev.table[k].persistent_keepalive == TRIGGER_KEEPALIVE
    assert not inst.is_reinjected(k) and not inst.fall_back(k)


def _mode(*argv: str) -> str:
    args = build_parser().parse_args(["gateway", "run", "--interface", "wg0", "--registry",
                                      "https://r", "--token-file", "t", *argv])
    return settings_from(args)[0].install_mode


def test_install_mode_from_flag_environment_and_file(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("WGJIT_INSTALL_MODE", raising=False)
    assert _mode() == DEFAULT_INSTALL_MODE == "reinject"
    conf = tmp_path / "g.toml"
    conf.write_text('[gateway]\ninstall_mode = "invert"\n')
    assert _mode("--config", str(conf)) == "invert"
    monkeypatch.setenv("WGJIT_INSTALL_MODE", "reinject")
    assert _mode("--config", str(conf)) == "reinject"
    assert _mode("--config", str(conf), "--install-mode", "invert") == "invert"
    monkeypatch.delenv("WGJIT_INSTALL_MODE")
    conf.write_text('[gateway]\ninstall_mode = "inject"\n')
    with pytest.raises(ConfigError, match=r"gateway.install_mode: must be reinject or invert"):
        _mode("--config", str(conf))
