"""The fleet deploy against real Debian VMs: pyinfra over SSH, systemd, kernel WireGuard.

One VM lab for the module (registry VM + gateway VM; WGJIT_VM_COMBINED=1 puts both
roles on one VM for small machines), deployed once; then a namespace client
connects just in time through the gateway VM's kernel WireGuard and is evicted, a
second run changes nothing, and a run with a wrong token fails loudly while the
running gateway carries on. Each gateway has its own token, limited to the lab's
tenant, made by the deploy and kept on the controller in 0600 files. The last
test takes the lab down and checks that nothing is left; a teardown problem fails
the run.

Slow by nature (qemu TCG): the image is cached under /var/cache/wgjit-lab.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from appliance.registry import tokens
from appliance.secrets import read_secret, write_secret
from lab import addressing, procs
from lab import client as lab_client
from lab.netns import list_netns, uapi_socket
from lab.vm.lab import GATEWAY_IFNAME, LAB_TENANT, VMLab

# The first test carries the module's setup: image (cached), two boots, first deploy.
pytestmark = [pytest.mark.vm, pytest.mark.deploy, pytest.mark.slow, pytest.mark.timeout(2400)]

TIMINGS: dict[str, float] = {}


def _say(msg: str) -> None:
    print(f"[vm-deploy] {msg}", file=sys.stderr, flush=True)


def _gateway_name(lab: VMLab) -> str:
    return next(v.name for v in lab.state.vms if "gateway" in v.roles)


def _registry_name(lab: VMLab) -> str:
    return next(v.name for v in lab.state.vms if "registry" in v.roles)


def _gateway_token_file(lab: VMLab, name: str) -> Path:
    """The controller's copy of gateway `name`'s own token (made by the first deploy)."""
    return Path(lab.deploy_env()["WGJIT_GATEWAY_TOKEN_DIR"]) / f"{name}.token"


def _results(p: subprocess.CompletedProcess[str]) -> dict:
    """pyinfra --json's document: stdout holds exactly one JSON object."""
    start = p.stdout.find("{")
    assert start >= 0, f"no JSON from pyinfra:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return json.loads(p.stdout[start:])


def _changed(doc: dict) -> dict[str, list[str]]:
    """Operation name -> hosts it changed (pyinfra calls a change "success")."""
    return {op["name"]: op["success"] for op in doc["results"]["operations"] if op["success"]}


def _errors(doc: dict) -> dict[str, list[str]]:
    return {op["name"]: op["error"] for op in doc["results"]["operations"] if op["error"]}


def _leftovers(vmlab: VMLab) -> list[str]:
    """Whatever the lab made that is still on the machine: namespaces, qemu and
    wireguard-go processes, tap and veth devices, UAPI sockets, state and disks."""
    st, prefix = vmlab.state, vmlab.prefix
    left = [f"netns {ns}" for ns in list_netns() if ns.startswith(f"{prefix}-")]

    def running(pid: int, word: str) -> bool:  # alive and still that program (pids recycle)
        try:
            return procs.alive(pid) and word in Path(f"/proc/{pid}/cmdline").read_text(
                errors="replace")
        except OSError:
            return False
    left += [f"{v.name}: qemu pid {v.pid} alive" for v in st.vms
             if v.pid and running(v.pid, "qemu")]
    left += [f"{c.name}: wireguard-go pid {c.wg_pid} alive" for c in st.clients
             if c.wg_pid and running(c.wg_pid, c.ifname)]
    # Any process still naming the lab's disks or state (a qemu not in the state file).
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        if cmdline.parent.name == str(os.getpid()):
            continue
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(d and d in text for d in (st.dir, st.disk_dir)):
            left.append(f"process {cmdline.parent.name}: {text[:200]}")
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True,
                           check=True).stdout
    left += [f"link {line.split(':')[1].strip()}" for line in links.splitlines()
             if line.split(":")[1].strip().split("@")[0].startswith(prefix)]
    left += [f"socket {uapi_socket(c.ifname)}" for c in st.clients
             if uapi_socket(c.ifname).exists()]
    left += [f"directory {d}" for d in (st.dir, st.disk_dir) if d and Path(d).exists()]
    return left


@pytest.fixture(scope="module")
def lab():
    t0 = time.monotonic()
    combined = os.environ.get("WGJIT_VM_COMBINED") == "1"
    vmlab = VMLab.up(gateways=1, combined=combined, progress=_say)
    TIMINGS["image+boot"] = time.monotonic() - t0
    try:
        yield vmlab
    finally:
        # test_lab_teardown_is_clean has normally taken the lab down already; a second
        # down() is a no-op. Either way a problem fails the session, not just a line
        # in the log: a VM that had to be killed did not shut down cleanly.
        t0 = time.monotonic()
        problems = vmlab.down()
        TIMINGS["poweroff"] = TIMINGS.get("poweroff", 0.0) + time.monotonic() - t0
        _say(f"timings: {', '.join(f'{k} {v:.0f}s' for k, v in TIMINGS.items())}")
        assert problems == [], f"VM lab teardown: {problems}"
        assert _leftovers(vmlab) == []


@pytest.fixture(scope="module")
def first_run(lab):
    t0 = time.monotonic()
    p = lab.pyinfra(["-y", "--json", "deploy.py"])
    TIMINGS["first deploy"] = time.monotonic() - t0
    _say(f"first deploy: {TIMINGS['first deploy']:.0f}s")
    assert p.returncode == 0, f"deploy failed:\n{p.stdout[-5000:]}\n{p.stderr[-5000:]}"
    return p


def test_first_run_installs_everything_and_never_shows_a_token(lab, first_run):
    doc = _results(first_run)
    assert _errors(doc) == {}
    changed = _changed(doc)
    gw, reg = _gateway_name(lab), _registry_name(lab)
    assert any(gw in hosts for name, hosts in changed.items() if "restart wgjit-gateway" in name)
    assert any(reg in hosts for name, hosts in changed.items() if "restart wgjit-registry" in name)
    output = first_run.stdout + first_run.stderr
    gateways = [v.name for v in lab.state.vms if "gateway" in v.roles]
    for token_file in (lab.state.admin_token_file,
                       *(_gateway_token_file(lab, g) for g in gateways)):
        secret = read_secret(token_file)
        assert secret not in output
        assert secret.split("_", 2)[2] not in output
    assert read_secret(lab.state.db_password_file) not in output
    # The gateway's public key is printed and kept for the operator; its private
    # key exists only on the gateway, 0600 root.
    pub = lab.gateway_public_key(gw)
    assert re.fullmatch(r"[A-Za-z0-9+/]{43}=", pub)
    assert pub in output
    st = lab.ssh(gw, ["stat", "-c", "%a %U", "/etc/wgjit/gateway.key"], check=True)
    assert st.stdout.split() == ["600", "root"]
    assert lab.ssh(gw, ["sh", "-c", "wg pubkey < /etc/wgjit/gateway.key"],
                   check=True).stdout.strip() == pub


def test_each_gateway_has_its_own_token_limited_to_its_pool(lab, first_run):
    gw, reg = _gateway_name(lab), _registry_name(lab)
    held = _gateway_token_file(lab, gw)
    assert held.stat().st_mode & 0o777 == 0o600
    assert held.parent.stat().st_mode & 0o777 == 0o700
    st = lab.ssh(gw, ["stat", "-c", "%a %U", "/etc/wgjit/gateway.token"], check=True)
    assert st.stdout.split() == ["600", "wgjit-gateway"]
    on_gw = lab.ssh(gw, ["cat", "/etc/wgjit/gateway.token"], check=True).stdout.strip()
    assert on_gw == read_secret(held)
    # The registry knows it by id, named after the gateway, limited to the lab tenant.
    rows = lab.ssh(reg, ["runuser", "-u", "postgres", "--", "psql", "-X", "-d", "wgjit", "-tAF",
                         " ", "-c", "SELECT t.id, t.name, p.tenant FROM tokens t JOIN token_pools"
                         " p ON p.token_id = t.id WHERE t.scope = 'gateway'"
                         " AND t.revoked_at IS NULL"], check=True).stdout.split("\n")
    assert [r.split() for r in rows if r.strip()] == [[on_gw.split("_")[1], gw, LAB_TENANT]]


def test_gateway_runs_kernel_wireguard_with_only_its_capabilities(lab, first_run):
    gw = _gateway_name(lab)
    link = lab.ssh(gw, ["ip", "-d", "link", "show", GATEWAY_IFNAME], check=True).stdout
    # `ip -d` names the link kind: the kernel module, not a tun device of wireguard-go.
    assert re.search(r"^\s+wireguard\b", link, re.M), link
    assert "tun" not in link.split()
    assert lab.ssh(gw, ["pgrep", "-x", "wireguard-go"]).returncode == 1
    show = lab.ssh(gw, ["systemctl", "show", "wgjit-gateway.service", "-p", "ActiveState",
                        "-p", "User", "-p", "CapabilityBoundingSet", "-p",
                        "AmbientCapabilities"], check=True).stdout
    props = dict(line.split("=", 1) for line in show.splitlines() if "=" in line)
    assert props["ActiveState"] == "active"
    assert props["User"] == "wgjit-gateway"
    assert set(props["CapabilityBoundingSet"].split()) == {"cap_net_admin", "cap_net_raw"}
    assert set(props["AmbientCapabilities"].split()) == {"cap_net_admin", "cap_net_raw"}
    # And the process itself holds them, as a user other than root.
    status = lab.ssh(gw, ["sh", "-c", "cat /proc/$(systemctl show -p MainPID --value "
                          "wgjit-gateway.service)/status"], check=True).stdout
    uid = re.search(r"^Uid:\s+(\d+)", status, re.M).group(1)
    assert uid != "0"
    cap_eff = int(re.search(r"^CapEff:\s+([0-9a-f]+)", status, re.M).group(1), 16)
    assert cap_eff == (1 << 12) | (1 << 13)  # CAP_NET_ADMIN, CAP_NET_RAW
    reg = _registry_name(lab)
    assert lab.ssh(reg, ["systemctl", "is-active", "wgjit-registry.service"],
                   check=True).stdout.strip() == "active"


def _registry_url(lab: VMLab) -> str:
    return f"https://{lab.state.vm(_registry_name(lab)).address4}:8080"


def test_registry_serves_https_on_its_address_with_a_private_key(lab, first_run):
    reg = _registry_name(lab)
    st = lab.ssh(reg, ["stat", "-c", "%a %U", "/etc/wgjit/registry.key"], check=True)
    assert st.stdout.split() == ["600", "wgjit-registry"]
    # Listening on its management address only, not on every interface.
    listening = lab.ssh(reg, ["ss", "-Htln", "sport = :8080"], check=True).stdout.split()
    assert f"{lab.state.vm(reg).address4}:8080" in listening, listening
    assert "0.0.0.0:8080" not in listening and "*:8080" not in listening
    # The fleet CA's key stays on the controller: no host holds it.
    assert lab.ssh(reg, ["test", "-e", "/etc/wgjit/ca.key"]).returncode == 1
    assert Path(lab.ca_file).with_name("ca.key").stat().st_mode & 0o777 == 0o600
    # The gateway verifies the registry against the fleet CA.
    conf = lab.ssh(_gateway_name(lab), ["cat", "/etc/wgjit/gateway.toml"], check=True).stdout
    assert f'registry = "{_registry_url(lab)}"' in conf
    assert 'registry_ca = "/etc/wgjit/ca.pem"' in conf
    # And a client that does not know the fleet CA is refused.
    other = subprocess.run(
        ["ip", "netns", "exec", lab.net, sys.executable, "-m", "appliance", "peer", "list",
         "--registry", _registry_url(lab), "--token-file", lab.state.admin_token_file],
        capture_output=True, text=True, timeout=60)
    assert other.returncode == 1 and "certificate verification failed" in other.stderr


def test_registry_keeps_its_data_in_postgresql(lab, first_run):
    # The VM lab puts the registry VM in the postgres group too: Debian's PostgreSQL
    # on the same VM holds the registry's database (the fleet engine).
    reg = _registry_name(lab)
    conf = lab.ssh(reg, ["cat", "/etc/wgjit/registry.toml"], check=True).stdout
    assert 'db = "postgresql://wgjit@127.0.0.1:5432/wgjit"' in conf
    assert 'db_password_file = "/etc/wgjit/registry-db.password"' in conf
    st = lab.ssh(reg, ["stat", "-c", "%a %U", "/etc/wgjit/registry-db.password",
                       "/etc/postgresql/wgjit.password"], check=True).stdout.split()
    assert st == ["600", "wgjit-registry", "600", "postgres"]
    tokens_in_pg = lab.ssh(reg, ["runuser", "-u", "postgres", "--", "psql", "-X", "-d", "wgjit",
                                 "-tAc", "SELECT count(*) FROM tokens"], check=True).stdout
    assert int(tokens_in_pg) >= 2  # the operator's admin token and the gateway's own
    assert lab.ssh(reg, ["test", "-e", "/var/lib/wgjit-registry/registry.db"]).returncode == 1
    # The password is not on any command line on the host.
    password = read_secret(lab.state.db_password_file)
    ps = lab.ssh(reg, ["ps", "-eo", "args"], check=True).stdout
    assert password not in ps


def _register(lab: VMLab, c) -> None:
    base = ["ip", "netns", "exec", lab.net, sys.executable, "-m", "appliance"]
    auth = ["--registry", _registry_url(lab), "--token-file", lab.state.admin_token_file,
            "--registry-ca", lab.ca_file]
    subprocess.run([*base, "tenant", "add", "lab", *auth], capture_output=True, text=True,
                   timeout=60)  # it may exist already
    p = subprocess.run([*base, "peer", "add", *auth, "--tenant", "lab", "--public-key",
                        c.public_key, "--allowed-ip", c.tunnel4, "--allowed-ip", c.tunnel6,
                        "--name", c.name], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr


def _gateway_peers(lab: VMLab) -> list[str]:
    out = lab.ssh(_gateway_name(lab), ["wg", "show", GATEWAY_IFNAME, "peers"], check=True)
    return out.stdout.split()


@pytest.fixture(scope="module")
def jit_client(lab, first_run):
    """Namespace client c1 of the gateway VM, registered; made once for the module, by
    whichever test asks first."""
    c = lab.add_client(1, _gateway_name(lab))
    _register(lab, c)
    return c


def test_client_connects_just_in_time_and_is_evicted(lab, first_run, jit_client):
    gw = _gateway_name(lab)
    c = jit_client
    assert _gateway_peers(lab) == [], "a JIT gateway holds no peer before the first packet"
    g = lab.gateway(gw)
    t0 = time.monotonic()
    # Under TCG the gateway's Python takes seconds to pull and install the peer; the
    # client's own retry (REKEY_TIMEOUT) would also get through, so the proof of
    # "just in time" is the peer appearing on the kernel device only now.
    ok = lab_client.ping_once(c, g, count=60, wait=60)
    TIMINGS["first reply"] = time.monotonic() - t0
    assert ok, f"no reply through {gw}'s kernel WireGuard"
    assert c.public_key in _gateway_peers(lab)
    _say(f"first reply through the kernel tunnel after {TIMINGS['first reply']:.1f}s")
    # Quiet now: idle_timeout 20 s, evict_interval 5 s (inventory/lab.py).
    t0 = time.monotonic()
    while c.public_key in _gateway_peers(lab):
        if time.monotonic() - t0 > 150:
            dump = lab.ssh(gw, ["wg", "show", GATEWAY_IFNAME, "dump"]).stdout
            journal = lab.ssh(gw, ["journalctl", "-u", "wgjit-gateway", "-n", "40",
                                   "--no-pager"]).stdout
            pytest.fail(f"the idle peer was never evicted:\n{dump}\n{journal}")
        time.sleep(5)
    TIMINGS["evicted after"] = time.monotonic() - t0
    # The next packet brings it back.
    lab_client.reset_session(c, g)
    assert lab_client.ping_once(c, g, count=60, wait=60)
    assert c.public_key in _gateway_peers(lab)


# The Vagrant lab's clients are VMs running the client role; here the registry VM
# takes that role too (a third emulated VM would cost minutes), with an address
# no namespace client uses.
CLIENT_VM_INVENTORY = """
from lab.vm.lab import inventory_groups

_name, _data = inventory_groups()["registry"][0]
clients = [(_name, {{**_data, "wg_address": [{address!r}], "gateway": {gateway!r},
                    "gateway_endpoint": {endpoint!r}, "gateway_ips": [{gateway_ip!r}]}})]
"""


def test_client_role_on_a_vm_connects_through_the_gateway(lab, first_run, tmp_path):
    gw, reg = _gateway_name(lab), _registry_name(lab)
    if gw == reg:
        pytest.skip("WGJIT_VM_COMBINED=1: no VM without a gateway to be the client")
    gw_vm = lab.state.vm(gw)
    address = addressing.client_tunnel(9)[0]
    gateway_ip = str(ipaddress.ip_interface(gw_vm.tunnel4).ip)
    inventory = tmp_path / "client_vm.py"
    inventory.write_text(CLIENT_VM_INVENTORY.format(
        address=address, gateway=gw, gateway_ip=f"{gateway_ip}/32",
        endpoint=f"{gw_vm.address4}:{addressing.WG_PORT}"))
    p = lab.pyinfra(["-y", "--json", "deploy.py"], inventory=str(inventory))
    assert p.returncode == 0, f"client deploy failed:\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    assert _errors(_results(p)) == {}
    conf = lab.ssh(reg, ["cat", "/etc/wireguard/wgjit.conf"], check=True).stdout
    # The config comes from the registry's record; the private key never leaves its file.
    assert f"Address = {address}" in conf and "PrivateKey" not in conf
    assert lab.gateway_public_key(gw) in conf
    for path in ("/etc/wireguard/wgjit.conf", "/etc/wireguard/wgjit.key"):
        st = lab.ssh(reg, ["stat", "-c", "%a %U", path], check=True).stdout.split()
        assert st == ["600", "root"], path
    client_key = lab.ssh(reg, ["wg", "show", "wgjit", "public-key"], check=True).stdout.strip()
    shown = subprocess.run(
        ["ip", "netns", "exec", lab.net, sys.executable, "-m", "appliance", "peer", "show",
         "--registry", _registry_url(lab), "--token-file", lab.state.admin_token_file,
         "--registry-ca", lab.ca_file, "--json", client_key],
        capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["allowed_ips"] == [address]

    # wg-quick's first keepalive is the client's first handshake: the gateway
    # pulls it from the registry and installs it in the kernel just in time.
    t0 = time.monotonic()
    ping = lab.ssh(reg, ["ping", "-c", "1", "-w", "60", gateway_ip], timeout=120)
    TIMINGS["client VM first reply"] = time.monotonic() - t0
    assert ping.returncode == 0, f"no reply from {gateway_ip}:\n{ping.stdout}{ping.stderr}"
    assert client_key in _gateway_peers(lab)
    handshake = lab.ssh(reg, ["wg", "show", "wgjit", "latest-handshakes"], check=True).stdout
    assert int(handshake.split()[1]) > 0

    again = lab.pyinfra(["-y", "--json", "deploy.py"], inventory=str(inventory))
    assert again.returncode == 0, again.stderr[-3000:]
    assert _changed(_results(again)) == {}


def test_second_run_changes_nothing(lab, first_run):
    t0 = time.monotonic()
    p = lab.pyinfra(["-y", "--json", "deploy.py"])
    TIMINGS["second deploy"] = time.monotonic() - t0
    assert p.returncode == 0, p.stderr[-5000:]
    doc = _results(p)
    assert _errors(doc) == {}
    assert _changed(doc) == {}
    hosts = {h for op in doc["results"]["operations"] for h in op["no_change"]}
    assert hosts == {v.name for v in lab.state.vms}


def test_wrong_token_fails_loudly_and_leaves_the_gateway_running(lab, first_run, jit_client):
    gw = _gateway_name(lab)

    def main_pid() -> str:
        return lab.ssh(gw, ["systemctl", "show", "-p", "MainPID", "--value",
                            "wgjit-gateway.service"], check=True).stdout.strip()

    def token_sum() -> str:
        return lab.ssh(gw, ["sha256sum", "/etc/wgjit/gateway.token"], check=True).stdout

    pid, before = main_pid(), token_sum()
    # The controller's copy of the gateway's token replaced by one the registry
    # never saw; a run limited to the gateway does not make the registry import it.
    held = _gateway_token_file(lab, gw)
    kept = read_secret(held)
    wrong = tokens.generate()  # well formed, unknown to the registry
    write_secret(held, wrong)
    try:
        p = lab.pyinfra(["-y", "--limit", gw, "deploy.py"])
    finally:
        write_secret(held, kept)
    output = p.stdout + p.stderr
    assert p.returncode != 0, output[-3000:]
    assert "refused the gateway token: HTTP 401" in output
    assert wrong not in output and wrong.split("_", 2)[2] not in output
    assert main_pid() == pid
    assert token_sum() == before
    assert lab.ssh(gw, ["test", "-e", "/etc/wgjit/gateway.token.new"]).returncode == 1
    # The running gateway still serves a client (pulled just in time if it was evicted).
    lab_client.reset_session(jit_client, lab.gateway(gw))
    assert lab_client.ping_once(jit_client, lab.gateway(gw), count=30, wait=30)


# `systemd-analyze security` exposure (0 safest .. 10): the gateway keeps two
# capabilities and five address families, the registry none. The README gives the
# scores; a unit that loses its hardening climbs past these bounds.
EXPOSURE_BOUND = {"wgjit-registry.service": 2.5, "wgjit-gateway.service": 4.0}


@pytest.mark.parametrize("unit", sorted(EXPOSURE_BOUND))
def test_units_are_hardened(lab, first_run, unit):
    name = _registry_name(lab) if "registry" in unit else _gateway_name(lab)
    props = dict(line.split("=", 1) for line in lab.ssh(name, [
        "systemctl", "show", unit, "-p", "UMask", "-p", "ProtectKernelModules", "-p",
        "RestrictNamespaces", "-p", "MemoryMax", "-p", "TasksMax", "-p", "SystemCallFilter",
        "-p", "ActiveState"], check=True).stdout.splitlines() if "=" in line)
    assert props["ActiveState"] == "active"
    assert props["UMask"] == "0077" and props["ProtectKernelModules"] == "yes"
    assert props["TasksMax"] == "64" and props["MemoryMax"] not in ("", "infinity")
    assert props["SystemCallFilter"].strip(), "no system call filter"
    out = lab.ssh(name, ["systemd-analyze", "security", "--no-pager", unit], check=True).stdout
    score = float(re.search(r"Overall exposure level for \S+: ([\d.]+)", out).group(1))
    _say(f"{unit}: systemd-analyze security exposure {score}")
    assert score <= EXPOSURE_BOUND[unit], out[-3000:]


def test_lab_teardown_is_clean(lab):
    # Last in the module: the lab goes down here, so what is left can be checked
    # against what it made. While it runs, `python -m lab vm status` finds its state.
    assert Path(lab.state.dir, "vmlab.json").is_file()
    assert lab.net in list_netns()
    assert all(v.pid and procs.alive(v.pid) for v in lab.state.vms)
    t0 = time.monotonic()
    problems = lab.down()
    TIMINGS["poweroff"] = time.monotonic() - t0
    assert problems == []  # every VM powered off by itself, every namespace deleted
    assert _leftovers(lab) == []
