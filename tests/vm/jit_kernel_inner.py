"""Runs INSIDE the quick VM: the just-in-time path on kernel WireGuard, both ends.

Not collected on the host (no test_ prefix); tests/vm/test_jit_kernel.py boots the
VM and runs this file there. The namespace lab is built inside the guest with
kernel WireGuard interfaces (`dataplane="kernel"`), so the daemon drives the
kernel over netlink (`--backend netlink`):

    g1  re-injection (the default)    c1 (IPv4), c3 (IPv6)
    g2  role inversion                c2 (IPv4)

Under emulation everything is an order of magnitude slower than on the host, so
nothing here is timed. "No retry" is read off the wire instead: WireGuard's
response names the initiation it answers (its receiver index is the initiator's
sender index), and a client's retry carries a new sender index.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator

import pytest

from lab.netns import list_netns
from lab.topology import Lab, LabSpec
from tests.lab.gateway_e2e import WireTap, first_reply_after_start, installed, quiet_all, wait_for

SPEC = LabSpec(gateways=["jit", "jit"], clients=3, client_gateways=["g1", "g2", "g1"],
               endpoint_family="mixed", idle_timeout=120, evict_interval=1,
               dataplane="kernel", daemon_args={"g2": ["--install-mode", "invert"]},
               daemon_start_timeout=240)
WAIT = 60.0  # generous: Python under TCG
INITIATION, RESPONSE = 1, 2


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    lab = Lab.up(SPEC)
    try:
        yield lab
    finally:
        prefix = lab.state.prefix
        assert lab.down() == []
        assert not [n for n in list_netns() if n.startswith(prefix)]


def _index(payload: bytes, offset: int) -> int:
    return struct.unpack_from("<I", payload, offset)[0]


def connect_and_watch(lab: Lab, name: str) -> list[tuple[str, int, bytes]]:
    """Start the client's ping; once it is answered, the handshake messages on the
    gateway's underlay to and from that client, as (direction, type, payload)."""
    c = lab.client(name)
    tap = WireTap(lab, c.gateway)
    try:
        lab.connect(name, fresh=True)
        took = first_reply_after_start(lab, name, timeout=WAIT)
        print(f"{name} via {c.gateway}: first reply {took:.2f} s after the ping started")
        ip = c.underlay6 if c.endpoint_family == 6 else c.underlay4
        return [(direction, kind, d.payload) for direction, kind, d in tap.read()
                if ip in (d.src_ip, d.dst_ip)]
    finally:
        tap.close()


@pytest.mark.parametrize("name", ["c1", "c3"])
def test_reinjection_answers_the_clients_first_initiation(lab, name):
    msgs = connect_and_watch(lab, name)
    client_inits = [p for d, k, p in msgs if d == "in" and k == INITIATION]
    responses = [p for d, k, p in msgs if d == "out" and k == RESPONSE]
    # The client initiated; the kernel answered its very first initiation, the one
    # the daemon re-injected, and the gateway never initiated itself.
    assert client_inits and responses, msgs
    assert _index(responses[0], 8) == _index(client_inits[0], 4), "answered a retry"
    assert not [1 for d, k, _ in msgs if d == "out" and k == INITIATION], msgs
    peer = installed(lab, "g1")[lab.client(name).public_key]
    assert peer.persistent_keepalive == 0
    quiet_all(lab)


def test_role_inversion_has_the_gateway_initiate_before_the_clients_retry(lab):
    msgs = connect_and_watch(lab, "c2")
    kinds = [(d, k) for d, k, _ in msgs]
    first_gateway_init = kinds.index(("out", INITIATION))
    # One initiation from the client (captured, never answered), then the kernel's
    # own towards it, answered by the client: no client retry came first.
    assert kinds[:first_gateway_init].count(("in", INITIATION)) == 1, kinds
    assert ("in", RESPONSE) in kinds[first_gateway_init:], kinds
    assert not [1 for d, k in kinds if d == "out" and k == RESPONSE], kinds
    quiet_all(lab)


def test_a_revoked_peer_is_removed_from_the_kernel(lab):
    c1 = lab.client("c1")
    lab.connect("c1", fresh=True)
    first_reply_after_start(lab, "c1", timeout=WAIT)
    assert c1.public_key in installed(lab, "g1")
    lab.registry().revoke_peer(c1.public_key)
    t0 = time.monotonic()
    wait_for(lambda: c1.public_key not in installed(lab, "g1"), WAIT,
             "the revoked peer removed from the kernel device", every=0.5)
    print(f"revoked peer removed {time.monotonic() - t0:.1f} s after the revoke")
    quiet_all(lab)
