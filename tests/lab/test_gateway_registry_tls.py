"""The gateway talks to the registry over HTTPS and trusts only the CA it was given.

The lab's registry serves HTTPS with a certificate from the lab's CA. A gateway
restarted with another CA (what someone on the path would present) must refuse
the server, say why in its /healthz and events, hold no peer it could not verify,
and keep running; given the right CA again, clients connect just in time.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.tlsca import CertificateAuthority
from lab import procs
from lab.topology import Lab
from tests.lab.gateway_e2e import (
    JIT_CONNECT_LIMIT,
    first_reply_after_start,
    installed,
    key_events,
    wait_for,
)

pytestmark = [pytest.mark.lab]

GW = "g1"
LAB_SPEC = {"gateways": ["jit"], "clients": 1, "registry": "yes"}


def _restart_with(lab: Lab, extra: list[str]) -> None:
    g = lab.gateway(GW)
    lab.stop_daemon(GW)
    # Later flags win: the appended --registry-ca replaces the lab's.
    g.daemon_argv = [*g.daemon_argv, *extra]
    lab.start_daemon(GW)


def test_wrong_ca_refuses_the_registry_and_says_why(lab: Lab, tmp_path: Path) -> None:
    reg = lab.state.registry
    assert reg is not None and reg.url.startswith("https://")
    c1 = lab.client("c1")
    argv = list(lab.gateway(GW).daemon_argv)
    assert argv[argv.index("--registry-ca") + 1] == reg.ca_file

    wrong = CertificateAuthority(tmp_path / "wrong-ca")
    _restart_with(lab, ["--registry-ca", str(wrong.cert_file)])
    try:
        lab.connect("c1", fresh=True)
        [unknown] = wait_for(lambda: key_events(lab, GW, c1.public_key, "peer_unknown"), 10,
                             "peer_unknown for c1")
        assert unknown["reason"] == "unavailable"
        assert c1.public_key not in installed(lab, GW)
        status, body = lab.health(GW)
        assert status == 200, body
        [server] = body["registry_servers"]
        assert server["url"] == reg.url and server["up"] is False
        assert "TLS certificate verification failed" in server["last_error"]
        assert str(wrong.cert_file) in server["last_error"]
        down = [e for e in lab.events(GW) if e["event"] == "registry_server_down"]
        assert down and "certificate verification failed" in down[-1]["error"]
        assert procs.alive(lab.gateway(GW).daemon_pid)
        lab.disconnect("c1")
    finally:
        g = lab.gateway(GW)
        lab.stop_daemon(GW)
        g.daemon_argv = argv
        lab.start_daemon(GW)

    # The lab's own CA: the same client connects just in time.
    lab.connect("c1", fresh=True)
    assert first_reply_after_start(lab, "c1") < JIT_CONNECT_LIMIT
    assert key_events(lab, GW, c1.public_key, "peer_pulled")[-1]["source"] == "registry"
