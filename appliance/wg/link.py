"""The network interface around a WireGuard device: create, address, up, delete.

rtnetlink through pyroute2's IPRoute, for both backends (wireguard-go makes a tun
link; the kernel a `wireguard` one; addresses and state are set the same way).
"""

from __future__ import annotations

import errno
import ipaddress
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from pyroute2 import IPRoute
from pyroute2.netlink import NETLINK_ROUTE
from pyroute2.netlink.exceptions import NetlinkError

from .device import check_ifname
from .errors import (
    BackendUnavailable,
    InterfaceExists,
    InterfaceMissing,
    InvalidConfig,
    PermissionDenied,
    WgError,
)
from .model import IPInterface
from .nsenter import netlink_socket_fd


@contextmanager
def _iproute(netns: str | None) -> Iterator[IPRoute]:
    # Not IPRoute(netns=...): that forks (see nsenter).
    ipr = IPRoute(fileno=netlink_socket_fd(netns, NETLINK_ROUTE)) if netns else IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


def link_error(e: NetlinkError, ifname: str, doing: str) -> WgError:
    code = e.code
    if code == errno.EEXIST:
        return InterfaceExists(f"{ifname}: an interface of that name exists already ({doing})",
                               ifname=ifname, errno=code)
    if code == errno.ENODEV:
        return InterfaceMissing(f"{ifname}: no such interface ({doing})", ifname=ifname,
                                errno=code)
    if code in (errno.EPERM, errno.EACCES):
        return PermissionDenied(f"{ifname}: {doing} needs root (CAP_NET_ADMIN)", ifname=ifname,
                                errno=code)
    if code == errno.EOPNOTSUPP:
        return BackendUnavailable(
            f"{ifname}: the kernel has no WireGuard ({doing}: Operation not supported); "
            f"`modprobe wireguard`, or use the uapi backend (wireguard-go)",
            ifname=ifname, errno=code)
    return WgError(f"{ifname}: {doing}: {e}", ifname=ifname, errno=code)


def _index(ipr: IPRoute, ifname: str) -> int | None:
    found = ipr.link_lookup(ifname=ifname)
    return found[0] if found else None


def link_kind(ifname: str, *, netns: str | None = None) -> str | None:
    """The link's kind ('wireguard', 'tun', ...), '' for links without one, None if absent."""
    with _iproute(netns) as ipr:
        idx = _index(ipr, ifname)
        if idx is None:
            return None
        (msg,) = ipr.get_links(idx)
    info = msg.get_attr("IFLA_LINKINFO")
    return (info.get_attr("IFLA_INFO_KIND") if info is not None else None) or ""


def create_wireguard_link(ifname: str, *, netns: str | None = None) -> None:
    check_ifname(ifname)
    with _iproute(netns) as ipr:
        try:
            ipr.link("add", ifname=ifname, kind="wireguard")
        except NetlinkError as e:
            raise link_error(e, ifname, "creating a kernel WireGuard link") from e


def delete_link(ifname: str, *, netns: str | None = None) -> bool:
    """Delete the link; False when it was not there."""
    with _iproute(netns) as ipr:
        idx = _index(ipr, ifname)
        if idx is None:
            return False
        try:
            ipr.link("del", index=idx)
        except NetlinkError as e:
            if e.code == errno.ENODEV:
                return False
            raise link_error(e, ifname, "deleting the link") from e
    return True


def parse_interface_address(value: str | IPInterface) -> IPInterface:
    if isinstance(value, ipaddress.IPv4Interface | ipaddress.IPv6Interface):
        return value
    try:
        return ipaddress.ip_interface(str(value).strip())
    except ValueError as e:
        raise InvalidConfig(f"interface address {value!r}: {e}") from e


def configure_link(ifname: str, *, addresses: Iterable[str | IPInterface] = (),
                   up: bool = True, netns: str | None = None) -> None:
    """Add addresses (ones already there are fine) and bring the link up."""
    addrs = [parse_interface_address(a) for a in addresses]
    with _iproute(netns) as ipr:
        idx = _index(ipr, ifname)
        if idx is None:
            raise InterfaceMissing(f"{ifname}: no such interface (adding addresses)",
                                   ifname=ifname)
        for a in addrs:
            try:
                ipr.addr("add", index=idx, address=str(a.ip), prefixlen=a.network.prefixlen)
            except NetlinkError as e:
                if e.code != errno.EEXIST:
                    raise link_error(e, ifname, f"adding address {a}") from e
        if up:
            try:
                ipr.link("set", index=idx, state="up")
            except NetlinkError as e:
                raise link_error(e, ifname, "setting the link up") from e
