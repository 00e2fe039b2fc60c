"""Netlink sockets inside a named network namespace, without forking.

pyroute2's own `netns=` forks a child to open the socket and SIGTERMs it after.
The child is a copy of the caller: if the caller has a Python SIGTERM handler
(a daemon's graceful shutdown, the lab's test fixtures), the handler runs in the
child and unwinds the caller's copied stack there, running its cleanup code in
the wrong process (seen: a forked child SIGKILLing the wireguard-go its parent had
just started). A network namespace is per thread, so a throwaway thread can
enter it and open the socket; the socket stays in that namespace and the fd is
handed to pyroute2 (`fileno=`).
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import threading
from pathlib import Path

from .errors import PermissionDenied, WgError

CLONE_NEWNET = 0x40000000
NETNS_DIR = Path("/run/netns")
_libc = ctypes.CDLL(None, use_errno=True)


def netlink_socket_fd(netns: str, proto: int) -> int:
    """An AF_NETLINK socket of `proto` opened inside namespace `netns`; the caller owns
    the returned fd (pass it to pyroute2 as fileno=, which then closes it)."""
    if "/" in netns or netns in {"", ".", ".."}:
        raise WgError(f"network namespace name {netns!r} is not valid")
    result: dict[str, object] = {}

    def enter_and_open() -> None:
        try:
            fd = os.open(NETNS_DIR / netns, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            result["error"] = WgError(f"network namespace {netns!r} does not exist "
                                      f"(no {NETNS_DIR / netns})")
            return
        except OSError as e:
            result["error"] = e
            return
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                code = ctypes.get_errno()
                result["error"] = (PermissionDenied if code == errno.EPERM else WgError)(
                    f"entering network namespace {netns!r}: {os.strerror(code)}", errno=code)
                return
        finally:
            os.close(fd)
        try:
            result["fd"] = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, proto).detach()
        except OSError as e:
            result["error"] = e

    # The thread ends inside the other namespace; nothing else ever runs on it.
    t = threading.Thread(target=enter_and_open, name=f"netns-{netns}", daemon=True)
    t.start()
    t.join()
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    return result["fd"]  # type: ignore[return-value]
