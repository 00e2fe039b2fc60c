"""Cold start with N registered peers: JIT gateway vs pushing every peer first.

    .venv/bin/python bench/coldstart.py [--peers 1000,10000,50000] [--repeat 3] [--json PATH]

One lab (run as root): a registry, two empty wireguard-go gateways, one client each.
For each N (ascending), N extra peers are bulk-imported into the lab registry's
SQLite database with `Store.bulk_create_peers` (the registry
keeps running; SQLite's WAL takes the writer), then --repeat rounds of:

  jit    g1 is emptied (no daemon, no peers, no cache), then `wgjit gateway run`
         starts; as soon as it logs gateway_ready, client c1 starts pinging.
         cold start = first reply - daemon spawn.
  push   g2 is emptied; `wg addconf` sets all N peers plus c2's over the UAPI
         socket in one go (the push model's reload after a reboot), then c2
         starts pinging. cold start = first reply - start of the push.

The push row leaves out getting the N peers from somewhere: "fetch" is how long
listing them through the registry API (1000 a page) took, once per N, shown
apart. wireguard-go's resident memory after each mode shows what holding N
peers costs. The interfaces exist before either clock starts, in both modes.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import requests  # noqa: E402

from appliance.keys import encode_key  # noqa: E402
from appliance.registry import cidr  # noqa: E402
from appliance.registry.store import NewPeer, open_store  # noqa: E402
from appliance.secrets import read_secret  # noqa: E402
from appliance.wg.uapi import open_uapi  # noqa: E402
from bench.common import (  # noqa: E402
    Pinger,
    RunInfo,
    clear_peers,
    cpu_seconds,
    lab_running,
    ms,
    reset_sessions,
    restart_daemon_empty,
    rss_mib,
    run_main,
    say,
    spec_for,
    table,
    write_json,
)
from lab.netns import wg  # noqa: E402
from lab.state import Gateway  # noqa: E402
from lab.topology import Lab  # noqa: E402

# Bulk peers live outside the lab's own tunnel addresses (198.18.0.0/16, fd00::/64).
BULK_NET4 = ipaddress.ip_network("198.19.0.0/16")
BULK_NET6 = ipaddress.ip_network("fd00:0:0:1::/64")
MAX_PEERS = BULK_NET4.num_addresses - 2
PING_TIMEOUT = 15.0


def peer_counts(text: str) -> list[int]:
    try:
        counts = sorted({int(x) for x in text.split(",")})
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated counts") from None
    if not counts or counts[0] < 0 or counts[-1] > MAX_PEERS:
        raise argparse.ArgumentTypeError(f"peer counts must be 0..{MAX_PEERS}")
    return counts


def bulk_import(lab: Lab, start: int, stop: int) -> float:
    """Peers number start..stop-1 into the registry database; returns seconds taken."""
    assert lab.state.registry is not None
    store = open_store(lab.state.registry.db)
    try:
        t0 = time.perf_counter()
        store.bulk_create_peers(lab.state.registry.tenant, (
            NewPeer(encode_key(os.urandom(32)),
                    [cidr.from_network(ipaddress.ip_network((int(BULK_NET4[1]) + i, 32))),
                     cidr.from_network(ipaddress.ip_network((int(BULK_NET6[1]) + i, 128)))])
            for i in range(start, stop)))
        return time.perf_counter() - t0
    finally:
        store.close()


def fetch_all(lab: Lab) -> tuple[float, list[dict]]:
    """Every peer through GET /v1/peers, as a push agent on the gateway would."""
    reg = lab.state.registry
    assert reg is not None
    token = read_secret(reg.admin_token_file, what="admin token")
    w = lab.worker("g2")
    peers: list[dict] = []
    t0 = time.perf_counter()
    with requests.Session() as s:
        after = "0"
        while after is not None:
            r = w.call(s.get, f"{reg.url}/v1/peers", params={"limit": 1000, "after": after},
                       headers={"Authorization": f"Bearer {token}"}, timeout=30,
                       verify=reg.ca_file)
            r.raise_for_status()
            page = r.json()
            peers += page["peers"]
            after = page["next"]
    return time.perf_counter() - t0, peers


def wg_config(peers: list[dict], path: Path) -> None:
    """A wg(8) config fragment with the peers; only the client's has a preshared key
    in the lab, and the lab makes none here."""
    with open(path, "w") as f:
        for p in peers:
            if p.get("revoked_at"):
                continue
            f.write(f"[Peer]\nPublicKey = {p['public_key']}\n"
                    f"AllowedIPs = {', '.join(p['allowed_ips'])}\n\n")
    os.chmod(path, 0o600)


def first_reply(pinger: Pinger, client: str) -> tuple[float, float]:
    """(first echo sent, first reply) for one client, starting now."""
    e = pinger.run({client: time.time()}, PING_TIMEOUT)[client]
    return e.first_sent, e.first_reply or math.nan


def device_peers(g: Gateway) -> int:
    """Peers the gateway's wireguard-go holds now: after a round, what each model cost it
    (JIT: the one client that spoke; push: everything registered)."""
    return len(open_uapi(g.ifname, timeout=60).peers())


def jit_round(lab: Lab, pinger: Pinger) -> dict:
    g, c = lab.gateway("g1"), lab.client("c1")
    reset_sessions(lab, [c])
    spawned, ready = restart_daemon_empty(lab, g)
    cpu = cpu_seconds(g.daemon_pid)  # its start-up, give or take the poll until ready
    sent, reply = first_reply(pinger, c.name)
    return {"cold_start": reply - spawned, "ready": ready - spawned, "connect": reply - sent,
            "rss_mib": rss_mib(g.wg_pid), "cpu_s": cpu, "device_peers": device_peers(g)}


def push_round(lab: Lab, pinger: Pinger, conf: Path) -> dict:
    g, c = lab.gateway("g2"), lab.client("c2")
    clear_peers(g)
    reset_sessions(lab, [c])
    cpu = cpu_seconds(g.wg_pid)
    t0 = time.time()
    wg(["addconf", g.ifname, str(conf)])
    pushed = time.time()
    cpu = cpu_seconds(g.wg_pid) - cpu
    sent, reply = first_reply(pinger, c.name)
    return {"cold_start": reply - t0, "ready": pushed - t0, "connect": reply - sent,
            "rss_mib": rss_mib(g.wg_pid), "cpu_s": cpu, "device_peers": device_peers(g)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peers", type=peer_counts, default=peer_counts("1000,10000,50000"),
                    help="registered peer counts, comma-separated (1000,10000,50000)")
    ap.add_argument("--repeat", type=int, default=3, help="rounds per N and mode (3)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)

    info = RunInfo()
    spec = spec_for(gateways=["jit", "jit"], clients=2, client_gateways=["g1", "g2"],
                    daemon=False)
    say(f"cold start bench: N = {args.peers}, {args.repeat} round(s) each")
    results = []
    with lab_running(spec) as lab:
        conf = Path(lab.state.dir) / "push.conf"
        imported = 0
        with Pinger(lab, lab.state.clients) as pinger:
            for n in args.peers:
                secs = bulk_import(lab, imported, n)
                say(f"  N={n}: imported {n - imported} peers in {secs:.1f} s")
                imported = n
                fetch_s, peers = fetch_all(lab)
                c2 = lab.client("c2")
                # The registry also holds the lab's own clients; c1 belongs to g1 only.
                peers = [p for p in peers if p["public_key"] != lab.client("c1").public_key]
                assert any(p["public_key"] == c2.public_key for p in peers)
                wg_config(peers, conf)
                rounds: dict[str, list[dict]] = {"jit": [], "push": []}
                for i in range(args.repeat):
                    rounds["jit"].append(jit_round(lab, pinger))
                    rounds["push"].append(push_round(lab, pinger, conf))
                    say(f"    round {i + 1}: jit {ms(rounds['jit'][-1]['cold_start'])} ms, "
                        f"push {ms(rounds['push'][-1]['cold_start'])} ms")
                results.append({"peers": n, "pushed": len(peers), "import_s": secs,
                                "fetch_s": fetch_s, "rounds": rounds,
                                "jit": median_of(rounds["jit"]),
                                "push": median_of(rounds["push"])})
                clear_peers(lab.gateway("g2"))
        conf.unlink(missing_ok=True)
    info.finish()

    rows = []
    for r in results:
        for mode in ("jit", "push"):
            m = r[mode]
            rows.append([f"{r['peers']:,} {mode}", ms(m["cold_start"]), ms(m["ready"]),
                         ms(m["connect"]), f"{m['cpu_s']:.2f}", f"{m['rss_mib']:.0f}",
                         f"{r['fetch_s']:.2f}" if mode == "push" else ""])
    print(f"Cold start, ms (median of {args.repeat}): gateway start -> first client reply; "
          "'ready' = daemon up (jit) or push done (push)")
    print(table(["N registered", "cold start", "ready", "connect", "CPU s", "wg-go MiB",
                 "fetch s"], rows))
    print("CPU s: the daemon's own CPU time to ready (jit), wireguard-go's for the push "
          "(push); wg-go MiB: its resident memory after the client connected")
    print(info.describe())
    write_json(args.json, "coldstart", info, vars(args) | {"json": str(args.json)},
               {"runs": results})
    return 0


def median_of(rounds: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}


if __name__ == "__main__":
    run_main(main)
