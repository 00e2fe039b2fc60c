"""Errors of the WireGuard device backends, one base class for callers to catch.

Messages name the interface and say what to do, because they end up in the
gateway's log in front of an operator.
"""

from __future__ import annotations

import errno as errno_mod
import os


class WgError(RuntimeError):
    """Base of every error a device backend raises."""

    def __init__(self, message: str, *, ifname: str | None = None,
                 errno: int | None = None) -> None:
        super().__init__(message)
        self.ifname = ifname
        self.errno = errno


class InterfaceMissing(WgError):
    """No WireGuard interface of that name (no link, no UAPI socket, or a stale socket)."""


class InterfaceExists(WgError):
    """Asked to create an interface whose name is taken."""


class NotWireGuard(WgError):
    """The interface exists but is not a WireGuard device."""


class PermissionDenied(WgError):
    """The kernel or the UAPI socket refused us: run as root or with CAP_NET_ADMIN."""


class BackendUnavailable(WgError):
    """The chosen backend cannot work here (no kernel module, no wireguard-go binary)."""


class ProtocolError(WgError):
    """The device answered something we cannot parse, or rejected a request (errno != 0)."""


class DeviceTimeout(WgError):
    """The device did not answer in time."""


class InvalidConfig(WgError, ValueError):
    """A peer or device setting that cannot be sent (bad key, bad CIDR, bad port)."""


def errno_text(code: int) -> str:
    """'EINVAL (Invalid argument)' for logs; the symbolic name is what people search for."""
    name = errno_mod.errorcode.get(code, f"errno {code}")
    return f"{name} ({os.strerror(code)})"
