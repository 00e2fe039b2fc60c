"""Run Python calls inside a network namespace from one worker thread that entered it.

setns(2) with CLONE_NEWNET moves only the calling thread, and a socket stays in
the namespace it was made in; so the lab can speak HTTP to daemons on its
underlay without wiring the host's own namespace into the lab. Python 3.11 has
no os.setns (3.12 does), hence the two lines of ctypes.

Close the worker when done: its thread and any open socket keep the namespace,
and every veth in it, alive after `ip netns del`.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/run/netns"

T = TypeVar("T")

_libc = ctypes.CDLL(None, use_errno=True)


def _enter(ns: str) -> None:
    fd = os.open(os.path.join(NETNS_RUN_DIR, ns), os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {ns}: {os.strerror(err)}")
    finally:
        os.close(fd)


class NetnsWorker:
    """A single thread living in namespace ns; call() runs a function there."""

    def __init__(self, ns: str) -> None:
        self.ns = ns
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"netns-{ns}",
                                        initializer=_enter, initargs=(ns,))
        self._closers: list[Callable[[], Any]] = []

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return self._pool.submit(fn, *args, **kwargs).result()

    def on_close(self, fn: Callable[[], Any]) -> None:
        """Run fn in the worker before it stops (e.g. close an HTTP session's sockets)."""
        self._closers.append(fn)

    def close(self) -> None:
        for fn in self._closers:
            # Closing must go on; the thread's exit frees whatever this left.
            with contextlib.suppress(Exception):
                self.call(fn)
        self._closers.clear()
        self._pool.shutdown(wait=True)

    def __enter__(self) -> NetnsWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
