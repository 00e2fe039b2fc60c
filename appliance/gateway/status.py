"""`wgjit gateway status`: what a running gateway holds and how it is doing.

The daemon answers `GET /status` on its local metrics endpoint (the same
`--metrics-listen` address as /metrics and /healthz, loopback by default) with
one JSON document; this module reads it and prints it for a person, or passes
it through with `--json` for scripts. Read-only: nothing here changes the
daemon.

Counters only ever grow, so "drops in the last minute" needs a memory of what
they were a minute ago: `RecentCounts` keeps a few snapshots, taken by the
daemon's scheduler every `SAMPLE_SECONDS`.
"""

from __future__ import annotations

import collections
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping

WINDOW_SECONDS = 60.0
SAMPLE_SECONDS = 10.0


class RecentCounts:
    """Per-label increases of a counter over the last WINDOW_SECONDS.

    Snapshots older than the window are dropped except the newest of them,
    which is the baseline; until a minute has passed the baseline is the
    first snapshot (counted from start)."""

    def __init__(self, read: Callable[[], Mapping[str, float]],
                 window: float = WINDOW_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._read = read
        self._window = window
        self._clock = clock
        self._snapshots: collections.deque[tuple[float, dict[str, float]]] = collections.deque()
        self.sample()

    def sample(self) -> None:
        now = self._clock()
        self._snapshots.append((now, dict(self._read())))
        while len(self._snapshots) > 1 and self._snapshots[1][0] <= now - self._window:
            self._snapshots.popleft()

    def last_window(self) -> dict[str, int]:
        """Increase per label since the baseline, up to the latest read (not only
        the latest snapshot), labels that did not move left out."""
        base = self._snapshots[0][1]
        now = self._read()
        return {label: int(value - base.get(label, 0.0))
                for label, value in sorted(now.items()) if value - base.get(label, 0.0) > 0}


def counter_by_label(counter) -> Callable[[], dict[str, float]]:
    """A reader of a one-label prometheus_client Counter's current values."""

    def read() -> dict[str, float]:
        out: dict[str, float] = {}
        for family in counter.collect():
            for sample in family.samples:
                if sample.name.endswith("_total") and sample.labels:
                    out[next(iter(sample.labels.values()))] = sample.value
        return out

    return read


def fetch(listen: str, timeout: float = 5.0) -> dict:
    """The daemon's /status document from its metrics endpoint HOST:PORT."""
    host, _, port = listen.rpartition(":")
    if ":" in host.strip("[]"):
        host = f"[{host.strip('[]')}]"
    with urllib.request.urlopen(f"http://{host}:{port}/status", timeout=timeout) as resp:
        return json.load(resp)


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def render(s: dict) -> str:
    """The status document as an aligned table for a terminal."""
    rows: list[tuple[str, str]] = []
    add = rows.append
    add(("status", s["status"]))
    add(("interface", f"{s['interface']} ({s['backend']}, port {s['listen_port']}, "
                      f"install mode {s['install_mode']})"))
    add(("uptime", f"{s['uptime_seconds']:.0f} s"))
    peers = s["peers"]
    cap = f", cap {peers['max']}" if peers.get("max") else ""
    add(("peers", f"{peers['installed']} installed, {peers['awaiting_handshake']} "
                  f"awaiting a handshake{cap}"))
    cache = s["cache"]
    add(("cache", ", ".join(f"{n} {kind}" for kind, n in sorted(cache.items())) or "empty"))
    for i, server in enumerate(s["registry_servers"]):
        state = "up" if server["up"] else f"DOWN ({server.get('last_error') or 'no answer'})"
        add(("registry" if i == 0 else "", f"{server['url']}  {state}"))
    feed = s["feed"]
    add(("feed", f"cursor {feed['cursor']}, "
                 f"{'following' if feed['healthy'] else 'BEHIND'}, "
                 f"last caught up {_ago(feed['caught_up_seconds_ago'])}"))
    known = s.get("known_keys")
    add(("known keys", "not loaded" if known is None else str(known)))
    add(("under load", "yes (cookie replies)" if s.get("under_load") else "no"))
    if s.get("dataplane_issuing_cookies"):  # cookie_learn.py
        add(("", "the data plane is sending cookie replies: ours are withheld"))
    last = s.get("last_evict_pass") or {}
    add(("last eviction", "none yet" if not last else
         f"{_ago(last.get('seconds_ago'))}: {last['evicted']} of {last['peers']} peers "
         f"in {last['seconds'] * 1000:.0f} ms"))
    drops = s.get("drops_last_minute") or {}
    add(("drops (1 min)", ", ".join(f"{reason} {n}" for reason, n in drops.items()) or "none"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
