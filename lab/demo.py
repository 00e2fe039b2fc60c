"""`python -m lab demo`: just-in-time provisioning, told as a live timeline.

The lab runs the real registry, a JIT gateway (g1: `wgjit gateway run` adopting an
empty wireguard-go interface, re-injection), a pre-provisioned baseline gateway
(g2: peers added with `wg set` ahead of time) and a JIT gateway in role inversion
(g3: `--install-mode invert`) for comparison. Clients connect one by one; each
line is printed as it happens, with milliseconds since the demo began. With
`--rtt MS` every client reaches its gateway through the lab's delaying relay,
which makes the round trip role inversion costs visible.

"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

from lab.netns import LabError
from lab.timeline import EventFollower, PingFollower, Timeline, endpoint_host
from lab.topology import Lab, LabSpec, signals_raise_interrupt

POLL = 0.02


class Watcher:
    """Polls what the timeline reads: daemon logs, client pings, gateway peer counts."""

    def __init__(self, lab: Lab, tl: Timeline) -> None:
        self.lab, self.tl = lab, tl
        self.logs = [EventFollower(g.daemon_log, g.name) for g in lab.state.gateways
                     if g.daemon_log]
        self.pings: dict[str, PingFollower] = {}
        self.peer_counts: dict[str, int] = {}
        self._next_count = 0.0

    def watch_ping(self, client: str) -> None:
        self.pings[client] = PingFollower(self.lab.client(client).ping_log)

    def poll(self) -> None:
        if self.lab.state.relay_log:
            # Behind the relay a gateway sees the relay's address: name the flow.
            for upstream, client in self.lab.relay_flows().items():
                self.tl.hosts.setdefault(upstream, self.tl.hosts.get(endpoint_host(client), "?"))
        for f in self.logs:
            for ev in f.events():
                self.tl.feed(ev)
        for name, f in self.pings.items():
            for ts in f.replies():
                self.tl.reply(name, ts)
        now = time.monotonic()
        if now >= self._next_count:
            self._next_count = now + 0.25
            for g in self.lab.state.gateways:
                peers = self.lab.peers(g.name)
                if self.peer_counts.get(g.name) != len(peers):
                    self.peer_counts[g.name] = len(peers)
                    who = ", ".join(sorted(self.tl.names.get(p.public_key, "?") for p in peers))
                    self.tl.say(g.name, f"holds {len(peers)} peer(s)"
                                + (f": {who}" if who else ""))

    def until(self, done: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            self.poll()
            if done():
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(POLL)

    def idle(self, seconds: float) -> None:
        self.until(lambda: False, seconds)


def _replied(tl: Timeline, client: str) -> Callable[[], bool]:
    def check() -> bool:
        a = next((a for a in reversed(tl.attempts) if a.client == client), None)
        return a is not None and "first_reply" in a.marks
    return check


def install_mode(g) -> str:
    """plain, or the install mode the gateway's daemon runs with."""
    if g.mode == "plain":
        return "plain"
    argv = list(g.daemon_argv)
    modes = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--install-mode"]
    return modes[-1] if modes else "reinject"


def connect(lab: Lab, w: Watcher, client: str, *, fresh: bool = False, note: str = "",
            timeout: float = 10.0) -> bool:
    c = lab.client(client)
    g = lab.gateway(c.gateway)
    lab.connect(client, fresh=fresh)
    w.watch_ping(client)
    w.tl.connect(client, f"{g.name} ({install_mode(g)})", note, ts=c.ping_started)
    ok = w.until(_replied(w.tl, client), timeout)
    if not ok:
        w.tl.say(client, f"no reply within {timeout:g} s")
    return ok


def baseline(lab: Lab, w: Watcher, client: str) -> None:
    w.tl.heading("Baseline: a client pre-provisioned on g2 with `wg set` (push model)")
    connect(lab, w, client)


def inversion(lab: Lab, w: Watcher, client: str) -> None:
    w.tl.heading("For comparison: g3 installs just in time by role inversion "
                 "(--install-mode invert): the gateway handshakes back, one round trip more")
    connect(lab, w, client)
    w.idle(1.0)


def jit_story(lab: Lab, w: Watcher, jit_clients: list[str], idle_timeout: float,
              evict_interval: float) -> None:
    tl = w.tl
    tl.heading("Just in time: g1 starts with no peers; clients connect one after another")
    for name in jit_clients:
        connect(lab, w, name)
        w.idle(0.5)

    if len(jit_clients) < 2:
        return
    gone, back = jit_clients[0], jit_clients[1]
    tl.heading(f"Clients go quiet: {gone} and {back} stop; idle peers are evicted after "
               f"{idle_timeout:g} s")
    for name in (gone, back):
        lab.disconnect(name)
        tl.say(name, "goes quiet")
    w.idle(idle_timeout / 2)
    tl.say(back, f"comes back after {idle_timeout / 2:g} s, just in time: still installed, "
           "no new pull expected")
    connect(lab, w, back, note="back in time")
    a = tl.attempts[-1]
    if "first_reply" in a.marks and "initiation_seen" not in a.marks:
        tl.say(back, "no initiation, no pull: the gateway still held the peer and its session")

    key = lab.client(gone).public_key
    evicted = w.until(lambda: all(p.public_key != key for p in lab.peers("g1")),
                      idle_timeout + 3 * evict_interval + 5)
    if not evicted:
        tl.say("g1", f"{gone} was not evicted in time")
        return
    w.idle(0.3)
    tl.heading(f"{gone} returns after eviction: pulled and installed again")
    # Its old session died with the evicted peer; a returning client starts a new one.
    connect(lab, w, gone, fresh=True, note="returns")
    w.idle(1.0)


def verdict(tl: Timeline) -> str:
    """One line an operator can quote: JIT first replies against the pre-provisioned one."""
    def first(a) -> float:
        return (a.marks["first_reply"] - a.started) * 1000

    def of(mode: str, installed: bool = True) -> list[float]:
        return [first(a) for a in tl.attempts
                if f"({mode})" in a.gateway and "first_reply" in a.marks
                and ("peer_installed" in a.marks or not installed)]

    jit, inverted, base = of("reinject"), of("invert"), of("plain", installed=False)
    if not jit and not inverted:
        return "No client was provisioned just in time in this run."
    parts = []
    if jit:
        parts.append(f"re-injection: {len(jit)} connection(s), first reply in "
                     f"{min(jit):.0f}-{max(jit):.0f} ms")
    if inverted:
        parts.append(f"role inversion: {inverted[0]:.0f} ms")
    if base:
        parts.append(f"pre-provisioned: {base[0]:.0f} ms")
    return ("Provisioned just in time, " + "; ".join(parts) + ". Re-injection costs what "
            "pre-provisioning does plus the install; role inversion one round trip more; "
            "with neither a late install waits for the client's 5 s retry.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--clients", type=int, default=3, metavar="N",
                   help="clients of the JIT gateway (one more goes to the baseline gateway)")
    p.add_argument("--idle-timeout", type=float, default=6.0, metavar="S",
                   help="short, to show eviction (production default: 300)")
    p.add_argument("--evict-interval", type=float, default=1.0, metavar="S")
    p.add_argument("--rtt", type=float, default=None, metavar="MS",
                   help="round-trip time between clients and gateways (the lab's delaying "
                        "relay), e.g. 100, to show what role inversion's extra trip costs")
    p.add_argument("--prefix", default=None)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    tl = Timeline(time.time())
    n = max(1, args.clients)
    jit_clients = [f"c{i}" for i in range(1, n + 1)]
    base, inverted = f"c{n + 1}", f"c{n + 2}"
    tl.heading("wgjit demo: a gateway that learns its peers from their first packet")
    tl.say("lab", "bringing up the lab: registry, g1 (JIT, re-injection), g2 "
           f"(pre-provisioned), g3 (JIT, role inversion), {n + 2} clients"
           + (f", {args.rtt:g} ms round-trip time" if args.rtt is not None else ""))
    lab = None
    try:
        with signals_raise_interrupt():
            spec = LabSpec(gateways=["jit", "plain", "jit"], clients=n + 2,
                           client_gateways=["g1"] * n + ["g2", "g3"], prefix=args.prefix,
                           idle_timeout=args.idle_timeout, evict_interval=args.evict_interval,
                           daemon_args={"g3": ["--install-mode", "invert"]}, rtt=args.rtt)
            lab = Lab.up(spec, progress=lambda m: tl.say("lab", m))
            tl.names = {c.public_key: c.name for c in lab.state.clients}
            tl.hosts = {a: c.name for c in lab.state.clients for a in (c.underlay4, c.underlay6)}
            w = Watcher(lab, tl)
            w.poll()
            baseline(lab, w, base)
            jit_story(lab, w, jit_clients, args.idle_timeout, args.evict_interval)
            inversion(lab, w, inverted)
            tl.heading("g1 as its operator sees it: wgjit gateway status")
            print(lab.status("g1"), flush=True)
            tl.heading("Summary: ms from a client's first ping to each step")
            print(tl.summary(), flush=True)
            print(verdict(tl), flush=True)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except LabError as e:
        print(f"demo failed: {e}", file=sys.stderr)
        return 1
    finally:
        if lab is not None:
            tl.say("lab", f"removing lab {lab.prefix}")
            problems = lab.down()
            tl.say("lab", "removed" + (": " + "; ".join(problems) if problems else ""))
    return 0
