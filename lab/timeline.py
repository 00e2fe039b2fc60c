"""The demo's timeline: gateway events, client pings and peer counts on one clock.

The gateway daemon tells its story as JSON lines, one object per line (anything
before the first "{" on a line, such as a logging prefix, is ignored):

    {"ts": 1732540000.123, "event": "initiation_seen", "endpoint": "198.51.100.2:41000"}

`ts` is Unix time in seconds (time.time()); without it the time the line was read
is used, which blurs milliseconds. Events the timeline understands, and their fields:

    initiation_seen      endpoint                    a type-1 message was captured
    identity_recovered   endpoint, public_key        the initiator's static key decrypted
    peer_pulled          public_key, source, [ms]    config fetched; source registry|cache|stale
    peer_unknown         public_key, [reason]        the registry does not know it (or revoked)
    peer_installed       public_key, endpoint, mode  on the device (mode reinject|invert)
    initiation_reinjected  public_key                the captured initiation handed back
    reinjection_answered public_key                  the data plane answered the client
    reinjection_fallback public_key, reason          unanswered: role inversion instead
    handshake_completed  public_key                  session up (trigger keepalive cleared)
    peer_evicted         public_key, reason          reason idle|never_handshaken|revoked
    peer_adopted         public_key                  found on the device at start
    gateway_ready        interface, [peers]          capture running, device adopted

Any other event is printed as it comes, with its endpoint or key if it has one.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

MILESTONES = ("initiation_seen", "identity_recovered", "peer_pulled", "peer_installed",
              "first_reply")
MILESTONE_LABELS = {"initiation_seen": "initiation", "identity_recovered": "identity",
                    "peer_pulled": "pulled", "peer_installed": "installed",
                    "first_reply": "first reply"}


@dataclass
class Event:
    ts: float
    event: str
    fields: dict[str, Any]
    source: str = ""  # which gateway's log

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)


def _ts(value: Any, fallback: float) -> float:
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            from datetime import datetime

            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            pass
    return fallback


def parse_line(line: str, now: float | None = None, source: str = "") -> Event | None:
    """One log line -> Event, or None if it carries no JSON object with an "event"."""
    start = line.find("{")
    if start < 0:
        return None
    try:
        obj = json.loads(line[start:])
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("event"), str):
        return None
    return Event(ts=_ts(obj.get("ts"), now if now is not None else time.time()),
                 event=obj["event"], fields=obj, source=source)


class LineFollower:
    """New complete lines of a growing file, from where the last call stopped."""

    def __init__(self, path: str | os.PathLike[str], from_end: bool = False) -> None:
        self.path = Path(path)
        self.offset = self.path.stat().st_size if from_end and self.path.exists() else 0
        self._partial = b""

    def lines(self) -> list[str]:
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < self.offset:  # truncated (a new ping run): start over
                    self.offset, self._partial = 0, b""
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        data = self._partial + data
        *complete, self._partial = data.split(b"\n")
        return [c.decode(errors="replace") for c in complete]


class EventFollower(LineFollower):
    def __init__(self, path: str | os.PathLike[str], source: str, from_end: bool = False):
        super().__init__(path, from_end)
        self.source = source

    def events(self) -> list[Event]:
        now = time.time()
        return [e for e in (parse_line(x, now, self.source) for x in self.lines()) if e]


# `ping -D` prints "[1732540000.123456] 64 bytes from 198.18.0.1: icmp_seq=1 ttl=64 time=0.4 ms"
_PING_REPLY = re.compile(r"^\[(\d+\.\d+)\] \d+ bytes from ")


class PingFollower(LineFollower):
    def replies(self) -> list[float]:
        return [float(m.group(1)) for m in map(_PING_REPLY.match, self.lines()) if m]


def short_key(key: str) -> str:
    return key[:8] + "…" if key else "?"


def endpoint_host(endpoint: str) -> str:
    """'198.51.100.2:41000' or '[2001:db8::2]:41000' -> the address."""
    if endpoint.startswith("["):
        return endpoint[1:].split("]")[0]
    return endpoint.rsplit(":", 1)[0]


@dataclass
class Attempt:
    """One client connecting: from the lab starting its ping to its first reply."""
    client: str
    started: float
    gateway: str = ""
    note: str = ""
    marks: dict[str, float] = field(default_factory=dict)


class Timeline:
    """Prints each fact as it happens, '[+  1234 ms] who  what', and keeps milestones."""

    def __init__(self, t0: float | None = None, out: TextIO | None = None,
                 names: dict[str, str] | None = None, hosts: dict[str, str] | None = None):
        self.t0 = t0 if t0 is not None else time.time()
        self.out = out or sys.stdout
        self.names = dict(names or {})  # public key -> client name
        self.hosts = dict(hosts or {})  # underlay address -> client name
        self.attempts: list[Attempt] = []
        self.events: list[Event] = []
        self.on_event: list[Callable[[Event], None]] = []

    # -- output --

    def say(self, who: str, text: str, ts: float | None = None) -> None:
        ms = ((ts if ts is not None else time.time()) - self.t0) * 1000
        self.out.write(f"[+{ms:8.0f} ms] {who:<5} {text}\n")
        self.out.flush()

    def heading(self, text: str) -> None:
        self.out.write(f"\n== {text}\n")
        self.out.flush()

    # -- who is who --

    def client_of(self, ev: Event) -> str:
        key = ev.get("public_key")
        if key and key in self.names:
            return self.names[key]
        ep = ev.get("endpoint")
        if ep and ep in self.hosts:  # behind the RTT relay: its upstream "ip:port"
            return self.hosts[ep]
        if ep and endpoint_host(ep) in self.hosts:
            return self.hosts[endpoint_host(ep)]
        return short_key(key) if key else "?"

    def _open_attempt(self, client: str) -> Attempt | None:
        for a in reversed(self.attempts):
            if a.client == client:
                return a if "first_reply" not in a.marks else None
        return None

    # -- facts in --

    def connect(self, client: str, gateway: str, note: str = "",
                ts: float | None = None) -> Attempt:
        a = Attempt(client, ts if ts is not None else time.time(), gateway, note)
        self.attempts.append(a)
        self.say(client, f"starts pinging {gateway} through its tunnel"
                 + (f" ({note})" if note else ""), a.started)
        return a

    def reply(self, client: str, ts: float) -> None:
        a = self._open_attempt(client)
        if a is None or ts < a.started:
            return
        a.marks["first_reply"] = ts
        self.say(client, f"first reply through the tunnel, {(ts - a.started) * 1000:.0f} ms "
                 "after it started", ts)

    def feed(self, ev: Event) -> None:
        self.events.append(ev)
        who = self.client_of(ev)
        gw = ev.source or "gw"
        ep, key = ev.get("endpoint", ""), ev.get("public_key", "")
        text = {
            "initiation_seen": f"{gw} caught a handshake initiation from {ep}",
            "identity_recovered": f"{gw} decrypted the initiator's identity: {short_key(key)}",
            "peer_pulled": f"{gw} pulled the peer from the {ev.get('source', 'registry')}"
                           + (f" in {ev.get('ms'):.0f} ms"
                              if isinstance(ev.get("ms"), (int, float)) else ""),
            "peer_unknown": f"{gw}: not in the registry ({ev.get('reason', 'unknown')}), ignored",
            "peer_installed": (f"{gw} installed the peer and handshakes back to {ep}"
                               if ev.get("mode", "invert") == "invert" else
                               f"{gw} installed the peer (responder, no endpoint)"),
            "initiation_reinjected": f"{gw} handed the client's own initiation back to its "
                                     "data plane",
            "reinjection_answered": f"{gw}: the data plane answered the client's handshake "
                                    "(the client stays the initiator)",
            "reinjection_fallback": f"{gw}: re-injection {ev.get('reason', 'failed')}; "
                                    "handshaking back instead (role inversion)",
            "handshake_completed": f"{gw}: session established",
            "peer_evicted": f"{gw} evicted the peer ({ev.get('reason', 'idle')})",
            "peer_adopted": f"{gw} adopted the peer already on its device",
            "gateway_ready": f"daemon ready on {ev.get('interface', '?')}, "
                             f"{ev.get('peers', 0)} peer(s) adopted",
        }.get(ev.event)
        if text is None:
            extra = " ".join(f"{k}={ev.fields[k]}" for k in ("endpoint", "reason")
                             if k in ev.fields)
            text = f"{gw} {ev.event.replace('_', ' ')} {extra}".rstrip()
        if ev.event == "gateway_ready":
            who = gw
        self.say(who, text, ev.ts)
        a = self._open_attempt(who)
        if a is not None and ev.event in MILESTONES and ev.ts >= a.started:
            a.marks.setdefault(ev.event, ev.ts)
        for cb in self.on_event:
            cb(ev)

    # -- summary --

    def summary(self) -> str:
        """A table of every connection: ms from the client's first ping to each milestone."""
        head = f"{'client':<7}{'gateway':<14}" + "".join(
            f"{MILESTONE_LABELS[m]:>13}" for m in MILESTONES)
        rows = [head, "-" * len(head)]
        for a in self.attempts:
            cells = "".join(
                f"{(a.marks[m] - a.started) * 1000:>10.0f} ms" if m in a.marks else f"{'-':>13}"
                for m in MILESTONES)
            rows.append(f"{a.client:<7}{a.gateway:<14}{cells}"
                        + (f"   {a.note}" if a.note else ""))
        return "\n".join(rows)
