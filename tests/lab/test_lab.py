"""The namespace lab itself: up, traffic through real wireguard-go, down leaves nothing."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lab import client as lab_client
from lab import gateway as lab_gateway
from lab import procs
from lab import registry as lab_registry
from lab.netns import LabError, list_netns, wg
from lab.state import state_dir
from lab.topology import Lab, LabSpec, destroy, lab_namespaces, lab_sockets, random_prefix

pytestmark = [pytest.mark.lab]

ROOT = Path(__file__).resolve().parents[2]
UAPI = Path("/var/run/wireguard")
LAB_SPEC = {"gateways": ["plain"], "clients": 2, "psk": True, "endpoint_family": "mixed"}


def root_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True,
                         check=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def snapshot() -> dict[str, set[str]]:
    return {"netns": set(list_netns()), "links": root_links(),
            "sockets": set(os.listdir(UAPI)) if UAPI.is_dir() else set()}


def lab_pids(prefix: str) -> set[int]:
    return {pid for ns in lab_namespaces(prefix) for pid in procs.netns_pids(ns)}


def assert_gone(prefix: str, before: dict[str, set[str]], pids: set[int]) -> None:
    """Nothing the lab made is left; compared with a snapshot taken before it existed."""
    after = snapshot()
    ours = re.compile(rf"^{prefix}[-gc]")
    assert not [n for n in after["netns"] - before["netns"] if ours.match(n)]
    assert not [s for s in after["sockets"] - before["sockets"] if ours.match(s)]
    # No link of the lab's may have leaked into the host's own namespace.
    assert not [n for n in after["links"] - before["links"]
                if ours.match(n) or n in ("ul0", "br0") or re.fullmatch(r"[gc]\d+|reg", n)]
    assert not [p for p in pids if procs.alive(p)], "lab processes still running"
    assert not state_dir(prefix).exists()


def test_up_preprovisioned_client_pings_and_down_leaves_nothing() -> None:
    before = snapshot()
    lab = Lab.up(LabSpec(gateways=["jit"], clients=1, daemon=False))
    try:
        prefix = lab.prefix
        g, c = lab.gateway("g1"), lab.client("c1")
        assert len(lab_namespaces(prefix)) == 3 + (lab.state.registry is not None)
        assert {p.name for p in lab_sockets(prefix)} == {f"{g.ifname}.sock", f"{c.ifname}.sock"}
        pids = lab_pids(prefix)
        assert len(pids) >= 2  # wireguard-go on both sides, and the registry if present
        # An empty gateway does not answer ...
        assert lab.peers("g1") == []
        assert not lab.ping("c1", wait=1.0)
        # ... until the client's peer is added to it by hand with wg(8).
        wg(["set", g.ifname, "peer", c.public_key, "allowed-ips", f"{c.tunnel4},{c.tunnel6}"])
        lab_client.reset_session(c, g)  # a new session: the old one is waiting to retry
        assert lab.ping("c1", wait=3.0)
        assert lab.ping("c1", family=6, wait=2.0)
        [peer] = lab.peers("g1")
        assert peer.public_key == c.public_key
        assert peer.latest_handshake > 0
        assert peer.endpoint == f"{c.underlay4}:{peer.endpoint.rsplit(':', 1)[1]}"
        pids |= lab_pids(prefix)
    finally:
        problems = lab.down()
    assert problems == []
    assert_gone(prefix, before, pids)
    assert lab.down() == []  # twice is harmless


def test_module_lab_fixture_is_preprovisioned(lab: Lab) -> None:
    # LAB_SPEC: plain gateway, clients with preshared keys, one over IPv4, one over IPv6.
    g = lab.gateway("g1")
    assert {p.public_key for p in lab.peers("g1")} == {c.public_key for c in lab.state.clients}
    for c in lab.state.clients:
        assert lab.ping(c.name, wait=3.0), c.name
        assert Path(c.psk_file).stat().st_mode & 0o777 == 0o600
    endpoints = {p.public_key: p.endpoint for p in lab.peers("g1")}
    assert endpoints[lab.client("c1").public_key].startswith(lab.client("c1").underlay4 + ":")
    assert endpoints[lab.client("c2").public_key].startswith(f"[{lab.client('c2').underlay6}]:")
    assert g.listen_port == 51820


def test_clients_are_registered_through_the_api(lab: Lab) -> None:
    if lab.state.registry is None:
        pytest.fail("the registry is built; the lab must run it")
    rc = lab.registry()
    for c in lab.state.clients:
        peer = rc.gateway_peer(c.public_key)
        assert peer is not None, c.name
        assert peer["public_key"] == c.public_key
        assert sorted(peer["allowed_ips"]) == sorted([c.tunnel4, c.tunnel6])
        assert peer["preshared_key"] == Path(c.psk_file).read_text().strip()
    # A key the registry never saw is not there.
    assert rc.gateway_peer("A" * 43 + "=") is None


def test_jit_gateway_daemon_adopts_the_lab_interface(lab_factory) -> None:
    lab = lab_factory(gateways=["jit"], clients=1, idle_timeout=30, evict_interval=1)
    g, c = lab.gateway("g1"), lab.client("c1")
    assert procs.alive(g.daemon_pid) and procs.in_netns(g.daemon_pid, g.ns)
    assert lab.peers("g1") == []  # holds nothing until a client speaks
    t = time.monotonic()
    assert lab.ping("c1", wait=3.0)
    # Well under the client's 5 s retry: the daemon installed the peer and handshook back.
    assert time.monotonic() - t < 2.0
    events = [json.loads(line) for line in Path(g.daemon_log).read_text().splitlines()
              if line.startswith("{")]
    ready = next(e for e in events if e.get("event") == "gateway_ready")
    assert (ready["interface"], ready["public_key"]) == (g.ifname, g.public_key)
    installed = [e for e in events if e.get("event") == "peer_installed"]
    assert [e["public_key"] for e in installed] == [c.public_key]
    assert [p.public_key for p in lab.peers("g1")] == [c.public_key]


def test_two_labs_at_once_do_not_collide() -> None:
    before = snapshot()
    labs: list[Lab] = []
    errors: list[BaseException] = []

    def build() -> None:
        try:
            labs.append(Lab.up(LabSpec(gateways=["plain"], clients=1, registry="no")))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=build) for _ in range(2)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        a, b = labs
        assert a.prefix != b.prefix
        # Same addresses and ports in both, different interface names and namespaces.
        assert a.gateway("g1").underlay4 == b.gateway("g1").underlay4
        assert a.gateway("g1").ifname != b.gateway("g1").ifname
        assert not set(lab_namespaces(a.prefix)) & set(lab_namespaces(b.prefix))
        assert a.ping("c1") and b.ping("c1")
        # Each gateway knows only its own lab's client.
        assert [p.public_key for p in a.peers("g1")] == [a.client("c1").public_key]
        assert [p.public_key for p in b.peers("g1")] == [b.client("c1").public_key]
        pids_a = lab_pids(a.prefix)
        assert a.down() == []
        assert_gone(a.prefix, before, pids_a)
        assert b.ping("c1"), "the other lab must survive"
        pids_b = lab_pids(b.prefix)
        assert b.down() == []
        assert_gone(b.prefix, before, pids_b)
    finally:
        for lab in labs:
            lab.down()


def test_a_failure_while_building_removes_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    before = snapshot()
    prefix = random_prefix()
    seen: set[int] = set()

    def broken(g):  # after namespaces and wireguard-go exist
        seen.update(lab_pids(prefix))
        raise LabError("injected failure")

    monkeypatch.setattr(lab_gateway, "configure_interface", broken)
    with pytest.raises(LabError, match="injected failure"):
        Lab.up(LabSpec(prefix=prefix, gateways=["plain"], clients=2, registry="no"))
    assert len(seen) == 3  # wireguard-go for g1, c1, c2 were running
    assert_gone(prefix, before, seen)


@pytest.mark.parametrize("part", ["registry", "gateway"])
def test_a_broken_cli_fails_the_lab_loudly(part: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # No "not built yet" fallback: a CLI that cannot start is an error naming what failed.
    before = snapshot()
    prefix = random_prefix()
    broken = [sys.executable, "-c", "import sys; sys.exit('wgjit broken on purpose')"]
    monkeypatch.setattr(lab_registry if part == "registry" else lab_gateway, "wgjit_argv",
                        lambda: broken)
    with pytest.raises(LabError, match="broken on purpose"):
        Lab.up(LabSpec(prefix=prefix, gateways=["jit"], clients=1))
    assert_gone(prefix, before, set())


def run_lab(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lab", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_cli_state_persists_between_invocations() -> None:
    before = snapshot()
    prefix = random_prefix()
    up = run_lab("up", "--prefix", prefix, "-g", "1", "-c", "2", "--no-registry")
    pids: set[int] = set()
    try:
        assert up.returncode == 0, up.stderr
        state = json.loads((state_dir(prefix) / "state.json").read_text())
        assert state["ready"] and state["owner_pid"] == 0
        pids = lab_pids(prefix)
        assert len(pids) == 3
        secrets = [Path(h["private_key_file"]).read_text().strip()
                   for h in state["gateways"] + state["clients"]]
        for h in state["gateways"] + state["clients"]:
            assert Path(h["private_key_file"]).stat().st_mode & 0o777 == 0o600

        st = run_lab("status", "--prefix", prefix)
        assert st.returncode == 0, st.stderr
        assert re.search(r"c1 .* quiet", st.stdout)

        con = run_lab("connect", "c1", "--prefix", prefix)
        assert con.returncode == 0, con.stderr
        log = Path(state_dir(prefix) / "ping-c1.log")
        deadline = time.monotonic() + 5
        while "bytes from" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "bytes from 198.18.0.1" in log.read_text()
        st = run_lab("status", "--prefix", prefix, "--json")
        doc = json.loads(st.stdout)
        assert [c["connected"] for c in doc["clients"]] == [True, False]
        ping_pid = json.loads((state_dir(prefix) / "state.json").read_text())["clients"][0][
            "ping_pid"]
        assert procs.in_netns(ping_pid, f"{prefix}-c1")

        dis = run_lab("disconnect", "c1", "--prefix", prefix)
        assert dis.returncode == 0, dis.stderr
        deadline = time.monotonic() + 3
        while procs.alive(ping_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not procs.alive(ping_pid)
        assert '"connected": true' not in run_lab("status", "--prefix", prefix, "--json").stdout

        for out in (up.stdout + up.stderr, st.stdout, con.stdout, dis.stdout):
            assert not any(s in out for s in secrets), "a private key was printed"
    finally:
        down = run_lab("down", "--prefix", prefix)
    assert down.returncode == 0, down.stderr
    assert_gone(prefix, before, pids)
    again = run_lab("down", "--prefix", prefix)
    assert again.returncode == 0 and "no lab" in again.stdout


def test_foreground_lab_is_removed_on_sigterm() -> None:
    before = snapshot()
    prefix = random_prefix()
    proc = subprocess.Popen([sys.executable, "-m", "lab", "up", "--foreground", "--prefix",
                             prefix, "-c", "1", "--no-registry"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "running until" in line:
                break
        pids = lab_pids(prefix)
        assert len(pids) == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            run_lab("down", "--prefix", prefix)
    assert_gone(prefix, before, pids)


SLEEPY_TEST = """
import time
from tests.lab.conftest import _lab_session_guard, lab, lab_factory  # noqa: F401

LAB_SPEC = {"clients": 1, "registry": "no"}


def test_sleep(lab):
    print("LAB", lab.prefix, flush=True)
    time.sleep(60)
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_fixture_lab_is_removed_when_pytest_is_interrupted(tmp_path: Path, sig: int) -> None:
    (tmp_path / "test_sleepy.py").write_text(SLEEPY_TEST)
    before = snapshot()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-s", "-q", "-p", "no:cacheprovider", "--rootdir",
         str(ROOT), "-c", str(ROOT / "pyproject.toml"), str(tmp_path / "test_sleepy.py")],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    prefix, pids, lines = None, set(), []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("LAB "):
                prefix = line.split()[1]
                break
        assert prefix, "".join(lines)
        pids = lab_pids(prefix)
        assert len(pids) == 2
        proc.send_signal(sig)
        proc.wait(timeout=30)
        assert proc.returncode != 0  # interrupted, not passed
        assert_gone(prefix, before, pids)  # before any cleanup of ours below
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if prefix:
            destroy(prefix)


def test_down_without_a_lab_is_a_clean_no_op() -> None:
    r = run_lab("down", "--prefix", random_prefix())
    assert r.returncode == 0, r.stderr
    bad = run_lab("down", "--prefix", "Not-A-Prefix")
    assert bad.returncode == 1 and "prefix" in bad.stderr


def test_demo_runs_and_tells_the_story() -> None:
    before = snapshot()
    r = run_lab("demo", "--clients", "2", timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    prefix = re.search(r"lab (\w+): building", out).group(1)
    assert re.search(r"\[\+\s+\d+ ms\] c3\s+first reply through the tunnel, \d+ ms", out)
    assert "Summary" in out
    # Every step of a just-in-time connection, timed, for the first JIT client.
    assert re.search(r"^c1\s+g1 \(reinject\)(\s+\d+ ms){5}$", out, re.M), out
    assert re.search(r"c1\s+g1: the data plane answered the client's handshake", out)
    assert re.search(r"c1\s+g1 evicted the peer \(idle\)", out)
    # The comparison: role inversion on g3, the gateway handshaking back.
    assert re.search(r"^c4\s+g3 \(invert\)(\s+\d+ ms){5}$", out, re.M), out
    assert re.search(r"c4\s+g3 installed the peer and handshakes back", out)
    # The operator's view of g1 (`wgjit gateway status`, run in its namespace).
    assert re.search(r"^interface\s+\S+ \(uapi, port \d+, install mode reinject\)$", out, re.M)
    assert re.search(r"^peers\s+\d+ installed, \d+ awaiting a handshake$", out, re.M), out
    assert re.search(r"^last eviction\s+\d+ s ago: \d+ of \d+ peers", out, re.M), out
    assert re.search(r"Provisioned just in time, re-injection: \d+ connection.*role "
                     r"inversion: \d+ ms; pre-provisioned: \d+ ms", out), out
    assert_gone(prefix, before, set())
