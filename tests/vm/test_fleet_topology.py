"""The Vagrant lab and the VM lab describe the same fleet, and the Vagrantfile is valid.

VM tier: these run the machine's ruby (to read the Vagrantfile) and vagrant.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from lab import addressing, fleet
from lab.vm.lab import VMHost, VMLabState, inventory_groups

pytestmark = pytest.mark.vm

ROOT = Path(__file__).resolve().parents[2]
# Loads the Vagrantfile with a do-nothing Vagrant.configure and prints its FLEET.
RUBY_DUMP = 'module Vagrant; def self.configure(*) = nil; end; load "Vagrantfile"; ' \
            'puts JSON.generate(FLEET)'


def vagrant_fleet(gateways: int, clients: int) -> list[dict]:
    p = subprocess.run(["ruby", "-rjson", "-e", RUBY_DUMP], cwd=ROOT, capture_output=True,
                       text=True, timeout=60, env={"PATH": "/usr/bin:/bin",
                                                   "WGJIT_GATEWAYS": str(gateways),
                                                   "WGJIT_CLIENTS": str(clients)})
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def lab_inventory(tmp_path: Path, monkeypatch, gateways: int) -> dict:
    """inventory/lab.py's groups for a VM lab of this size (state faked, nothing booted)."""
    import lab.vm.lab as vm_lab

    monkeypatch.setattr(vm_lab, "VM_STATE_ROOT", tmp_path)
    d = tmp_path / "wvtest"
    d.mkdir()
    st = VMLabState(prefix="wvtest", dir=str(d), created=0.0, ssh_key=str(d / "key"))
    for h in fleet.servers(gateways):
        st.vms.append(VMHost(name=h.name, roles=list(h.roles), address4=h.address4,
                             tunnel4=h.tunnel4, tap="", mac="", disk="", console_log="",
                             memory_mb=0))
    st.save()
    return inventory_groups("wvtest")


@pytest.mark.parametrize("gateways,clients", [(1, 2), (3, 5)])
def test_vagrant_and_vm_lab_describe_the_same_fleet(tmp_path, monkeypatch, gateways, clients):
    vagrant = vagrant_fleet(gateways, clients)
    groups = lab_inventory(tmp_path, monkeypatch, gateways)
    # Servers: the same names, groups, addresses and tunnel addresses.
    vm_servers = {name: (group, data) for group, hosts in groups.items()
                  for name, data in hosts}
    v_servers = {h["name"]: h for h in vagrant if "clients" not in h["groups"]}
    assert set(v_servers) == set(vm_servers)
    for name, h in v_servers.items():
        group, data = vm_servers[name]
        assert h["groups"] == [group]
        assert h["ip"] == data["ssh_hostname"]
        assert h["data"].get("wg_address") == data.get("wg_address")
    reg = next(h for h in vagrant if h["groups"] == ["registry"])
    assert all(data["registry_url"] == f"https://{reg['ip']}:{addressing.REGISTRY_PORT}"
               for _, data in vm_servers.values())
    # Clients: the lab's tunnel plan and round-robin gateways; on the servers' net.
    v_clients = [h for h in vagrant if h["groups"] == ["clients"]]
    assert [h["name"] for h in v_clients] == [f"c{n}" for n in range(1, clients + 1)]
    servers = fleet.servers(gateways)
    for n, h in enumerate(v_clients, 1):
        want = fleet.vagrant_client(n)
        assert h["ip"] == want.address4
        assert h["data"]["wg_address"] == [addressing.client_tunnel(n)[0]] == [want.tunnel4]
        gw = fleet.gateway_for_client(n, servers)
        assert h["data"]["gateway"] == gw.name
        assert h["data"]["gateway_endpoint"] == f"{gw.address4}:{addressing.WG_PORT}"


def test_fleet_uses_documentation_ranges_only():
    import ipaddress

    allowed = [ipaddress.ip_network(n) for n in ("192.0.2.0/24", "198.51.100.0/24",
                                                 "203.0.113.0/24", "198.18.0.0/15")]
    for h in vagrant_fleet(2, 3):
        addrs = [h["ip"], *(a.split("/")[0] for a in h["data"].get("wg_address", [])
                            if ":" not in a)]
        for a in addrs:
            assert any(ipaddress.ip_address(a) in n for n in allowed), (h["name"], a)


def test_vagrant_validate():
    p = subprocess.run(["vagrant", "validate", "--ignore-provider"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "validated successfully" in p.stdout
