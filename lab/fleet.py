"""The fleet the VM lab and the Vagrant lab both build: who is who, at which address.

One registry, G gateways, C clients. Servers sit on the lab's server net
(lab/addressing.py); gateway gN owns tunnel address 198.18.0.N and client cN
198.18.1.N. The Vagrantfile spells the same plan in Ruby; a test compares the two.
In the VM lab clients are network namespaces (wireguard-go); under Vagrant they
are VMs on the same flat private network as the servers, since Vagrant gives no
router between networks.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from lab import addressing

REGISTRY_NAME = "registry"
# Pyinfra inventory groups; deploy.py picks a host's roles from them.
GROUPS = {"registry": "registry", "gateway": "gateways", "client": "clients"}
# Vagrant clients: same net as the servers, from .101 (gateways use .11-.109 at most 99).
VAGRANT_CLIENT_BASE = 100


@dataclass(frozen=True)
class FleetHost:
    name: str
    roles: tuple[str, ...]
    address4: str  # underlay, without prefix length
    tunnel4: str = ""  # with prefix length; gateways and clients
    extra: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    @property
    def groups(self) -> list[str]:
        return [GROUPS[r] for r in self.roles]


def servers(gateways: int = 1, *, combined: bool = False) -> list[FleetHost]:
    """The registry and gateway hosts; combined: the registry also runs gateway g1."""
    if not 1 <= gateways <= addressing.MAX_GATEWAYS:
        raise ValueError(f"gateways: 1..{addressing.MAX_GATEWAYS}")
    reg4, _ = addressing.registry_underlay()
    hosts = []
    if combined:
        t4, _ = addressing.gateway_tunnel(1)
        hosts.append(FleetHost(REGISTRY_NAME, ("registry", "gateway"), reg4, t4))
    else:
        hosts.append(FleetHost(REGISTRY_NAME, ("registry",), reg4))
    for n in range(2 if combined else 1, gateways + 1):
        u4, _ = addressing.gateway_underlay(n)
        t4, _ = addressing.gateway_tunnel(n)
        hosts.append(FleetHost(f"gw{n}", ("gateway",), u4, t4))
    return hosts


def vagrant_client(n: int) -> FleetHost:
    net = addressing.SERVER_NET4
    t4, _ = addressing.client_tunnel(n)
    return FleetHost(f"c{n}", ("client",), str(net[VAGRANT_CLIENT_BASE + n]), t4)


def registry_url(hosts: list[FleetHost]) -> str:
    reg = next(h for h in hosts if "registry" in h.roles)
    return f"https://{reg.address4}:{addressing.REGISTRY_PORT}"


def gateway_for_client(n: int, gateways: list[FleetHost]) -> FleetHost:
    """Round robin, as the namespace lab does."""
    gws = [h for h in gateways if "gateway" in h.roles]
    return gws[(n - 1) % len(gws)]


def prefix_len() -> int:
    return ipaddress.ip_network(addressing.SERVER_NET4).prefixlen
