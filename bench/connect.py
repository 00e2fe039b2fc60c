"""Connect latency, side by side: pre-provisioned vs JIT with and without role inversion.

    .venv/bin/python bench/connect.py [--clients 50] [--spacing 0.15] [--json PATH]

One lab, three gateways, --clients fresh clients each (run as root):
  g1 plain          the client's peer was set with `wg set` before it connects
  g2 jit            `wgjit gateway run` (defaults): pulls the peer on the first
                    initiation and installs it with the trigger keepalive, so the
                    gateway handshakes back at once (role inversion)
  g3 jit-noinvert   `wgjit gateway run --trigger-keepalive 0`: the peer is installed
                    as a plain responder; the client's own retry after
                    REKEY_TIMEOUT (5 s) completes the handshake
Clients start one at a time, --spacing apart, in round robin over the three
gateways, so every mode sees the same background load. Each client sends ICMP
echo through its tunnel every 0.2 s until the first reply.

Latency = first echo reply (kernel receive time) - first echo request (just
before sendto); the echo is what makes the client's wireguard-go send its
first initiation. A tcpdump on the lab router also sees every initiation:
"from init" is first reply - the client's first initiation on the wire, and
"inits" the client initiations per connect (1 = no retry was needed).
Target: JIT p50 within 20 ms of pre-provisioned.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    InitiationCapture,
    Pinger,
    RunInfo,
    daemon_events,
    gateway_metrics,
    lab_running,
    labelled,
    ms,
    pipeline,
    run_main,
    say,
    spec_for,
    summarise,
    table,
    write_json,
)

MODES = {  # gateway -> (label, lab mode, extra daemon flags)
    "g1": ("pre-provisioned", "plain", []),
    "g2": ("jit (role inversion)", "jit", []),
    "g3": ("jit, no inversion", "jit", ["--trigger-keepalive", "0"]),
}
TARGET_MS = 20.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=50, help="clients per mode (50)")
    ap.add_argument("--spacing", type=float, default=0.15,
                    help="seconds between client starts (0.15)")
    ap.add_argument("--timeout", type=float, default=15.0, help="per client (15)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)

    info = RunInfo()
    gws = list(MODES)
    spec = spec_for(gateways=[MODES[g][1] for g in gws], clients=args.clients * len(gws),
                    daemon_args={g: MODES[g][2] for g in gws if MODES[g][2]})
    say(f"connect bench: {args.clients} clients x {len(gws)} gateways")
    with lab_running(spec) as lab:
        clients = lab.state.clients
        with InitiationCapture(lab) as cap, Pinger(lab, clients) as pinger:
            t0 = time.time() + 0.5
            starts = {c.name: t0 + i * args.spacing for i, c in enumerate(clients)}
            say(f"  {len(clients)} clients connecting, {args.spacing:g} s apart "
                f"(~{len(clients) * args.spacing + 5:.0f} s)")
            echoes = pinger.run(starts, args.timeout)
            time.sleep(0.3)  # let tcpdump write its last lines
            cap.stop()
            inits = cap.per_client(since=t0 - 1)
        jit_gws = [g for g in gws if MODES[g][1] == "jit"]
        jit_metrics = {g: gateway_metrics(lab, lab.gateway(g)) for g in jit_gws}
        jit_steps = {g: pipeline(daemon_events(lab.gateway(g), t0 - 0.5), t0)
                     for g in jit_gws}
    info.finish()

    results = {}
    for g in gws:
        mine = [e for e in echoes.values() if e.gateway == g]
        lat = [e.latency for e in mine]
        from_init, n_inits, gw_inits = [], [], []
        for e in mine:
            seen = inits.get(e.client, [])
            client_side = [i for i in seen if not i.from_gateway and i.ts <= (e.first_reply
                                                                             or math.inf)]
            n_inits.append(len(client_side))
            gw_inits.append(sum(1 for i in seen if i.from_gateway
                                and i.ts <= (e.first_reply or math.inf)))
            if client_side and e.first_reply:
                from_init.append(e.first_reply - client_side[0].ts)
        results[g] = {
            "mode": MODES[g][0], "daemon_args": MODES[g][2],
            "from_echo": summarise(lat), "from_initiation": summarise(from_init),
            "client_initiations_mean": sum(n_inits) / len(n_inits) if n_inits else math.nan,
            "gateway_initiations_mean": sum(gw_inits) / len(gw_inits) if gw_inits else math.nan,
            "latencies_ms": [round(x * 1000, 2) for x in lat],
        }
        if g in jit_metrics:
            m = jit_metrics[g]
            results[g]["daemon"] = {
                "registry_calls": m.get("wgjit_gateway_registry_calls_total", 0),
                "installs": m.get("wgjit_gateway_installs_total", 0),
                "retriggers": m.get("wgjit_gateway_retriggers_total", 0),
                "drops": labelled(m, "wgjit_gateway_drops_total"),
                "pipeline": jit_steps[g],
            }

    rows = []
    for g in gws:
        r, s, i = results[g], results[g]["from_echo"], results[g]["from_initiation"]
        rows.append([r["mode"], f"{s['ok']}/{s['n']}", ms(s["p50"]), ms(s["p90"]),
                     ms(s["p99"]), ms(s["max"]), ms(i["p50"]), ms(i["p99"]),
                     f"{r['client_initiations_mean']:.2f}",
                     f"{r['gateway_initiations_mean']:.2f}"])
    print(f"Connect latency, ms (first echo -> first reply), {args.clients} fresh clients "
          "per gateway")
    print(table(["gateway", "ok", "p50", "p90", "p99", "max", "init p50", "init p99",
                 "inits", "gw inits"], rows))
    for g in gws:
        d = results[g].get("daemon")
        if d:
            p = d["pipeline"]
            print(f"{results[g]['mode']}: registry calls {d['registry_calls']:.0f}, installs "
                  f"{d['installs']:.0f}, retriggers {d['retriggers']:.0f}, drops {d['drops']}; "
                  f"daemon ms from initiation seen: pulled p50 {ms(p['pulled']['p50'])} "
                  f"p99 {ms(p['pulled']['p99'])}, installed p50 {ms(p['installed']['p50'])} "
                  f"p99 {ms(p['installed']['p99'])}")
    plain, jit = results["g1"]["from_echo"]["p50"], results["g2"]["from_echo"]["p50"]
    gap = (jit - plain) * 1000
    verdict = "met" if gap <= TARGET_MS else "NOT met"
    print(f"JIT p50 - pre-provisioned p50 = {gap:.1f} ms (target <= {TARGET_MS:g} ms: "
          f"{verdict})")
    print(info.describe())
    write_json(args.json, "connect", info, vars(args) | {"json": str(args.json)},
               {"target_ms": TARGET_MS, "jit_minus_plain_p50_ms": gap, "gateways": results})
    return 0


if __name__ == "__main__":
    run_main(main)
