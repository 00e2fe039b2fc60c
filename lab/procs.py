"""Long-lived processes inside lab namespaces, and stopping them.

A lab's daemons must outlive `python -m lab up`, so they run in their own session
with output in log files (a pipe to a parent that has exited would kill them on
their next write). Stopping goes by namespace, not by remembered pid: whatever
runs in a lab namespace belongs to the lab, and a stale pid can never hit an
unrelated process.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from lab.netns import WG_GO_ENV, sh

# Processes this Python process started: they must be reaped, or they linger as
# zombies that look like leftovers.
_children: dict[int, subprocess.Popen] = {}


def spawn(ns: str, argv: Sequence[str], log: str | os.PathLike[str],
          env: Mapping[str, str] | None = None) -> int:
    """Start argv inside namespace ns, detached, stdout+stderr appended to log."""
    full_env = dict(os.environ, **(env or {}))
    with open(log, "ab") as out:
        # `ip netns exec` execs argv, so the pid is the daemon's own.
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, env=full_env,
                                start_new_session=True, close_fds=True)
    _children[proc.pid] = proc
    return proc.pid


# wireguard-go holds one inotify instance (it watches its UAPI socket's directory),
# and Linux allows 128 per user by default: past ~120 interfaces the next ones fail
# with "Failed to listen on uapi socket: too many open files". Labs go to 500+.
INOTIFY_INSTANCES = Path("/proc/sys/fs/inotify/max_user_instances")
MIN_INOTIFY_INSTANCES = 4096


@functools.cache
def _enough_inotify_instances() -> None:
    with contextlib.suppress(OSError, ValueError):
        if int(INOTIFY_INSTANCES.read_text()) < MIN_INOTIFY_INSTANCES:
            INOTIFY_INSTANCES.write_text(f"{MIN_INOTIFY_INSTANCES}\n")


def spawn_wireguard_go(ns: str, ifname: str, log: str | os.PathLike[str]) -> int:
    _enough_inotify_instances()
    # WGJIT_LAB_WG_LOG_LEVEL=verbose logs every handshake message (bench/flood.py --logs).
    level = os.environ.get("WGJIT_LAB_WG_LOG_LEVEL", "error")
    return spawn(ns, ["wireguard-go", "-f", ifname], log, env={**WG_GO_ENV, "LOG_LEVEL": level})


def alive(pid: int) -> bool:
    if pid <= 0:
        return False
    child = _children.get(pid)
    if child is not None:
        return child.poll() is None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    # The state letter follows the parenthesised command name; Z is a zombie.
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def exit_status(pid: int) -> int | None:
    child = _children.get(pid)
    return child.poll() if child is not None else None


def in_netns(pid: int, ns: str) -> bool:
    """Does pid live in named namespace ns? Guards against killing a reused pid."""
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/run/netns/{ns}").st_ino
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False


def netns_pids(ns: str) -> list[int]:
    out = sh(["ip", "netns", "pids", ns], check=False).stdout.split()
    return [int(p) for p in out if p.isdigit()]


def stop(pids: Iterable[tuple[int, int]], grace: float = 3.0) -> list[int]:
    """Send each (pid, signal), SIGKILL what is still there after grace; return those."""
    pending = []
    for pid, sig in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
            pending.append(pid)
    deadline = time.monotonic() + grace
    while pending and time.monotonic() < deadline:
        pending = [p for p in pending if alive(p)]
        if pending:
            time.sleep(0.02)
    killed = []
    for pid in pending:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
    for pid in killed:
        for _ in range(100):
            if not alive(pid):
                break
            time.sleep(0.01)
    for pid in list(_children):
        if _children[pid].poll() is not None:
            del _children[pid]
    return killed


def tail(path: str | os.PathLike[str], lines: int = 15) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return ""
