"""Network namespaces, veth pairs and wireguard-go: the lab's building blocks.

Thin wrappers over iproute2 and Debian's wireguard-go. Everything made here is
recorded in a `Cleanup` stack so that a failed or interrupted run removes it.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

UAPI_DIR = Path("/var/run/wireguard")
# wireguard-go refuses to start when it believes the kernel has WireGuard.
WG_GO_ENV = {"WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1"}


class LabError(RuntimeError):
    pass


def sh(cmd: Sequence[str], *, check: bool = True, input: str | None = None,
       timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run a command, capture its output, raise LabError with stderr on failure."""
    proc = subprocess.run(list(cmd), capture_output=True, text=True, input=input, timeout=timeout)
    if check and proc.returncode != 0:
        raise LabError(f"{shlex.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


class Cleanup:
    """A LIFO stack of undo actions; each runs once, errors are collected, not raised."""

    def __init__(self) -> None:
        self._actions: list[tuple[str, Callable[[], object]]] = []

    def push(self, what: str, action: Callable[[], object]) -> None:
        self._actions.append((what, action))

    def run(self) -> list[str]:
        problems = []
        while self._actions:
            what, action = self._actions.pop()
            try:
                action()
            except Exception as e:  # noqa: BLE001 - cleanup must go on
                problems.append(f"{what}: {e}")
        return problems


class Netns:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"Netns({self.name!r})"

    def cmd(self, args: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *args]

    def run(self, args: Sequence[str], **kw) -> subprocess.CompletedProcess[str]:
        return sh(self.cmd(args), **kw)

    def popen(self, args: Sequence[str], env: dict[str, str] | None = None,
              **kw) -> subprocess.Popen:
        full_env = dict(os.environ, **(env or {}))
        return subprocess.Popen(self.cmd(args), env=full_env, **kw)

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return sh(["ip", "-n", self.name, *args], check=check)

    def exists(self) -> bool:
        return self.name in list_netns()


def list_netns() -> list[str]:
    out = sh(["ip", "netns", "list"]).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def create_netns(name: str, cleanup: Cleanup | None = None) -> Netns:
    sh(["ip", "netns", "add", name])
    ns = Netns(name)
    if cleanup is not None:
        cleanup.push(f"netns {name}", lambda: delete_netns(name))
    ns.ip("link", "set", "lo", "up")
    return ns


def kill_netns_processes(name: str) -> None:
    """Kill whatever still runs inside a namespace (wireguard-go, servers, pings)."""
    pids = sh(["ip", "netns", "pids", name], check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


def delete_netns(name: str) -> None:
    if name not in list_netns():
        return
    kill_netns_processes(name)
    sh(["ip", "netns", "del", name])


def veth(a: Netns, a_if: str, b: Netns, b_if: str) -> None:
    """A veth pair from a to b; deleting either namespace removes both ends."""
    sh(["ip", "link", "add", a_if, "netns", a.name, "type", "veth", "peer", "name", b_if,
        "netns", b.name])
    a.ip("link", "set", a_if, "up")
    b.ip("link", "set", b_if, "up")


def uapi_socket(ifname: str) -> Path:
    return UAPI_DIR / f"{ifname}.sock"


class WireguardGo:
    """A wireguard-go process serving one interface inside a namespace."""

    def __init__(self, ns: Netns, ifname: str) -> None:
        if len(ifname) > 15:
            raise LabError(f"interface name {ifname!r} is longer than 15 characters")
        self.ns = ns
        self.ifname = ifname
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 5.0) -> WireguardGo:
        if uapi_socket(self.ifname).exists():
            raise LabError(f"{uapi_socket(self.ifname)} exists: interface name already in use")
        self.proc = self.ns.popen(["wireguard-go", "-f", self.ifname], env=WG_GO_ENV,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while not uapi_socket(self.ifname).exists():
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise LabError(f"wireguard-go {self.ifname} exited: {err.strip()}")
            if time.monotonic() > deadline:
                self.stop()
                raise LabError(f"wireguard-go {self.ifname}: no UAPI socket after {timeout}s")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stderr:
            self.proc.stderr.close()
        with contextlib.suppress(FileNotFoundError):
            uapi_socket(self.ifname).unlink()
        self.ns.ip("link", "del", self.ifname, check=False)


def start_wireguard_go(ns: Netns, ifname: str, cleanup: Cleanup | None = None) -> WireguardGo:
    wg = WireguardGo(ns, ifname).start()
    if cleanup is not None:
        cleanup.push(f"wireguard-go {ifname}", wg.stop)
    return wg


def wg(args: Sequence[str], *, input: str | None = None, ns: str | None = None) -> str:
    """Run wg(8). It reaches wireguard-go through the UAPI socket from any namespace;
    a kernel interface only from its own, `ns`."""
    cmd = ["wg", *args] if ns is None else ["ip", "netns", "exec", ns, "wg", *args]
    return sh(cmd, input=input).stdout
