"""LabSpec.daemon_args: extra `wgjit gateway run` flags per gateway (the benchmarks use it)."""

from __future__ import annotations

import pytest

from lab import gateway as lab_gateway
from lab.netns import LabError
from lab.state import Gateway, Registry
from lab.topology import LabSpec


def test_extra_flags_come_last_so_they_override() -> None:
    g = Gateway(name="g1", ns="x-g1", ifname="xg1", mode="jit", underlay4="192.0.2.11",
                underlay6="2001:db8:1::b", tunnel4="198.18.0.1/16", tunnel6="fd00::1/64",
                listen_port=51820, metrics="127.0.0.1:9586")
    reg = Registry(url="http://192.0.2.2:8080", gateway_token_file="/nonexistent")
    argv = lab_gateway.daemon_argv(g, [reg], "/tmp/state", 300, 30,
                                   ["--trigger-keepalive", "0", "--rate", "7"])
    assert argv[-4:] == ["--trigger-keepalive", "0", "--rate", "7"]
    assert "--trigger-keepalive" not in lab_gateway.daemon_argv(g, [reg], "/tmp/state", 300, 30)


@pytest.mark.parametrize("name", ["g3", "c1", "g", "gx"])
def test_daemon_args_must_name_a_gateway(name: str) -> None:
    with pytest.raises(LabError, match="daemon_args"):
        LabSpec(gateways=["jit", "jit"], daemon_args={name: ["--rate", "1"]}).check()
    LabSpec(gateways=["jit", "jit"], daemon_args={"g2": ["--rate", "1"]}).check()
