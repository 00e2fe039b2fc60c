"""Daemon paths the lab itself never takes: new settings on SIGHUP from the config
file, an interface the daemon creates from --private-key-file and --address, and
the capture interface found without --capture-interface.

The lab starts its daemons with every setting as a flag, on an interface it made,
with --capture-interface; here the daemon is started by hand on a lab whose JIT
gateway has no daemon (`daemon=False`), the way an operator would run it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from lab import gateway as lab_gateway
from lab import procs
from lab.addressing import UNDERLAY_IF
from lab.netns import uapi_socket, wg
from lab.registry import wgjit_argv
from lab.state import Gateway
from lab.topology import Lab
from tests.lab.gateway_e2e import (
    JIT_CONNECT_LIMIT,
    first_reply_after_start,
    installed,
    key_events,
    wait_for,
)

pytestmark = [pytest.mark.lab]

WAIT = 30.0  # generous: the machine is shared; order and outcome are what is checked


def toml(values: dict) -> str:
    """A [gateway] table; str, int, float and list of str are all the daemon reads."""
    def literal(v: object) -> str:
        if isinstance(v, list):
            return "[" + ", ".join(literal(x) for x in v) + "]"
        return json.dumps(v)  # a TOML basic string / number for these values
    return "[gateway]\n" + "".join(f"{k} = {literal(v)}\n" for k, v in values.items())


def start_daemon(lab: Lab, g: Gateway, argv: list[str]) -> None:
    """`wgjit gateway run ARGV` in g's namespace, made known to the lab (metrics,
    events, stop and teardown find it)."""
    g.metrics = lab_gateway.METRICS_LISTEN
    g.daemon_log = str(Path(lab.state.dir) / f"gateway-{g.name}.log")
    g.daemon_argv = [*wgjit_argv(), "gateway", "run", *argv]
    g.daemon_pid = procs.spawn(g.ns, g.daemon_argv, g.daemon_log)
    lab.state.save()
    lab_gateway.wait_daemon(g, timeout=WAIT)


def events(lab: Lab, g: Gateway, name: str) -> list[dict]:
    return [e for e in lab.events(g.name) if e.get("event") == name]


def test_sighup_applies_the_config_file_and_refuses_a_bad_one(lab_factory, tmp_path) -> None:
    lab = lab_factory(gateways=["jit"], clients=1, daemon=False, registry="yes")
    g, c, reg = lab.gateway("g1"), lab.client("c1"), lab.state.registry
    cfg = tmp_path / "gateway.toml"
    settings = {"interface": g.ifname, "registry": reg.url, "registry_ca": reg.ca_file,
                "token_file": reg.gateway_token_file,
                "state_dir": str(Path(lab.state.dir) / "gateway-g1"),
                "metrics_listen": lab_gateway.METRICS_LISTEN, "backend": "uapi",
                "capture_interface": [UNDERLAY_IF], "log_format": "json",
                "idle_timeout": 300.0, "evict_interval": 0.5}
    cfg.write_text(toml(settings))
    start_daemon(lab, g, ["--config", str(cfg)])

    lab.connect("c1", fresh=True)
    assert first_reply_after_start(lab, "c1") < JIT_CONNECT_LIMIT
    lab.disconnect("c1")
    # Idle timeout 300 s: nothing goes on its own.
    assert not key_events(lab, "g1", c.public_key, "peer_evicted")

    cfg.write_text(toml(settings | {"idle_timeout": 2.0}))
    os.kill(g.daemon_pid, signal.SIGHUP)
    [reloaded] = wait_for(lambda: events(lab, g, "config_reloaded"), WAIT, "config_reloaded")
    assert reloaded["idle_timeout"] == 2.0
    # The new timeout bites: the quiet client is evicted, after the reload.
    [ev] = wait_for(lambda: key_events(lab, "g1", c.public_key, "peer_evicted"), WAIT,
                    "c1 evicted under the reloaded idle timeout")
    assert ev["reason"] == "idle"
    assert ev["ts"] >= reloaded["ts"]
    assert c.public_key not in installed(lab, "g1")

    # A bad value: refused with the key named, the daemon carries on as it was.
    cfg.write_text(toml(settings | {"idle_timeout": -1}))
    os.kill(g.daemon_pid, signal.SIGHUP)
    wait_for(lambda: "reload refused" in Path(g.daemon_log).read_text(errors="replace"),
             WAIT, "the reload refused")
    refused = [line for line in Path(g.daemon_log).read_text().splitlines()
               if "reload refused" in line]
    assert "idle_timeout" in refused[-1]
    assert len(events(lab, g, "config_reloaded")) == 1
    assert procs.alive(g.daemon_pid)
    assert lab.health("g1")[0] == 200
    # And it still provisions just in time.
    lab.connect("c1", fresh=True)
    assert first_reply_after_start(lab, "c1") < JIT_CONNECT_LIMIT
    lab.disconnect("c1")


def test_daemon_creates_its_interface_and_finds_the_capture_interface(lab_factory) -> None:
    lab = lab_factory(gateways=["jit"], clients=1, daemon=False, registry="yes")
    g, c, reg = lab.gateway("g1"), lab.client("c1"), lab.state.registry
    # Take away the interface the lab made: the daemon must make its own.
    procs.stop([(g.wg_pid, signal.SIGTERM)], grace=5)
    wait_for(lambda: not uapi_socket(g.ifname).exists(), WAIT, "the lab's interface gone")
    gone = subprocess.run(["ip", "-n", g.ns, "link", "show", g.ifname], capture_output=True)
    assert gone.returncode != 0

    start_daemon(lab, g, [
        "--interface", g.ifname, "--registry", reg.url, "--registry-ca", reg.ca_file,
        "--token-file", reg.gateway_token_file, "--private-key-file", g.private_key_file,
        "--listen-port", str(g.listen_port), "--address", g.tunnel4, "--address", g.tunnel6,
        "--state-dir", str(Path(lab.state.dir) / "gateway-g1"),
        "--metrics-listen", lab_gateway.METRICS_LISTEN, "--log-format", "json"])
    [ready] = events(lab, g, "gateway_ready")
    assert ready["interface"] == g.ifname
    assert ready["public_key"] == g.public_key  # from --private-key-file
    assert ready["listen_port"] == g.listen_port
    # Found on its own: the namespace's one Ethernet interface; not lo, not the
    # WireGuard interface (no Ethernet header for the BPF program to read).
    assert ready["capture"] == [UNDERLAY_IF]

    # The kernel here has no WireGuard: the daemon started wireguard-go, and gave the
    # interface its addresses and brought it up.
    assert uapi_socket(g.ifname).exists()
    assert wg(["show", g.ifname, "listen-port"]).strip() == str(g.listen_port)
    addrs = subprocess.run(["ip", "-n", g.ns, "-o", "addr", "show", "dev", g.ifname],
                           capture_output=True, text=True, check=True).stdout
    assert g.tunnel4 in addrs and g.tunnel6 in addrs
    link = subprocess.run(["ip", "-n", g.ns, "-o", "link", "show", g.ifname],
                          capture_output=True, text=True, check=True).stdout
    assert ",UP" in link or "<UP" in link

    # And a client gets through it just in time.
    lab.connect("c1", fresh=True)
    assert first_reply_after_start(lab, "c1") < JIT_CONNECT_LIMIT
    assert c.public_key in installed(lab, "g1")
    lab.disconnect("c1")
