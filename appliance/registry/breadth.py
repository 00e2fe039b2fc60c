"""Which client networks are too broad to register without an admin's say-so.

Every tenant's peers share one WireGuard interface on a gateway, where a
packet goes to the peer with the most specific allowed IP that matches it. A
peer holding 0.0.0.0/0 or ::/0 (or the 0.0.0.0/1 + 128.0.0.0/1 pair, which
covers the same space) draws to itself every destination no other peer holds
more specifically, on every gateway: one tenant would receive traffic meant
for networks it has no claim on. So a client peer may hold at most:

- IPv4 /16 (65,536 addresses): a large site network (the size of
  192.168.0.0/16), while the whole tunnel range, 198.18.0.0/15, is broader and
  stays out of a tenant's reach;
- IPv6 /48: the customary assignment to one end site (RFC 6177).

Anything broader (a shorter prefix) needs `allow_broad`, which only an admin
token that is not limited to a tenant may set, e.g. for a site router that
really routes a /8.
"""

from __future__ import annotations

from appliance.registry.cidr import Net

# The shortest prefix a client peer may hold without allow_broad, per family.
SHORTEST_PREFIX = {4: 16, 6: 48}


def prefix_len(net: Net) -> int:
    return int(net.cidr.rpartition("/")[2])


def too_broad(net: Net) -> bool:
    return prefix_len(net) < SHORTEST_PREFIX[net.family]


def first_too_broad(nets: list[Net]) -> int | None:
    """The index of the first network broader than the limit, or None."""
    for i, net in enumerate(nets):
        if too_broad(net):
            return i
    return None


def problem(net: Net) -> str:
    """Why `net` is refused, for an error message."""
    return (f"{net.cidr} is broader than /{SHORTEST_PREFIX[net.family]}, which would draw"
            " traffic meant for other peers on the shared gateways; an admin token without"
            " a tenant limit may allow it with allow_broad")
