"""The uapi backend against real wireguard-go in lab namespaces (tests/wgcases.py has
the cases; the netlink backend runs the same ones in a VM: tests/vm/test_wg_netlink.py)."""

from __future__ import annotations

import os

import pytest

from lab.netns import Cleanup, list_netns
from tests import wgcases

pytestmark = pytest.mark.lab


@pytest.fixture
def rig():
    cleanup = Cleanup()
    r = wgcases.Rig("uapi", cleanup)
    try:
        yield r
    finally:
        problems = cleanup.run()
        assert not problems, problems
        # Nothing of this run is left behind: namespaces, sockets.
        assert not [n for n in list_netns() if n.startswith(r.prefix)]
        assert not [s for s in os.listdir("/var/run/wireguard") if s.startswith(r.prefix)]


@pytest.mark.parametrize("case", wgcases.ALL_CASES, ids=lambda c: c.__name__[5:])
def test_uapi(rig, case):
    case(rig)
