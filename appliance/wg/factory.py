"""Pick a backend, open or create an interface.

`auto` decides like wg(8): an answering UAPI socket for the interface wins (a
userspace implementation serves it), otherwise the kernel over netlink.
"""

from __future__ import annotations

from collections.abc import Iterable

from . import link, netlink, uapi
from .device import WgDevice, check_ifname
from .errors import BackendUnavailable, InterfaceMissing, InvalidConfig, NotWireGuard
from .model import IPInterface, check_key

BACKENDS = ("auto", "netlink", "uapi")


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise InvalidConfig(f"backend {backend!r}: choose one of {', '.join(BACKENDS)}")


def choose_backend(ifname: str, *, netns: str | None = None) -> str:
    """'uapi' or 'netlink' for an existing interface; InterfaceMissing/NotWireGuard if none."""
    check_ifname(ifname)
    if uapi.socket_alive(uapi.socket_path(ifname)):
        return "uapi"
    kind = link.link_kind(ifname, netns=netns)
    if kind == "wireguard":
        return "netlink"
    if kind is None:
        raise InterfaceMissing(
            f"{ifname}: no WireGuard interface of that name: no UAPI socket at "
            f"{uapi.socket_path(ifname)} and no kernel link", ifname=ifname)
    raise NotWireGuard(
        f"{ifname}: is a {kind or 'plain'} link with no UAPI socket at "
        f"{uapi.socket_path(ifname)}; if it is a wireguard-go tun, its process has died",
        ifname=ifname)


def open_device(ifname: str, backend: str = "auto", *, netns: str | None = None,
                timeout: float = uapi.DEFAULT_TIMEOUT) -> WgDevice:
    """A handle on an existing interface; InterfaceMissing when there is none.

    `netns` is where the kernel link lives (the UAPI socket is the same in every
    namespace); `timeout` bounds each UAPI exchange."""
    _check_backend(backend)
    chosen = choose_backend(ifname, netns=netns) if backend == "auto" else backend
    if chosen == "uapi":
        return uapi.open_uapi(ifname, timeout=timeout)
    return netlink.open_netlink(ifname, netns=netns)


def create_device(ifname: str, *, private_key: str, listen_port: int | None = None,
                  addresses: Iterable[str | IPInterface] = (), up: bool = True,
                  backend: str = "auto", netns: str | None = None,
                  output: int | None = None) -> WgDevice:
    """Create and configure a new interface: a kernel link, or (backend uapi, or auto
    on a kernel without WireGuard) a wireguard-go process, then in `.process`.

    `output` is where wireguard-go's stdout/stderr go (inherited by default)."""
    _check_backend(backend)
    private_key = check_key(private_key, "private key")
    addrs = [link.parse_interface_address(a) for a in addresses]
    if backend in ("auto", "netlink"):
        try:
            return netlink.create(ifname, private_key=private_key, listen_port=listen_port,
                                  addresses=addrs, up=up, netns=netns)
        except BackendUnavailable:
            if backend == "netlink":
                raise
    return uapi.create(ifname, private_key=private_key, listen_port=listen_port,
                       addresses=addrs, up=up, netns=netns, output=output)


def ensure_device(ifname: str, *, private_key: str | None = None,
                  listen_port: int | None = None,
                  addresses: Iterable[str | IPInterface] = (), up: bool = True,
                  backend: str = "auto", netns: str | None = None,
                  output: int | None = None) -> WgDevice:
    """Adopt the interface if it exists, else create it (what `gateway run` needs).

    An adopted interface is left as it is, except that it gets `private_key` if
    it has none. Check `.created` to know which happened."""
    try:
        dev = open_device(ifname, backend, netns=netns)
    except InterfaceMissing:
        if private_key is None:
            raise InterfaceMissing(
                f"{ifname}: does not exist, and no private key was given to create it",
                ifname=ifname) from None
        return create_device(ifname, private_key=private_key, listen_port=listen_port,
                             addresses=addresses, up=up, backend=backend, netns=netns,
                             output=output)
    if private_key is not None and dev.info().private_key is None:
        dev.configure(private_key=private_key)
    return dev
