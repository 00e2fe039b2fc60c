"""The Debian packages each role needs, in one place.

The VM lab's image builder installs the same lists at debootstrap time, so the
deploy's apt step finds them there and needs no network inside the lab; on a
real fleet that step installs them.
"""

from __future__ import annotations

# Every host: the venv the appliance lives in, and the tools the units call.
COMMON = ["python3", "python3-venv", "iproute2", "ca-certificates"]
REGISTRY = ["sqlite3"]
# The gateway creates a kernel WireGuard interface; `wg` sets its key and port.
GATEWAY = ["wireguard-tools", "kmod"]
CLIENT = ["wireguard-tools", "iputils-ping"]
# Debian's PostgreSQL (15 on bookworm) for the registry's fleet engine.
POSTGRES = ["postgresql"]


def for_roles(*roles: str) -> list[str]:
    """The union of the lists for these roles ("registry", "gateway", "client",
    "postgres"), sorted."""
    by_role = {"registry": REGISTRY, "gateway": GATEWAY, "client": CLIENT,
               "postgres": POSTGRES}
    wanted = set(COMMON)
    for role in roles:
        wanted.update(by_role[role])
    return sorted(wanted)


def all_roles() -> list[str]:
    return for_roles("registry", "gateway", "client", "postgres")
