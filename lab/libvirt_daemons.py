"""libvirtd for the Vagrant tier: the one already running, or ours for the while.

The lab machines have no systemd, so nothing starts libvirtd. When it is not
answering, `running()` starts virtlogd and libvirtd by hand inside a network
namespace of their own: the bridges, dnsmasq, ip_forward and firewall rules
libvirt makes for Vagrant's networks then stay off the host's namespace. Vagrant
and everything it runs (ssh, the pyinfra trigger) must run in that namespace to
reach the VMs (`Libvirt.argv`). On leaving, what was started is stopped and the
namespace removed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

URI = "qemu:///system"
NETNS = "wgjit-virt"
# Where `libvirtd -d` and `virtlogd -d` write their pids when run as root.
PID_FILES = {"virtlogd": Path("/run/virtlogd.pid"), "libvirtd": Path("/run/libvirtd.pid")}


class LibvirtError(RuntimeError):
    pass


@dataclasses.dataclass(frozen=True)
class Libvirt:
    netns: str | None  # where Vagrant must run to reach the VMs; None: the host's
    started: dict[str, int]  # daemon name -> pid, for those started here

    def argv(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *argv] if self.netns else argv

    def virsh(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["virsh", "-c", URI, *args], capture_output=True, text=True,
                              timeout=timeout)

    def names(self, *args: str) -> list[str]:
        """`virsh <list command> --name` as a list (domains, networks, volumes)."""
        p = self.virsh(*args)
        if p.returncode != 0:
            raise LibvirtError(f"virsh {' '.join(args)}: {p.stderr.strip()}")
        return [line.strip() for line in p.stdout.splitlines() if line.strip()]

    def volumes(self, pool: str = "default") -> list[str]:
        """Names of the volumes in `pool` ([] when there is no such pool yet)."""
        if pool not in self.names("pool-list", "--all", "--name"):
            return []
        p = self.virsh("vol-list", "--pool", pool)
        if p.returncode != 0:
            raise LibvirtError(f"virsh vol-list {pool}: {p.stderr.strip()}")
        return vol_names(p.stdout)

    def netns_pids(self) -> list[int]:
        """Processes in our namespace (libvirt's daemons, qemu, dnsmasq); [] without one."""
        if not self.netns:
            return []
        p = subprocess.run(["ip", "netns", "pids", self.netns], capture_output=True, text=True)
        return [int(x) for x in p.stdout.split()]


def vol_names(vol_list: str) -> list[str]:
    """The names in `virsh vol-list` output: " Name  Path", a rule of dashes, a row each."""
    rows = vol_list.splitlines()
    start = next((i + 1 for i, row in enumerate(rows) if set(row.strip()) == {"-"}), len(rows))
    return [row.split()[0] for row in rows[start:] if row.strip()]


def answering() -> bool:
    try:
        return subprocess.run(["virsh", "-c", URI, "version"], capture_output=True,
                              timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in _state(pid)


def _state(pid: int) -> str:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("State:"):
                return line.lower()
    except OSError:
        pass
    return ""


def _stop(pid: int, timeout: float = 30) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _start(netns: str, daemon: str) -> int:
    pid_file = PID_FILES[daemon]
    pid_file.unlink(missing_ok=True)
    p = subprocess.run(["ip", "netns", "exec", netns, daemon, "-d"], capture_output=True,
                       text=True, timeout=60)
    if p.returncode != 0:
        raise LibvirtError(f"{daemon} -d: {p.stderr.strip() or p.returncode}")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            return int(pid_file.read_text().split()[0])
        time.sleep(0.1)
    raise LibvirtError(f"{daemon} started but wrote no {pid_file}")


@contextlib.contextmanager
def running(progress: Callable[[str], None] | None = None) -> Iterator[Libvirt]:
    """libvirtd answering on qemu:///system for the block's duration."""
    say = progress or (lambda _m: None)
    if answering():
        say("libvirtd is running; using it")
        yield Libvirt(None, {})
        return
    for tool in ("libvirtd", "virtlogd", "virsh", "dnsmasq"):
        if shutil.which(tool) is None:
            raise LibvirtError(f"{tool} not found: apt-get install libvirt-daemon-system "
                               "libvirt-daemon-driver-qemu libvirt-clients dnsmasq-base")
    if NETNS in subprocess.run(["ip", "netns", "list"], capture_output=True,
                               text=True).stdout.split():
        raise LibvirtError(f"network namespace {NETNS} exists but libvirtd does not answer: "
                           f"left by an earlier run? (`ip netns pids {NETNS}`, then "
                           f"`ip netns del {NETNS}`)")
    subprocess.run(["ip", "netns", "add", NETNS], check=True)
    started: dict[str, int] = {}
    try:
        subprocess.run(["ip", "-n", NETNS, "link", "set", "lo", "up"], check=True)
        for daemon in ("virtlogd", "libvirtd"):
            started[daemon] = _start(NETNS, daemon)
        deadline = time.monotonic() + 60
        while not answering():
            if time.monotonic() > deadline or not alive(started["libvirtd"]):
                raise LibvirtError("libvirtd started but does not answer on " + URI)
            time.sleep(0.5)
        say(f"started virtlogd ({started['virtlogd']}) and libvirtd ({started['libvirtd']}) "
            f"in network namespace {NETNS}")
        yield Libvirt(NETNS, dict(started))
    finally:
        for daemon in ("libvirtd", "virtlogd"):
            if daemon in started:
                _stop(started[daemon])
        # Anything libvirt left in its namespace (a qemu, a dnsmasq) goes with it.
        p = subprocess.run(["ip", "netns", "pids", NETNS], capture_output=True, text=True)
        for pid in (int(x) for x in p.stdout.split()):
            _stop(pid, timeout=10)
        subprocess.run(["ip", "netns", "del", NETNS], capture_output=True)
