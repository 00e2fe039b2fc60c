"""Thundering herd: N fresh clients start at the same moment against an empty JIT gateway.

    .venv/bin/python bench/herd.py [--clients 200] [--round "--rate 50 --burst 100" ...]
                                   [--json PATH]

One lab: one JIT gateway (`wgjit gateway run`) and --clients clients (run as root).
Each --round FLAGS is one round: the daemon is restarted empty (no peers, no
cache) with those `wgjit gateway run` flags ("" = defaults: --rate 50 --burst 100
--workers 8), every client gets a fresh session, and
all of them send their first ICMP echo within a few milliseconds (one process,
raw sockets in each client namespace; see bench/common.py). Each client resends
every 0.2 s until its first reply.

Reported per round: time from the first echo to the last client's first reply
("all connected"), per-client latency p50/p99, clients that needed their 5 s
retry, and from the daemon's /metrics: registry calls (must be <= clients),
cache lookups by outcome (rate_limited = no registry token within 1 s), drops
and retriggers. Target: all connected within 2 s, registry calls <= clients.

The default bucket (50/s, burst 100) lets 100 lookups through at once and the
next at 50 per second, so with 200 clients the last pull cannot happen before
2 s even if everything else took no time. Lookups wait for a token inside the
daemon's worker pool (8 threads), each at most 1 s, so a lookup is refused
("rate-limited"; that client comes back with its 5 s retry) only when the rate
is below about workers per second: the last round shows that. The table "inside
the daemon" and the CPU table show what else bounds a herd.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    InitiationCapture,
    Pinger,
    RunInfo,
    cpu_seconds,
    daemon_events,
    gateway_metrics,
    lab_running,
    labelled,
    ms,
    pipeline,
    reset_sessions,
    restart_daemon_empty,
    run_main,
    say,
    spec_for,
    summarise,
    table,
    write_json,
)
from lab import procs  # noqa: E402

TARGET_ALL = 2.0
DEFAULT_ROUNDS = ["", "--rate 100 --burst 200", "--rate 400 --burst 400",
                  "--rate 400 --burst 400 --workers 32", "--rate 5 --burst 100"]
SLOW = 2.0  # clients slower than this are listed in the JSON, with their initiations


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=200, help="clients in the herd (200)")
    ap.add_argument("--round", action="append", metavar="FLAGS", dest="rounds",
                    help="daemon flags for one round, repeatable (default: "
                         + "; ".join(repr(r) for r in DEFAULT_ROUNDS) + ")")
    ap.add_argument("--timeout", type=float, default=30.0, help="per client (30)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    flag_sets = [shlex.split(r) for r in (args.rounds or DEFAULT_ROUNDS)]

    info = RunInfo()
    # Built without the daemon; each round starts it with its own flags.
    spec = spec_for(gateways=["jit"], clients=args.clients, daemon=False)
    say(f"herd bench: {args.clients} clients, {len(flag_sets)} round(s)")
    rounds = []
    with lab_running(spec) as lab:
        g = lab.gateway("g1")
        clients = lab.state.clients
        with Pinger(lab, clients) as pinger:
            for flags in flag_sets:
                say(f"  round {label(flags)}: resetting the gateway and the client sessions")
                reset_sessions(lab, clients)
                restart_daemon_empty(lab, g, flags)
                time.sleep(1.0)  # first-start feed reconcile, scheduler warm-up
                before = gateway_metrics(lab, g)
                cpu_before = cpu_use(lab)
                with InitiationCapture(lab) as cap:
                    t0 = time.time() + 0.2
                    echoes = pinger.run({c.name: t0 for c in clients}, args.timeout)
                    time.sleep(0.3)
                    cap.stop()
                    inits = cap.per_client(since=t0 - 1)
                time.sleep(0.5)  # let the daemon finish counting
                after = gateway_metrics(lab, g)
                cpu_after = cpu_use(lab)
                rounds.append(summarise_round(label(flags), echoes, inits, before, after))
                rounds[-1]["daemon"] = pipeline(daemon_events(g, t0 - 0.5), t0)
                rounds[-1]["cpu_s"] = {k: cpu_after[k] - cpu_before[k] for k in cpu_after}
                r = rounds[-1]
                say(f"    all connected after {ms(r['all_connected'])} ms, "
                    f"{r['connected']}/{r['clients']} connected, "
                    f"registry calls {r['registry_calls']:.0f}")
    info.finish()

    rows, steps = [], []
    for r in rounds:
        s, d = r["latency"], r["daemon"]
        name = r["flags"]
        rows.append([name, f"{r['connected']}/{r['clients']}", ms(r["all_connected"]),
                     ms(s["p50"]), ms(s["p99"]), r["retried"], f"{r['registry_calls']:.0f}",
                     f"{r['rate_limited']:.0f}", f"{r['retriggers']:.0f}",
                     ms(r["start_spread"])])
        steps.append([name, ms(d["last_seen_s"]), ms(d["pulled"]["p50"]),
                      ms(d["pulled"]["p99"]), ms(d["installed"]["p50"]),
                      ms(d["installed"]["p99"]), ms(d["last_installed_s"]),
                      ms(d["last_handshake_s"])])
    print(f"Herd: {args.clients} fresh clients at once against an empty JIT gateway "
          "(ms from each client's first echo; 'all' = until the last first reply)")
    print(table(["daemon flags", "ok", "all", "p50", "p99", "retried", "registry",
                 "rate-limited", "retriggers", "start spread"], rows))
    print("\nInside the daemon (its events; ms since it saw each initiation, 'last' = ms "
          "after the herd started)")
    print(table(["daemon flags", "last seen", "pulled p50", "pulled p99", "installed p50",
                 "installed p99", "last installed", "last handshake"], steps))
    print(f"\nCPU seconds used from just before the herd until 0.8 s after its end ({args.clients} "
          "clients; two cores shared with everything else)")
    print(table(["daemon flags", "daemon", "ms/client", "registry", "gateway wg-go",
                 "client wg-gos"],
                [[r["flags"], f"{r['cpu_s']['daemon']:.2f}",
                  f"{1000 * r['cpu_s']['daemon'] / r['clients']:.1f}",
                  f"{r['cpu_s']['registry']:.2f}", f"{r['cpu_s']['gateway_wg']:.2f}",
                  f"{r['cpu_s']['client_wg']:.2f}"] for r in rounds]))
    for r in rounds:
        met = (r["connected"] == r["clients"] and r["all_connected"] <= TARGET_ALL
               and r["registry_calls"] <= r["clients"])
        print(f"{r['flags']}: lookups {r['lookups']}, drops {r['drops']}"
              f" -> target (all within {TARGET_ALL:g} s, registry calls <= clients) "
              f"{'met' if met else 'NOT met'}")
    print(info.describe())
    write_json(args.json, "herd", info, vars(args) | {"json": str(args.json),
                                                      "rounds": flag_sets},
               {"target_all_s": TARGET_ALL, "rounds": rounds})
    return 0


def cpu_use(lab) -> dict[str, float]:
    g = lab.gateway("g1")
    return {"daemon": cpu_seconds(g.daemon_pid),
            "registry": cpu_seconds(*procs.netns_pids(lab.state.registry.ns)),
            "gateway_wg": cpu_seconds(g.wg_pid),
            "client_wg": cpu_seconds(*(c.wg_pid for c in lab.state.clients))}


def label(flags: list[str]) -> str:
    return shlex.join(flags) if flags else "(defaults)"


def summarise_round(flags: str, echoes: dict, inits: dict,
                    before: dict[str, float], after: dict[str, float]) -> dict:
    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    def delta_labelled(name: str) -> dict[str, float]:
        a, b = labelled(after, name), labelled(before, name)
        return {k: v - b.get(k, 0.0) for k, v in a.items() if v - b.get(k, 0.0)}

    es = list(echoes.values())
    first = min(e.first_sent for e in es)
    replies = [e.first_reply for e in es if e.first_reply]
    lat = [e.latency for e in es]
    n_inits = [sum(1 for i in inits.get(e.client, []) if not i.from_gateway
                   and i.ts <= (e.first_reply or math.inf)) for e in es]
    lookups = delta_labelled("wgjit_gateway_cache_lookups_total")
    return {
        "flags": flags, "clients": len(es), "connected": len(replies),
        "all_connected": (max(replies) - first) if len(replies) == len(es) else math.nan,
        "start_spread": max(e.first_sent for e in es) - first,
        "latency": summarise(lat),
        "retried": sum(1 for n in n_inits if n > 1),
        "client_initiations_mean": sum(n_inits) / len(n_inits),
        "registry_calls": delta("wgjit_gateway_registry_calls_total"),
        "rate_limited": lookups.get("rate_limited", 0.0),
        "lookups": lookups,
        "drops": delta_labelled("wgjit_gateway_drops_total"),
        "retriggers": delta("wgjit_gateway_retriggers_total"),
        "installs": delta("wgjit_gateway_installs_total"),
        "latencies_ms": sorted(round(x * 1000, 2) for x in lat if not math.isnan(x)),
        "slow": [{"client": e.client, "first_sent": e.first_sent - first,
                  "latency": e.latency, "echoes": e.sent,
                  "initiations": [(round(i.ts - first, 4), "gateway" if i.from_gateway
                                   else "client") for i in inits.get(e.client, [])]}
                 for e in es if not e.latency <= SLOW],
    }


if __name__ == "__main__":
    run_main(main)
