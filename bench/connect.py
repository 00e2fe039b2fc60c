"""Connect latency at emulated round-trip times: pre-provisioned vs role inversion vs re-injection.

    .venv/bin/python bench/connect.py [--clients 15] [--rtt 0 --rtt 20 ...] [--json PATH]

For each round-trip time (default 0, 20, 100 and 250 ms) one lab with three
gateways and --clients fresh clients each, every client reaching its gateway
through the delaying relay (lab/relay.py; at 0 ms too, so every cell has the
same path). Run as root.
  g1 pre-provisioned  the client's peer was set with `wg set` before it connects
  g2 role inversion   `wgjit gateway run --install-mode invert`: pulls the peer on the
                      first initiation and installs it aimed at the client with a
                      keepalive, so the gateway handshakes back (3 RTT + install)
  g3 re-injection     `wgjit gateway run --install-mode reinject` (the default): installs
                      the peer and hands the captured initiation back to the data
                      plane, which answers the client's own handshake (2 RTT + install)
Clients start one at a time, --spacing apart, in round robin over the three
gateways, so every mode sees the same background load. Each client sends ICMP
echo through its tunnel every 0.2 s until the first reply.

Latency = first echo reply (kernel receive time) - first echo request (just
before sendto); the echo is what makes the client's wireguard-go send its
first initiation. A tcpdump on the lab router sees every initiation: "inits"
is the client's initiations per connect (1 = no retry was needed), "gw inits"
the gateway's (role inversion: 1; re-injection and pre-provisioned: 0).
Target: re-injection p50 within 10 ms of pre-provisioned at every RTT.
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
    "g2": ("role inversion", "jit", ["--install-mode", "invert"]),
    "g3": ("re-injection", "jit", ["--install-mode", "reinject"]),
}
RTTS = [0.0, 20.0, 100.0, 250.0]
TARGET_MS = 10.0  # re-injection p50 - pre-provisioned p50, at every RTT


def run_cell(rtt: float, clients: int, spacing: float, timeout: float,
             dataplane: str = "wireguard-go") -> dict:
    """One lab at one RTT: every mode side by side; results per gateway."""
    gws = list(MODES)
    # Inside a VM (kernel WireGuard) Python is emulated: daemons need minutes to start.
    slow = {"daemon_start_timeout": 300.0} if dataplane == "kernel" else {}
    spec = spec_for(gateways=[MODES[g][1] for g in gws], clients=clients * len(gws),
                    daemon_args={g: MODES[g][2] for g in gws if MODES[g][2]}, rtt=rtt,
                    dataplane=dataplane, **slow)
    say(f"RTT {rtt:g} ms: {clients} clients x {len(gws)} gateways")
    with lab_running(spec) as lab:
        lab_clients = lab.state.clients
        with InitiationCapture(lab) as cap, Pinger(lab, lab_clients) as pinger:
            t0 = time.time() + 0.5
            starts = {c.name: t0 + i * spacing for i, c in enumerate(lab_clients)}
            say(f"  {len(lab_clients)} clients connecting, {spacing:g} s apart "
                f"(~{len(lab_clients) * spacing + 1:.0f} s)")
            echoes = pinger.run(starts, timeout)
            time.sleep(0.3)  # let tcpdump write its last lines
            cap.stop()
            inits = cap.per_client(since=t0 - 1)
        jit_gws = [g for g in gws if MODES[g][1] == "jit"]
        jit_metrics = {g: gateway_metrics(lab, lab.gateway(g)) for g in jit_gws}
        jit_steps = {g: pipeline(daemon_events(lab.gateway(g), t0 - 0.5), t0)
                     for g in jit_gws}

    results = {}
    for g in gws:
        mine = [e for e in echoes.values() if e.gateway == g]
        lat = [e.latency for e in mine]
        n_inits, gw_inits = [], []
        for e in mine:
            seen = [i for i in inits.get(e.client, []) if i.ts <= (e.first_reply or math.inf)]
            n_inits.append(sum(1 for i in seen if not i.from_gateway))
            gw_inits.append(sum(1 for i in seen if i.from_gateway))
        results[g] = {
            "mode": MODES[g][0], "daemon_args": MODES[g][2],
            "from_echo": summarise(lat),
            "client_initiations_mean": sum(n_inits) / len(n_inits) if n_inits else math.nan,
            "gateway_initiations_mean": sum(gw_inits) / len(gw_inits) if gw_inits else math.nan,
            "latencies_ms": [round(x * 1000, 2) for x in lat],
        }
        if g in jit_metrics:
            m = jit_metrics[g]
            results[g]["daemon"] = {
                "registry_calls": m.get("wgjit_gateway_registry_calls_total", 0),
                "installs": m.get("wgjit_gateway_installs_total", 0),
                "retriggers": m.get("wgjit_gateway_handshake_retriggers_total", 0),
                "reinjections": labelled(m, "wgjit_gateway_reinjections_total"),
                "drops": labelled(m, "wgjit_gateway_drops_total"),
                "pipeline": jit_steps[g],
            }
    return results


def in_kernel_vm(args: argparse.Namespace, rtts: list[float]) -> int:
    """This bench, inside a quick VM with kernel WireGuard; its JSON copied out."""
    from lab.vm import VM

    with VM(cpus=2, memory_mb=2048, echo=True) as vm:
        inner = vm.shared_dir / "connect.json"
        argv = [".venv/bin/python", "bench/connect.py", "--dataplane", "kernel",
                "--clients", str(args.clients), "--spacing", str(args.spacing),
                "--timeout", str(args.timeout), "--json", str(inner)]
        for rtt in rtts:
            argv += ["--rtt", f"{rtt:g}"]
        result = vm.run(argv, timeout=3600)
        if result.returncode != 0:
            return result.returncode
        if args.json:
            args.json.write_text(inner.read_text())
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=15, help="clients per mode and RTT (15)")
    ap.add_argument("--rtt", type=float, action="append", metavar="MS",
                    help="round-trip time to emulate (repeatable; default 0 20 100 250)")
    ap.add_argument("--spacing", type=float, default=0.25,
                    help="seconds between client starts (0.25: longer than an RTT of "
                         "250 ms, so connects rarely overlap)")
    ap.add_argument("--timeout", type=float, default=15.0, help="per client (15)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--dataplane", choices=["wireguard-go", "kernel"], default="wireguard-go",
                    help="kernel: kernel WireGuard interfaces (needs the module: inside a VM)")
    ap.add_argument("--kernel-vm", action="store_true",
                    help="boot a quick VM (lab/vm/quick.py) and run this bench inside it on kernel "
                         "WireGuard; under emulation, so compare modes, not absolute times")
    args = ap.parse_args(argv)
    rtts = args.rtt or RTTS
    if args.kernel_vm:
        return in_kernel_vm(args, rtts)

    info = RunInfo()
    cells = {f"{rtt:g}": run_cell(rtt, args.clients, args.spacing, args.timeout,
                                  args.dataplane)
             for rtt in rtts}
    info.finish()

    rows = []
    for rtt, results in cells.items():
        for r in results.values():
            s = r["from_echo"]
            rows.append([rtt, r["mode"], f"{s['ok']}/{s['n']}", ms(s["p50"]), ms(s["p90"]),
                         ms(s["p99"]), ms(s["max"]), f"{r['client_initiations_mean']:.2f}",
                         f"{r['gateway_initiations_mean']:.2f}"])
    print(f"Connect latency, ms (first echo -> first reply), {args.clients} fresh clients "
          "per mode and RTT")
    print(table(["RTT ms", "mode", "ok", "p50", "p90", "p99", "max", "inits", "gw inits"],
                rows))

    summary, side = {}, []
    for rtt, results in cells.items():
        p50 = {r["mode"]: r["from_echo"]["p50"] * 1000 for r in results.values()}
        pre = p50["pre-provisioned"]
        summary[rtt] = {"p50_ms": p50, "reinject_minus_pre_ms": p50["re-injection"] - pre,
                        "invert_minus_pre_ms": p50["role inversion"] - pre}
        side.append([rtt, f"{pre:.1f}", f"{p50['role inversion']:.1f}",
                     f"{p50['re-injection']:.1f}", f"{p50['role inversion'] - pre:+.1f}",
                     f"{p50['re-injection'] - pre:+.1f}"])
    print("\np50 side by side, ms")
    print(table(["RTT ms", "pre-provisioned", "role inversion", "re-injection",
                 "inversion - pre", "re-injection - pre"], side))
    worst = max(v["reinject_minus_pre_ms"] for v in summary.values())
    verdict = "met" if worst <= TARGET_MS else "NOT met"
    print(f"re-injection p50 - pre-provisioned p50, worst over RTTs: {worst:.1f} ms "
          f"(target <= {TARGET_MS:g} ms: {verdict})")
    print(info.describe())
    write_json(args.json, "connect", info, vars(args) | {"json": str(args.json), "rtt": rtts},
               {"target_ms": TARGET_MS, "reinject_minus_pre_worst_ms": worst,
                "summary": summary, "rtts": cells})
    return 0


if __name__ == "__main__":
    run_main(main)
