"""Real clients under a handshake flood, with and without the gateway's defences.

    .venv/bin/python bench/flood.py [--clients 10] [--rates 1000,5000] [--json PATH]

One lab: a jit gateway, --clients real clients and an attacker host (run as
root). For each row the daemon is restarted empty (no peers, no cache, fresh
counters) with the row's flags, the attacker starts flooding, and after a
second the real clients connect one at a time, --spacing apart, each pinging
through its tunnel until the first reply (first echo -> first reply, as
bench/connect.py). Then the flood stops and the daemon's counters are read.

Floods (valid initiations built like a WireGuard client's, at a steady rate):
  random, one source     fresh random keys from the attacker's own address
  random, spoofed        the same from 250 spoofed addresses x 4 ports
                         (203.0.113.0/24, sent through a raw socket; the
                         cookie replies to them go nowhere)
  replay                 one real client's captured initiation (the client is
                         installed first), replayed from the attacker's address
Defences:
  on    the defaults: per-source limit (20/s, burst 5), cookies under load,
        the known-key filter
  off   `--source-rate 0 --cookies off --key-filter off`. The fair lookup
        queue, bounded repair and the served-endpoint skip have no switch and
        stay on in both.

Columns: connects that succeeded, p50/p99 connect latency, p99 of the daemon's
own share of it (a client's initiation seen to its re-injection; the rest is the
data plane, which faces the same flood, and the client's cookie rounds), registry calls
beyond the real clients' own, cookie replies, DH verifications, the daemon's
CPU (share of one core while flooding) and RSS at the end, and the flood
packets the daemon read (capture drops under load show as fewer).
The flooder is a separate process in the attacker's namespace, so its CPU is
not the daemon's; on a 2-core machine both compete with everything else.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from appliance.gateway.handshake import MESSAGE_INITIATION_SIZE  # noqa: E402
from appliance.gateway.udp_packet import udp_packet  # noqa: E402
from appliance.keys import decode_key, generate_private_key  # noqa: E402
from bench.common import (  # noqa: E402
    Pinger,
    RunInfo,
    cpu_seconds,
    gateway_metrics,
    lab_running,
    labelled,
    ms,
    reset_sessions,
    restart_daemon_empty,
    rss_mib,
    run_main,
    say,
    spec_for,
    summarise,
    table,
    write_json,
)
from lab.timeline import EventFollower  # noqa: E402
from tests.initiations import build_initiation  # noqa: E402

DEFENCES = {"on": [], "off": ["--source-rate", "0", "--cookies", "off", "--key-filter", "off"]}
SPOOF_NET = ipaddress.ip_network("203.0.113.0/24")
SPOOF_HOSTS, SPOOF_PORTS = 250, 4
FLOOD_PACKETS = 6000  # distinct random-key initiations, cycled


# --- the flooder: a process of its own in the attacker's namespace -----------------

def flooder(dest: str, port: int, rate: float, seconds: float, packets_file: str,
            spoofed: bool) -> int:
    data = Path(packets_file).read_bytes()
    packets = [data[i:i + MESSAGE_INITIATION_SIZE]
               for i in range(0, len(data), MESSAGE_INITIATION_SIZE)]
    if spoofed:
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        sources = [(str(SPOOF_NET[1 + h]), 40000 + p) for h in range(SPOOF_HOSTS)
                   for p in range(SPOOF_PORTS)]

        def send(i: int, payload: bytes) -> None:
            ip, sport = sources[i % len(sources)]
            sock.sendto(udp_packet(ip, sport, dest, port, payload), (dest, 0))
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

        def send(i: int, payload: bytes) -> None:
            sock.sendto(payload, (dest, port))

    stopped = []
    signal.signal(signal.SIGTERM, lambda *_: stopped.append(True))
    print("ready", flush=True)
    sent = 0
    start = time.monotonic()
    end = start + seconds
    while not stopped:
        now = time.monotonic()
        if now >= end:
            break
        due = int((now - start) * rate) + 1
        while sent < due:
            # A full socket buffer (ENOBUFS/EAGAIN) loses that packet; go on.
            with contextlib.suppress(OSError):
                send(sent, packets[sent % len(packets)])
            sent += 1
        time.sleep(0.001)
    print(sent, flush=True)
    return 0


class Flood:
    def __init__(self, lab, host: str, dest: str, port: int, rate: float, seconds: float,
                 packets: list[bytes], spoofed: bool, workdir: Path) -> None:
        path = workdir / f"flood-{os.getpid()}-{time.monotonic_ns()}.bin"
        path.write_bytes(b"".join(packets))
        argv = [sys.executable, str(Path(__file__).resolve()), "flooder", "--dest", dest,
                "--port", str(port), "--rate", str(rate), "--seconds", str(seconds),
                "--packets-file", str(path)] + (["--spoofed"] if spoofed else [])
        # Popen from the namespace's worker thread: the child is born in that namespace.
        self.proc = lab.worker(host).call(subprocess.Popen, argv, stdout=subprocess.PIPE,
                                          text=True)
        self.path = path
        # Until it says so the flooder is still starting Python (seconds on a busy
        # machine): a row that went on at once could stop it before it sent anything.
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"flooder did not start (exit {self.proc.wait(timeout=10)})")

    def wait(self) -> int:
        out, _ = self.proc.communicate(timeout=120)
        self.path.unlink(missing_ok=True)
        return int(out.strip() or 0)

    def stop(self) -> int:
        """Stop the flood; how many packets it sent."""
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.wait()


# --- one row ----------------------------------------------------------------------

def run_row(lab, args, defences: str, flood: str, rate: float, flood_packets: list[bytes],
            workdir: Path) -> dict:
    g = lab.gateway("g1")
    # c1 is the replay's victim, c2.. connect in every row, the last one floods.
    victim, *clients = lab.state.clients[:args.clients + 1]
    attacker = lab.client(args.attacker)
    restart_daemon_empty(lab, g, DEFENCES[defences])
    reset_sessions(lab, [victim, *clients])
    packets = flood_packets
    if flood == "replay":
        # A real client connects (and is installed); its initiation is the capture.
        from tests.lab.gateway_e2e import InitiationTap  # the lab tests' own tap
        tap = InitiationTap(lab, "g1")
        try:
            with Pinger(lab, [victim]) as p:
                p.run({victim.name: time.time()}, 10)
            packets = [tap.wait_initiation(victim.public_key).payload]
        finally:
            tap.close()
    before = gateway_metrics(lab, g)
    follower = EventFollower(g.daemon_log, g.name, from_end=True)
    duration = args.lead + len(clients) * args.spacing + args.timeout + 1
    fl = None
    if flood != "none":
        fl = Flood(lab, attacker.name, g.underlay4, g.listen_port, rate, duration, packets,
                   flood == "random, spoofed", workdir)
    cpu0, t0 = cpu_seconds(g.daemon_pid), time.monotonic()
    time.sleep(args.lead)
    with Pinger(lab, clients) as pinger:
        start = time.time()
        echoes = pinger.run({c.name: start + i * args.spacing for i, c in enumerate(clients)},
                            args.timeout)
    cpu1, t1 = cpu_seconds(g.daemon_pid), time.monotonic()
    sent = fl.stop() if fl else 0
    rss = rss_mib(g.daemon_pid)
    time.sleep(0.5)
    m = gateway_metrics(lab, g)

    def delta(name: str) -> float:
        return m.get(name, 0) - before.get(name, 0)

    lat = summarise([e.latency for e in echoes.values()])
    # The daemon's own share: a client's initiation seen to its re-injection (install
    # mode reinject), against the whole connect: the rest is the data plane's.
    keys = {c.public_key for c in clients}
    evs = follower.events()
    gateway_ms = [e.get("ms") for e in evs
                  if e.event == "initiation_reinjected" and e.get("public_key") in keys]
    load_changes = [(round(e.ts, 3), e.event) for e in evs
                    if e.event in ("under_load", "load_over")]
    drops = {k: v - labelled(before, "wgjit_gateway_drops_total").get(k, 0)
             for k, v in labelled(m, "wgjit_gateway_drops_total").items()}
    return {
        "defences": defences, "flood": flood, "rate": rate if fl else 0, "sent": sent,
        "connects": lat, "latencies_ms": [round(e.latency * 1000, 1) for e in echoes.values()],
        "gateway_ms": summarise([m / 1000 for m in gateway_ms]), "load_changes": load_changes,
        "registry_calls_by_flood": max(0.0, delta("wgjit_gateway_registry_calls_total")
                                       - len(clients)),
        "cookie_replies": delta("wgjit_gateway_cookie_replies_total"),
        # cookie_learn.py: the data plane's cookies seen, ours withheld for them (and
        # sent late where it left an initiation unanswered), mac2s proven by them
        "dataplane_cookies": delta("wgjit_gateway_dataplane_cookies_total"),
        "cookie_replies_withheld": delta("wgjit_gateway_cookie_replies_withheld_total"),
        "cookie_replies_owed": delta("wgjit_gateway_cookie_replies_owed_total"),
        "dataplane_mac2": delta("wgjit_gateway_dataplane_mac2_total"),
        "verified": delta("wgjit_gateway_initiations_verified_total"),
        "read": delta("wgjit_gateway_initiations_total"),
        "endpoint_repairs": labelled(m, "wgjit_gateway_endpoint_repairs_total"),
        "drops": {k: v for k, v in drops.items() if v},
        "daemon_cpu_share": (cpu1 - cpu0) / (t1 - t0),
        "daemon_rss_mib": rss,
    }


def _logs_of(lab) -> list[str]:
    hosts = [lab.gateway("g1"), *lab.state.clients]
    return [h.wg_log for h in hosts] + [lab.gateway("g1").daemon_log]


def _log_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _copy_logs(mark: dict[str, int], dest: Path) -> None:
    """What each log gained during the row (a restarted daemon's log starts over)."""
    dest.mkdir(parents=True, exist_ok=True)
    for path, size in mark.items():
        with contextlib.suppress(OSError), open(path, "rb") as f:
            if os.path.getsize(path) >= size:
                f.seek(size)
            (dest / Path(path).name).write_bytes(f.read())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command")
    f = sub.add_parser("flooder", help="(internal) send the flood")
    f.add_argument("--dest", required=True)
    f.add_argument("--port", type=int, required=True)
    f.add_argument("--rate", type=float, required=True)
    f.add_argument("--seconds", type=float, required=True)
    f.add_argument("--packets-file", required=True)
    f.add_argument("--spoofed", action="store_true")
    ap.add_argument("--clients", type=int, default=10, help="real connects per row (10)")
    ap.add_argument("--rates", default="1000,5000", help="flood rates per second")
    ap.add_argument("--floods", default="random, one source;random, spoofed;replay",
                    help="';'-separated flood kinds")
    ap.add_argument("--spacing", type=float, default=0.3, help="seconds between connects")
    ap.add_argument("--lead", type=float, default=1.0, help="flood seconds before connects")
    ap.add_argument("--timeout", type=float, default=12.0, help="per connect (12)")
    ap.add_argument("--defences", default="on,off", help="which defence settings (on,off)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the rows without a flood")
    ap.add_argument("--logs", type=Path, help="copy each row's daemon and wireguard-go "
                    "logs here (set WGJIT_LAB_WG_LOG_LEVEL=verbose for the handshakes)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    if args.command == "flooder":
        return flooder(args.dest, args.port, args.rate, args.seconds, args.packets_file,
                       args.spoofed)

    info = RunInfo()
    rates = [float(r) for r in args.rates.split(",")]
    floods = [x.strip() for x in args.floods.split(";") if x.strip()]
    spec = spec_for(gateways=["jit"], clients=args.clients + 2, endpoint_family="4")
    args.attacker = f"c{args.clients + 2}"
    results = []
    with lab_running(spec) as lab, tempfile.TemporaryDirectory() as tmp:
        responder_public = decode_key(lab.gateway("g1").public_key)
        say(f"  building {FLOOD_PACKETS} random-key initiations")
        flood_packets = [build_initiation(generate_private_key(), responder_public)
                         for _ in range(FLOOD_PACKETS)]
        rows = ([] if args.no_baseline else [("none", 0.0)]) + \
            [(fl, r) for fl in floods for r in rates]
        defence_sets = [d.strip() for d in args.defences.split(",")]
        for flood, rate in rows:
            for defences in defence_sets:
                say(f"  {flood} {rate:g}/s, defences {defences}")
                mark = {h: _log_size(h) for h in _logs_of(lab)} if args.logs else {}
                results.append(run_row(lab, args, defences, flood, rate, flood_packets,
                                       Path(tmp)))
                if args.logs:
                    _copy_logs(mark, args.logs / f"{flood}-{rate:g}-{defences}".replace(
                        " ", "").replace(",", "-"))
    info.finish()

    out = []
    for r in results:
        c = r["connects"]
        out.append([r["flood"], f"{r['rate']:g}", r["defences"], f"{c['ok']}/{c['n']}",
                    ms(c["p50"]), ms(c["p99"]), ms(r["gateway_ms"]["p99"]),
                    f"{r['registry_calls_by_flood']:.0f}",
                    f"{r['cookie_replies']:.0f}", f"{r['verified']:.0f}",
                    f"{100 * r['daemon_cpu_share']:.0f}%", f"{r['daemon_rss_mib']:.0f}",
                    f"{r['read']:.0f}/{r['sent']}"])
    print(f"Real clients' connect latency under a handshake flood, ms; {args.clients} "
          "connects per row")
    print(table(["flood", "per s", "defences", "ok", "p50", "p99", "gw p99", "reg calls",
                 "cookies",
                 "verified", "cpu", "rss MiB", "read/sent"], out))
    print(info.describe())
    write_json(args.json, "flood", info, {k: v for k, v in vars(args).items()
                                          if k != "command"}, results)
    return 0 if all(not math.isnan(r["connects"]["p50"]) for r in results) else 1


if __name__ == "__main__":
    run_main(main)
