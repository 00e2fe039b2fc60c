"""The RTT-emulating lab: a delaying relay between clients and gateways.

One lab: g1 jit (re-injection, the default), g2 plain; c1 (IPv4) and c3 (IPv6)
on g1 with the lab's 100 ms, c2 on g2 with its own 60 ms. Only lower bounds on
time are asserted (a relay cannot deliver early; a busy machine can be late).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lab.topology import Lab, LabError, LabSpec
from tests.lab.gateway_e2e import (
    JIT_CONNECT_LIMIT,
    WireTap,
    first_reply_after_start,
    installed,
    key_events,
    quiet_all,
    wait_for,
)

pytestmark = [pytest.mark.lab]

RTT = 100.0
LAB_SPEC = {"gateways": ["jit", "plain"], "clients": 3, "registry": "yes",
            "client_gateways": ["g1", "g2", "g1"], "endpoint_family": "mixed",
            "rtt": RTT, "client_rtt": {"c2": 60.0}}

_TIME = re.compile(r"time=([\d.]+) ms")


@pytest.fixture(autouse=True)
def _quiet_after(lab: Lab):
    yield
    quiet_all(lab)


def ping_times(lab: Lab, name: str) -> list[float]:
    return [float(m) for m in _TIME.findall(Path(lab.client(name).ping_log).read_text())]


def test_every_packet_waits_the_clients_round_trip_time(lab: Lab) -> None:
    lab.provision("c2")
    for name, rtt in (("c1", RTT), ("c2", 60.0)):
        lab.connect(name, fresh=True)
        times = wait_for(lambda name=name: len(ping_times(lab, name)) >= 4
                         and ping_times(lab, name), 10, f"{name}'s pings")
        assert min(times) >= rtt, times
    # A new handshake and its first data take two round trips.
    assert ping_times(lab, "c2")[0] >= 2 * 60.0


def test_gateway_sees_the_relay_as_the_endpoint(lab: Lab) -> None:
    lab.provision("c2")
    lab.connect("c2", fresh=True)
    first_reply_after_start(lab, "c2")
    flows = lab.relay_flows()
    peer = installed(lab, "g2")[lab.client("c2").public_key]
    assert peer.endpoint in flows  # the relay's upstream socket, like a NAT
    assert flows[peer.endpoint].startswith(f"[{lab.client('c2').underlay6}]:")


@pytest.mark.parametrize("name", ["c1", "c3"])
def test_reinjection_through_the_relay_keeps_the_client_the_initiator(
        lab: Lab, name: str) -> None:
    c = lab.client(name)
    wire = WireTap(lab, "g1")
    try:
        lab.connect(name, fresh=True)
        assert first_reply_after_start(lab, name) < JIT_CONNECT_LIMIT
        wait_for(lambda: key_events(lab, "g1", c.public_key, "handshake_completed"), 5,
                 f"{name}'s handshake")
        assert key_events(lab, "g1", c.public_key, "reinjection_answered")
        assert not key_events(lab, "g1", c.public_key, "reinjection_fallback")
        endpoint = installed(lab, "g1")[c.public_key].endpoint
        relay_ip = endpoint.rpartition(":")[0].strip("[]")
        msgs = wire.messages(relay_ip)
        assert ("out", 1) not in msgs and ("out", 2) in msgs, msgs
    finally:
        wire.close()
    # At least the two round trips a pre-provisioned client needs.
    assert ping_times(lab, name)[0] >= 2 * RTT


def test_bad_rtt_is_refused() -> None:
    with pytest.raises(LabError, match="rtt"):
        LabSpec(rtt=-1).check()
    with pytest.raises(LabError, match="client_rtt: no client 'c9'"):
        LabSpec(clients=2, client_rtt={"c9": 10}).check()
