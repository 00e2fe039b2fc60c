"""Herds and restarts: N registered clients' first initiations within one second.

    .venv/bin/python bench/herd.py [--clients 1000,10000] [--cases cold-single,cold,warm,gap]
                                   [--spread 1.0] [--timeout 30] [--json PATH]

One lab (run as root): a registry (gunicorn, SQLite) and one JIT gateway
(`wgjit gateway run`, wireguard-go data plane). max(--clients) peers are
bulk-imported into the registry with keys made here. For each N and case the
gateway is prepared, then N initiations, built like a WireGuard client's from
the first N clients' private keys (tests/initiations.py: 10,000 wireguard-go
clients do not fit on the machine), arrive evenly over --spread seconds, each
from its own address (2001:db8:100:i::2, a /64 each, so that no client shares
the per-source limit with another), sent through a raw socket from the lab's
router namespace. A client not installed 5 s (REKEY_TIMEOUT) after its last
initiation sends a fresh one, as a real client retries.

Cases, in order for each N (each starts the daemon with default flags but for
cold-single):
  cold-single  empty gateway (no peers, no cache, no feed cursor), lookups as
               before batching: `--lookup-batch 1`, one GET and one token per key
  cold         empty gateway, defaults: misses coalesced into batch calls
  warm         restart: the daemon stopped, its device emptied (a reboot), its
               cache entries aged past the positive TTL (down for 10 minutes),
               the feed cursor and feed identity kept (continuous feed)
  gap          the same, but the saved feed identity no longer matches the
               registry's (a feed gap: the daemon reconciles and drops its cache)

Reported: installed/N, time from the first initiation until the last peer was
installed (`peer_installed` events in the daemon's log), per-client p50/p99
(its first initiation -> its install), clients that needed a retry, registry
lookup calls and keys per call (/metrics), lookups refused for want of a token,
the daemon's CPU seconds from the herd's start to its end. Targets with default
flags: 1,000 installed within 2 s, 10,000 within 5 s; warm: no registry call.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import math
import socket
import sqlite3
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from appliance.gateway.udp_packet import udp_packet  # noqa: E402
from appliance.keys import decode_key, encode_key  # noqa: E402
from appliance.registry import cidr  # noqa: E402
from appliance.registry.store import NewPeer, open_store  # noqa: E402
from bench.common import (  # noqa: E402
    RunInfo,
    clear_peers,
    cpu_seconds,
    gateway_metrics,
    lab_running,
    labelled,
    metric_sum,
    ms,
    percentile,
    pipeline,
    restart_daemon_empty,
    run_main,
    say,
    spec_for,
    start_daemon,
    stop_daemon,
    summarise,
    table,
    write_json,
)
from lab import procs  # noqa: E402
from lab.timeline import EventFollower  # noqa: E402
from tests.initiations import build_initiation  # noqa: E402

CASES = ("cold-single", "cold", "warm", "gap")
CASE_FLAGS = {"cold-single": ["--lookup-batch", "1"]}
# The daemon's own default, as operators run it (the lab's daemons log each step of
# an install at DEBUG; peer_installed carries what this bench reads of them).
LOG_FLAGS = ["--log-level", "INFO"]
TARGETS = {1000: 2.0, 10000: 5.0}  # seconds until every peer is installed
REKEY_TIMEOUT = 5.0
DOWN_FOR = 600.0  # how old the warm cases' cache entries are (positive TTL: 300 s)
SOURCE_NET = ipaddress.ip_network("2001:db8:100::/48")  # a /64 per client, i < 65,536
HERD_NET4 = ipaddress.ip_network("198.19.0.0/16")  # the clients' tunnel addresses
HERD_NET6 = ipaddress.ip_network("fd00:0:0:2::/64")
POLL = 0.05


class Herd:
    """The clients: keys, sources, and the raw socket that speaks for them."""

    def __init__(self, n: int) -> None:
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

        self.private: list[bytes] = []
        self.public: list[str] = []
        for _ in range(n):
            k = X25519PrivateKey.generate()
            self.private.append(k.private_bytes_raw())
            self.public.append(encode_key(k.public_key().public_bytes_raw()))
        base = int(SOURCE_NET.network_address)
        self.sources = [str(ipaddress.IPv6Address(base + (i << 64) + 2)) for i in range(n)]

    def register(self, db: str, tenant: str) -> float:
        store = open_store(db)
        try:
            t0 = time.perf_counter()
            store.bulk_create_peers(tenant, (
                NewPeer(key, [cidr.from_network(ipaddress.ip_network(
                                  (int(HERD_NET4[1]) + i, 32))),
                              cidr.from_network(ipaddress.ip_network(
                                  (int(HERD_NET6[1]) + i, 128)))])
                for i, key in enumerate(self.public)))
            return time.perf_counter() - t0
        finally:
            store.close()

    def packet(self, i: int, gateway_public: bytes, dst: str, port: int) -> bytes:
        init = build_initiation(self.private[i], gateway_public)
        return udp_packet(self.sources[i], 40000 + i % 20000, dst, port, init)


def send_wave(packets: list[bytes], dst: str, spread: float, sent_at: list[float]) -> None:
    """In the router's namespace: packets[i] at start + i * spread / n; sent_at[i] = when.

    The lab's router routes 2001:db8:100::/48 nowhere: the gateway's answers die there."""
    with socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW) as s:
        start = time.time()
        n = len(packets)
        for i, p in enumerate(packets):
            ahead = start + i * spread / n - time.time()
            if ahead > 0:
                time.sleep(ahead)
            # A full buffer loses that one: its client retries after REKEY_TIMEOUT.
            with contextlib.suppress(OSError):
                s.sendto(p, (dst, 0, 0, 0))
            sent_at[i] = time.time()


def warm_neighbour(dst: str) -> None:
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
        s.sendto(b"herd", (dst, 9))
    time.sleep(0.2)


def age_cache(state_dir: Path, seconds: float, feed_id: str | None = None) -> int:
    """The stopped daemon's cache entries made `seconds` older; optionally another
    feed identity saved (the registry's will no longer match: a gap)."""
    db = sqlite3.connect(state_dir / "gateway.db")
    try:
        with db:
            n = db.execute("UPDATE peer_cache SET fetched_at = fetched_at - ?",
                           (seconds,)).rowcount
            if feed_id is not None:
                db.execute("UPDATE state SET value = ? WHERE key = 'feed_id'", (feed_id,))
        return n
    finally:
        db.close()


def wait_metric(lab, g, name: str, at_least: float, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while metric_sum(gateway_metrics(lab, g), name) < at_least:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} stayed below {at_least} for {timeout:g} s")
        time.sleep(0.2)


def prepare(lab, g, case: str, extra: list[str]) -> dict:
    """Stop/clean/start the daemon for `case`; what was done to its state."""
    state_dir = Path(lab.state.dir) / f"gateway-{g.name}"
    flags = CASE_FLAGS.get(case, []) + LOG_FLAGS + extra
    if case.startswith("cold"):
        restart_daemon_empty(lab, g, flags)
        return {"aged_entries": 0}
    stop_daemon(lab, g)
    clear_peers(g)
    aged = age_cache(state_dir, DOWN_FOR, feed_id="herd-bench-gap" if case == "gap" else None)
    start_daemon(lab, g, flags)
    return {"aged_entries": aged}


def run_round(lab, herd: Herd, n: int, case: str, extra: list[str], spread: float,
              timeout: float) -> dict:
    g = lab.gateway("g1")
    prep = prepare(lab, g, case, extra)
    wait_metric(lab, g, "wgjit_gateway_known_keys", n, 60)
    time.sleep(1.0)  # the first feed poll (a gap reconciles here), scheduler warm-up
    gw_public = decode_key(g.public_key)
    dst = g.underlay6
    t_build = time.perf_counter()
    packets = [herd.packet(i, gw_public, dst, g.listen_port) for i in range(n)]
    build_s = time.perf_counter() - t_build
    router = lab.worker("net")
    router.call(warm_neighbour, dst)
    follower = EventFollower(g.daemon_log, g.name, from_end=True)
    before = gateway_metrics(lab, g)
    cpu0 = cpu_use(lab)
    index = {herd.public[i]: i for i in range(n)}
    sent_at = [math.nan] * n
    last_sent = [math.nan] * n  # of the latest retry
    retries = [0] * n
    installed: dict[int, float] = {}
    seen: dict[int, float] = {}  # the daemon's capture read the initiation installed
    events: list = []
    wave = threading.Thread(target=router.call, args=(send_wave, packets, dst, spread, sent_at),
                            daemon=True)
    start = time.time()
    wave.start()
    deadline = start + spread + timeout
    while len(installed) < n and time.time() < deadline:
        time.sleep(POLL)
        for ev in follower.events():
            events.append(ev)
            i = index.get(ev.get("public_key"))
            if i is None:
                continue
            if ev.event == "peer_installed":
                installed.setdefault(i, ev.ts)
                if isinstance(ev.get("seen"), (int, float)):
                    seen.setdefault(i, ev.get("seen"))
        now = time.time()
        due = [] if wave.is_alive() else [
            i for i in range(n) if i not in installed
            and now - (last_sent[i] if retries[i] else sent_at[i]) >= REKEY_TIMEOUT]
        if due:
            again = [herd.packet(i, gw_public, dst, g.listen_port) for i in due]
            stamps = [math.nan] * len(due)
            router.call(send_wave, again, dst, 0.0, stamps)
            for i, ts in zip(due, stamps, strict=True):
                last_sent[i] = ts
                retries[i] += 1
    wave.join(timeout=10)
    cpu1 = cpu_use(lab)
    time.sleep(0.5)  # let the daemon finish counting
    after = gateway_metrics(lab, g)

    def delta(name: str) -> float:
        return metric_sum(after, name) - metric_sum(before, name)

    def delta_labelled(name: str) -> dict[str, float]:
        a, b = labelled(after, name), labelled(before, name)
        return {k: v - b.get(k, 0.0) for k, v in a.items() if v - b.get(k, 0.0)}

    first = min(sent_at)
    lat = [installed[i] - sent_at[i] if i in installed else math.nan for i in range(n)]
    calls = delta("wgjit_gateway_registry_calls_total")
    keys = delta("wgjit_gateway_registry_lookup_keys_total")
    lookups = delta_labelled("wgjit_gateway_cache_lookups_total")
    return {
        "clients": n, "case": case, "flags": CASE_FLAGS.get(case, []) + extra, **prep,
        "installed": len(installed),
        "all_installed": (max(installed.values()) - first) if len(installed) == n else math.nan,
        "send_spread": max(sent_at) - first,
        "latency": summarise(lat),
        "retried": sum(1 for r in retries if r),
        "registry_calls": calls,
        "registry_keys": keys,
        "keys_per_call": keys / calls if calls else 0.0,
        "rate_limited": lookups.get("rate_limited", 0.0),
        "lookups": lookups,
        "drops": delta_labelled("wgjit_gateway_drops_total"),
        "cpu_s": {k: cpu1[k] - cpu0[k] for k in cpu1},
        # Where the time went: sent -> read by the daemon's capture, and the daemon's
        # own per-client ms from there to pulled / installed.
        "seen": summarise([seen[i] - sent_at[i] for i in seen]),
        "daemon": pipeline(events, start),
        "initiations_built_s": build_s,
        # Every 5th percentile of the clients' latencies (the raw list of 10,000
        # would be most of the file).
        "latency_percentiles_ms": percentiles_ms(lat),
    }


def percentiles_ms(values: list[float]) -> dict[str, float]:
    done = [v for v in values if not math.isnan(v)]
    return {str(q): round(1000 * percentile(done, q), 1) for q in range(5, 101, 5)} \
        if done else {}


def cpu_use(lab) -> dict[str, float]:
    g = lab.gateway("g1")
    return {"daemon": cpu_seconds(g.daemon_pid),
            "registry": cpu_seconds(*procs.netns_pids(lab.state.registry.ns)),
            "gateway_wg": cpu_seconds(g.wg_pid)}


def sizes(text: str) -> list[int]:
    try:
        out = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"client counts: {e}") from e
    if not out or out[0] < 1 or out[-1] > 65536:
        raise argparse.ArgumentTypeError("client counts must be 1..65536")
    return out


def cases(text: str) -> list[str]:
    out = [c.strip() for c in text.split(",") if c.strip()]
    bad = [c for c in out if c not in CASES]
    if bad or not out:
        raise argparse.ArgumentTypeError(f"cases are {', '.join(CASES)}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=sizes, default=[1000, 10000],
                    help="herd sizes, comma-separated (1000,10000)")
    ap.add_argument("--cases", type=cases, default=list(CASES),
                    help="which cases, in this order (" + ",".join(CASES) + ")")
    ap.add_argument("--flags", default="", help="extra daemon flags for every round")
    ap.add_argument("--spread", type=float, default=1.0,
                    help="seconds over which the first initiations arrive (1)")
    ap.add_argument("--timeout", type=float, default=30.0,
                    help="seconds after the wave before a round gives up (30)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    extra = args.flags.split()

    info = RunInfo()
    spec = spec_for(gateways=["jit"], clients=1, daemon=False)
    say(f"herd bench: {args.clients} clients, cases {', '.join(args.cases)}")
    rounds = []
    with lab_running(spec) as lab:
        t0 = time.perf_counter()
        herd = Herd(max(args.clients))
        say(f"  {len(herd.public)} keys made in {time.perf_counter() - t0:.1f} s, registered "
            f"in {herd.register(lab.state.registry.db, lab.state.registry.tenant):.1f} s")
        for n in args.clients:
            for case in args.cases:
                say(f"  {n} clients, {case}")
                r = run_round(lab, herd, n, case, extra, args.spread, args.timeout)
                rounds.append(r)
                say(f"    {r['installed']}/{n} installed, all after {ms(r['all_installed'])} "
                    f"ms, registry calls {r['registry_calls']:.0f} ({r['keys_per_call']:.1f} "
                    f"keys each), daemon CPU {r['cpu_s']['daemon']:.2f} s")
    info.finish()

    print("Herd: N registered clients' first initiations evenly within "
          f"{args.spread:g} s at a JIT gateway (ms from the first initiation; 'all' = until "
          "the last peer was installed)")
    print(table(["clients", "case", "installed", "all", "p50", "p99", "retried",
                 "registry calls", "keys/call", "rate-limited", "daemon CPU s",
                 "ms/client"],
                [[r["clients"], r["case"], f"{r['installed']}/{r['clients']}",
                  ms(r["all_installed"]), ms(r["latency"]["p50"]), ms(r["latency"]["p99"]),
                  r["retried"], f"{r['registry_calls']:.0f}", f"{r['keys_per_call']:.1f}",
                  f"{r['rate_limited']:.0f}", f"{r['cpu_s']['daemon']:.2f}",
                  f"{1000 * r['cpu_s']['daemon'] / r['clients']:.2f}"] for r in rounds]))
    print("\nWhere the time went (ms; p50/p99 per client): initiation sent -> read by the "
          "daemon's capture (seen), seen -> pulled from cache or registry, seen -> installed")
    print(table(["clients", "case", "seen", "pulled", "installed"],
                [[r["clients"], r["case"],
                  f"{ms(r['seen']['p50'])}/{ms(r['seen']['p99'])}",
                  f"{ms(r['daemon']['pulled']['p50'])}/{ms(r['daemon']['pulled']['p99'])}",
                  f"{ms(r['daemon']['installed']['p50'])}/"
                  f"{ms(r['daemon']['installed']['p99'])}"] for r in rounds]))
    for r in rounds:
        target = TARGETS.get(r["clients"])
        if r["case"] == "cold" and target is not None:
            met = r["installed"] == r["clients"] and r["all_installed"] <= target
            print(f"{r['clients']} cold: target all installed within {target:g} s "
                  f"{'met' if met else 'NOT met'}")
        if r["case"] == "warm":
            print(f"{r['clients']} warm (continuous feed): target 0 registry calls "
                  f"{'met' if r['registry_calls'] == 0 else 'NOT met'} "
                  f"({r['registry_calls']:.0f})")
        if r["drops"]:
            print(f"{r['clients']} {r['case']}: drops {r['drops']}, lookups {r['lookups']}")
    print(info.describe())
    write_json(args.json, "herd", info, vars(args) | {"json": str(args.json)},
               {"targets_s": TARGETS, "rounds": rounds})
    return 0


if __name__ == "__main__":
    run_main(main)
