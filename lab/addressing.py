"""The lab's address plan: documentation ranges on the underlay, 198.18.0.0/15 and
fd00::/8 in the tunnels. Never private ranges: the lab must not look like a real
network to anything that leaks out of it.

Underlay ("the internet", a bridge in the "<prefix>-net" namespace that also routes):
  servers  192.0.2.0/24      2001:db8:1::/64   router .1 / ::1, registry server N .1+N
                                               (N <= 9), gateway gN .10+N
  clients  198.51.100.0/24   2001:db8:2::/64   client cN: .1+N (N <= 253)
           203.0.113.0/24                      then .N-252 (N <= 506)
Tunnel:
  gateway gN  198.18.0.N/16  fd00::N/64   (every gateway routes the whole tunnel net)
  client  cN  198.18.1.0 + N /32, fd00::1:0 + N /128
"""

from __future__ import annotations

import ipaddress

SERVER_NET4 = ipaddress.ip_network("192.0.2.0/24")
SERVER_NET6 = ipaddress.ip_network("2001:db8:1::/64")
CLIENT_NETS4 = (ipaddress.ip_network("198.51.100.0/24"), ipaddress.ip_network("203.0.113.0/24"))
CLIENT_NET6 = ipaddress.ip_network("2001:db8:2::/64")
TUNNEL_NET4 = ipaddress.ip_network("198.18.0.0/16")
TUNNEL_NET6 = ipaddress.ip_network("fd00::/64")

ROUTER4 = [str(SERVER_NET4[1]), *(str(n[1]) for n in CLIENT_NETS4)]
ROUTER6 = [str(SERVER_NET6[1]), str(CLIENT_NET6[1])]

UNDERLAY_IF = "ul0"  # every host's leg into the internet
MAX_GATEWAYS = 99
MAX_REGISTRIES = 9  # registry servers sit below the gateways' .11
MAX_CLIENTS = 506
REGISTRY_PORT = 8080
# WireGuard's customary port; every gateway has its own namespace, so all use it.
WG_PORT = 51820
# With an emulated round-trip time, clients reach gateway gN through the relay
# (lab/relay.py) in the internet namespace, on the router's server-side address.
RELAY_PORT_BASE = 40000


def relay_listen(n: int, family: int) -> tuple[str, int]:
    """Where the relay stands in for gateway n: (address, port)."""
    return (ROUTER4[0] if family == 4 else ROUTER6[0]), RELAY_PORT_BASE + n


def registry_underlay(n: int = 1) -> tuple[str, str]:
    if not 1 <= n <= MAX_REGISTRIES:
        raise ValueError(f"registry server number {n} outside 1..{MAX_REGISTRIES}")
    return str(SERVER_NET4[1 + n]), str(SERVER_NET6[1 + n])


def gateway_underlay(n: int) -> tuple[str, str]:
    if not 1 <= n <= MAX_GATEWAYS:
        raise ValueError(f"gateway number {n} outside 1..{MAX_GATEWAYS}")
    return str(SERVER_NET4[10 + n]), str(SERVER_NET6[10 + n])


def client_underlay(n: int) -> tuple[str, str, str, str]:
    """(address4, router4, address6, router6) for client n."""
    if not 1 <= n <= MAX_CLIENTS:
        raise ValueError(f"client number {n} outside 1..{MAX_CLIENTS}")
    net4, host = (CLIENT_NETS4[0], 1 + n) if n <= 253 else (CLIENT_NETS4[1], n - 252)
    return str(net4[host]), str(net4[1]), str(CLIENT_NET6[1 + n]), str(CLIENT_NET6[1])


def gateway_tunnel(n: int) -> tuple[str, str]:
    return (f"{TUNNEL_NET4[n]}/{TUNNEL_NET4.prefixlen}",
            f"{TUNNEL_NET6[n]}/{TUNNEL_NET6.prefixlen}")


def client_tunnel(n: int) -> tuple[str, str]:
    return (f"{ipaddress.IPv4Address('198.18.1.0') + n}/32",
            f"{ipaddress.IPv6Address('fd00::1:0') + n}/128")
