"""Runs INSIDE the quick VM (kernel WireGuard): the shared backend cases against the
netlink backend. Not collected on the host (no test_ prefix); tests/vm/test_wg_netlink.py
boots the VM and runs this file there."""

from __future__ import annotations

import os
import secrets

import pytest
from pyroute2.netlink.generic.wireguard import wgmsg

from appliance.keys import encode_key
from appliance.wg import PeerConfig
from lab.netns import Cleanup, list_netns
from tests import wgcases


@pytest.fixture
def rig():
    cleanup = Cleanup()
    r = wgcases.Rig("netlink", cleanup)
    try:
        yield r
    finally:
        problems = cleanup.run()
        assert not problems, problems
        assert not [n for n in list_netns() if n.startswith(r.prefix)]
        assert not [s for s in os.listdir("/var/run/wireguard") if s.startswith(r.prefix)] \
            if os.path.isdir("/var/run/wireguard") else True


@pytest.mark.parametrize("case", wgcases.ALL_CASES, ids=lambda c: c.__name__[5:])
def test_netlink(rig, case):
    case(rig)


def test_dump_really_splits_peers_across_messages(rig):
    """The big-dump case proves the merge only if the kernel really splits a peer's
    allowed IPs across messages: check that on the raw messages, read with
    pyroute2's own decoder."""
    dev, _, _ = rig.device("r")
    dev.set_peers([PeerConfig(encode_key(secrets.token_bytes(32)),
                              allowed_ips=[wgcases.tunnel4(i * 20 + j) for j in range(20)])
                   for i in range(300)])
    messages = []
    for raw in dev.dump_messages():
        m = wgmsg(raw)
        m.decode()
        messages.append(m)
    per_message = [[p.get_attr("WGPEER_A_PUBLIC_KEY")
                    for p in m.get_attr("WGDEVICE_A_PEERS") or ()] for m in messages]
    assert len(messages) > 1
    crossing = [i for i in range(1, len(per_message))
                if per_message[i] and per_message[i - 1]
                and per_message[i][0] == per_message[i - 1][-1]]
    assert crossing, "no peer continued into the next message"
    flat = [k for keys in per_message for k in keys]
    assert len(flat) > 300 and len(set(flat)) == 300  # what a naive flatten gets wrong
    peers = dev.peers()
    assert len(peers) == 300 and all(len(p.allowed_ips) == 20 for p in peers)
    print(f"dump: {len(messages)} messages, {len(crossing)} peers split across two")
