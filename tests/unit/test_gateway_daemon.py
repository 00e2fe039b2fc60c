"""The daemon's wiring and lifecycle (daemon.py), assembled from its real parts around
an in-memory device, capture and registry: no root, no sockets but the local
/metrics port. The same daemon runs against wireguard-go and a gunicorn registry
in tests/lab/test_gateway_connect.py and test_gateway_daemon_paths.py.
"""

from __future__ import annotations

import logging
import os
import queue
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

from appliance.gateway.capture import Datagram
from appliance.gateway.daemon import GatewaySettings, assemble
from appliance.gateway.metrics import GatewayMetrics
from appliance.gateway.peer import PeerNotFound
from appliance.keys import encode_key, generate_private_key, public_key
from tests.initiations import build_initiation
from tests.unit.test_evict import FakeDevice, sample
from tests.unit.test_feed import FakeRegistry

A, B = "https://192.0.2.2:8080", "https://192.0.2.3:8080"


class FakeCapture:
    def __init__(self) -> None:
        self.inbox: queue.Queue[Datagram] = queue.Queue()
        self.malformed: Counter[str] = Counter()
        self.lag = 0.0
        self.closed = False

    def recv(self, timeout: float | None = None) -> list[Datagram]:
        try:
            return [self.inbox.get(timeout=timeout)]
        except queue.Empty:
            return []

    def close(self) -> None:
        self.closed = True


class FakeSender:
    def send(self, *a: object) -> None:
        pass

    def close(self) -> None:
        pass


class Servers:
    def health(self) -> list[dict]:
        return [{"url": A, "up": True}]

    def probe(self) -> None:
        pass


class Registry(FakeRegistry):
    """The fake registry with the rest of what the daemon asks GatewayRegistry."""

    servers = Servers()

    def health(self) -> str:
        return "ok"

    def keys(self, salt: bytes) -> dict:
        raise PeerNotFound("no /v1/gateway/keys")  # the filter stays off


class Setup:
    def __init__(self, tmp_path: Path, **settings: object) -> None:
        self.dev = FakeDevice()
        self.capture = FakeCapture()
        self.reg = Registry()
        self.private = generate_private_key()
        self.settings = GatewaySettings("wg0", [A, B], "/dev/null", state_dir=str(tmp_path),
                                        metrics_listen="127.0.0.1:0", install_mode="invert",
                                        **settings)
        closing = ExitStack()  # as build_gateway does, for what it opened
        closing.callback(self.capture.close)
        self.gw = assemble(self.settings, closing, metrics=GatewayMetrics(),
                           device=self.dev, private_key=self.private, listen_port=51820,
                           underlay=["eth0"], sender=FakeSender(), capture=self.capture,
                           reinjector=None, registry=self.reg, db_path=tmp_path / "gw.db")

    def initiation(self, client_private: bytes, port: int = 40000) -> Datagram:
        packet = build_initiation(client_private, public_key(self.private))
        return Datagram("192.0.2.50", port, packet, "eth0", "192.0.2.1", 51820)


def wait_for(cond, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_a_registered_client_ends_on_the_device_and_a_stranger_does_not(tmp_path) -> None:
    s = Setup(tmp_path)
    client, stranger = generate_private_key(), generate_private_key()
    key = encode_key(public_key(client))
    s.reg.create(key)
    gw = s.gw
    assert gw.health()[0] is False, "nothing runs before start"
    gw.start()
    try:
        assert gw.health()[0] is True
        s.capture.inbox.put(s.initiation(client))
        s.capture.inbox.put(s.initiation(stranger, port=40001))
        assert wait_for(lambda: key in s.dev.table)
        assert wait_for(lambda: sample(gw.metrics.lookups, outcome="not_found") == 1)
        assert len(s.dev.table) == 1
        assert str(s.dev.table[key].endpoint) == "192.0.2.50:40000"
        # From the installed peer's endpoint: the data plane's business (gate.py).
        s.capture.inbox.put(s.initiation(client))
        assert wait_for(lambda: sample(gw.metrics.drops, reason="served_endpoint") == 1)
        # From a new port (a NAT rebinding): verified, no second lookup.
        s.capture.inbox.put(s.initiation(client, port=40002))
        assert wait_for(lambda: sample(gw.metrics.drops, reason="already_installed") == 1)
        assert gw.parts.installer.get(key).endpoint == "192.0.2.50:40002"
        assert sample(gw.metrics.initiations) == 4 and sample(gw.metrics.verified) == 2
        assert s.reg.peer_calls == 2  # the client once, the stranger once
        ok, detail = gw.health()
        assert ok and detail["installed_peers"] == 1 and detail["registry"] == "ok"
        status = gw.status()  # what `wgjit gateway status` shows
        assert status["status"] == "ok"
        assert status["peers"]["installed"] == 1
        assert status["cache"] == {"found": 1, "not_found": 1}
        assert status["drops_last_minute"] == {"already_installed": 1, "served_endpoint": 1}
        assert status["registry_servers"][0]["up"] is True
    finally:
        gw.stop()
    assert s.capture.closed and not gw.health()[0]


def test_a_stop_before_start_closes_everything_and_returns(tmp_path) -> None:
    s = Setup(tmp_path)
    s.gw.stop()
    assert s.capture.closed


def test_the_device_s_peers_are_adopted_at_assembly(tmp_path) -> None:
    dev_key = encode_key(os.urandom(32))
    d = FakeDevice()
    d.put(dev_key, keepalive=25)  # killed between install and handshake
    gw = assemble(GatewaySettings("wg0", [A], "/dev/null", metrics_listen="127.0.0.1:0"),
                  ExitStack(), metrics=GatewayMetrics(), device=d,
                  private_key=generate_private_key(), listen_port=51820, underlay=["eth0"],
                  sender=FakeSender(), capture=FakeCapture(), reinjector=None,
                  registry=Registry(), db_path=tmp_path / "gw.db")
    try:
        assert dev_key in gw.parts.installer
        assert gw.parts.installer.pending_triggers() == [dev_key], "a leftover trigger"
        assert sample(gw.metrics.installed) == 1
    finally:
        gw.stop()


def test_a_reload_takes_new_tunables_through_the_parts(tmp_path, caplog) -> None:
    s = Setup(tmp_path)
    gw = s.gw
    try:
        gw.start()
        gate = gw.gate
        caplog.set_level(logging.WARNING)
        new = GatewaySettings("wg0", [B], "/dev/null", registry_ca="/b.pem",
                              state_dir=str(tmp_path), idle_timeout=600, evict_interval=7,
                              positive_ttl=60, rate=5, burst=2)
        gw.apply(new)
        # Servers and CA stay until a restart: the clients were built with them.
        assert gw.settings.registries == [A, B] and gw.settings.registry_ca is None
        assert "still using" in caplog.text and "registry_ca changed" in caplog.text
        assert gw.parts.evictor.policy.idle_timeout == 600
        assert gw.parts.cache.policy.positive_ttl == 60
        assert gw.parts.jobs.period("evict") == 7
        assert gw.gate is gate, "the gate's settings did not change: its state stays"
        gw.apply(GatewaySettings("wg0", [A, B], "/dev/null", cookies="always"))
        assert gw.gate is not gate
    finally:
        gw.stop()


def test_the_parts_that_handle_peers_do_not_import_the_http_client() -> None:
    import subprocess
    import sys

    modules = ["cache", "install", "feed", "intake", "provision", "revocation", "handshakes"]
    code = ("import sys\n" + "".join(f"import appliance.gateway.{m}\n" for m in modules)
            + "print(sorted({'requests', 'appliance.gateway.pull'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_checking_the_gateways_settings_does_not_import_the_registry_server() -> None:
    import subprocess
    import sys

    code = ("import sys\nfrom appliance.gateway.settings import OPTIONS\n"
            "check = next(o.check for o in OPTIONS if o.name == 'lookup-batch')\n"
            "assert check(512) is None and '512' in check(513)\n"
            "print(sorted({'flask', 'appliance.registry.gateway'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_a_key_the_fresh_filter_lacks_is_refused_before_the_second_dh(tmp_path) -> None:
    s = Setup(tmp_path)
    gw, client, stranger = s.gw, generate_private_key(), generate_private_key()
    try:
        gw.parts.known.load({"digest_size": 4, "digests": "", "cursor": 0})
        gw.parts.known.add(encode_key(public_key(client)))
        gw.parts.feed.caught_up_at = time.time()  # as a feed poll that reached the head
        gw.on_datagram(s.initiation(stranger))  # the first: queued for a worker's feed read
        assert sample(gw.metrics.verified) == 1 and len(gw.parts.queue) == 1
        gw.on_datagram(s.initiation(generate_private_key(), port=40001))
        assert sample(gw.metrics.drops, reason="unknown_key") == 1
        assert sample(gw.metrics.verified) == 1 and len(gw.parts.queue) == 1
        gw.on_datagram(s.initiation(client, port=40002))
        assert sample(gw.metrics.verified) == 2 and len(gw.parts.queue) == 2
        # A forgery claiming the client's key gets past the filter, not the timestamp.
        forged = build_initiation(stranger, public_key(s.private),
                                  claimed_static=public_key(client))
        gw.on_datagram(Datagram("192.0.2.51", 40000, forged, "eth0", "192.0.2.1", 51820))
        assert sample(gw.metrics.drops, reason="timestamp_aead") == 1
        assert s.reg.peer_calls == 0
    finally:
        gw.parts.closing.close()
