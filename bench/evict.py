"""Eviction at scale on userspace WireGuard: pass time, install stalls, daemon memory.

    .venv/bin/python bench/evict.py [--peers 10000 50000] [--out bench/results]

For each size N, peers are put straight into a real wireguard-go (UAPI) in a
namespace of its own, then:
1. the Evictor drives that device directly: the time of a pass that removes
   nothing (one read of every peer, the policy), of a pass that removes all N
   in batches, and how long installs wait while either pass runs (a thread
   installs a fresh peer every 20 ms: what the capture's work would see);
2. the real `wgjit gateway run` adopts the N peers (100 of them with a
   trigger keepalive and no handshake, so the handshake check has work
   pending all the time, its worst case), passes every 10 s, and runs for a
   while: its RSS (now and peak, from /proc), CPU use, the eviction pass
   time it reports, and how many scheduled runs it missed. A real registry
   (`wgjit registry serve`, in the same namespace) holds those N peers, so on
   its first start the daemon checks every adopted peer against it and writes
   the registry's allowed IPs onto the device, as a gateway restarting in
   production does; memory is the peak (VmHWM), not a sample.

Targets from the issue: < 1 s per 10,000 peers per pass; RSS < 150 MB at 50,000.
Needs root, wireguard-go and wg; leaves nothing behind (namespace, process,
socket) even when interrupted.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from appliance.gateway.evict import EvictionPolicy, Evictor  # noqa: E402
from appliance.gateway.install import Installer  # noqa: E402
from appliance.gateway.metrics import GatewayMetrics  # noqa: E402
from appliance.gateway.peer import RegistryPeer  # noqa: E402
from appliance.keys import encode_key, generate_keypair  # noqa: E402
from appliance.wg import PeerConfig, open_device  # noqa: E402
from lab.netns import Cleanup, Netns, create_netns, start_wireguard_go  # noqa: E402
from lab.nsexec import NetnsWorker  # noqa: E402

TUNNEL_BASE = int(ipaddress.ip_address("198.18.0.0"))  # 198.18.0.0/15 holds 131,072
METRICS = "127.0.0.1:9599"
REGISTRY_LISTEN = "127.0.0.1:8099"  # inside the bench's namespace
REGISTRY_URL = f"http://{REGISTRY_LISTEN}"
WGJIT = [sys.executable, "-m", "appliance"]
# Adoption plus the first start's check of every peer against the registry.
READY_TIMEOUT = 900.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
# On a busy 2-core host a 1000-peer transaction or a 50,000-peer read can
# outlast the default 5 s.
UAPI_TIMEOUT = 60.0
PENDING = 100  # adopted peers awaiting a handshake in the daemon run


def peer_configs(n: int, offset: int = 0, keepalive: int | None = None) -> list[PeerConfig]:
    return [PeerConfig(encode_key(os.urandom(32)),
                       allowed_ips=[f"{ipaddress.ip_address(TUNNEL_BASE + offset + i)}/32"],
                       persistent_keepalive=keepalive)
            for i in range(n)]


def fill(dev, n: int) -> float:
    started = time.perf_counter()
    dev.set_peers(peer_configs(n))
    return time.perf_counter() - started


class Installs:
    """A thread that installs a fresh peer every `every` seconds and times each."""

    def __init__(self, installer: Installer, every: float = 0.02) -> None:
        self.installer = installer
        self.every = every
        self.latencies: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._n = 0

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self._n += 1
            ip = ipaddress.ip_address(TUNNEL_BASE + 120_000 + self._n)
            peer = RegistryPeer(encode_key(os.urandom(32)), (f"{ip}/32",), None)
            started = time.perf_counter()
            self.installer.install(peer, "192.0.2.99:51820")
            self.latencies.append(time.perf_counter() - started)

    def __enter__(self) -> Installs:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        lat = sorted(self.latencies) or [0.0]
        return {"installs": len(self.latencies), "p50_ms": 1000 * statistics.median(lat),
                "max_ms": 1000 * lat[-1]}


def bench_evictor(ifname: str, n: int) -> dict:
    dev = open_device(ifname, "uapi", timeout=UAPI_TIMEOUT)
    fill_s = fill(dev, n)
    dumps = []
    for _ in range(3):
        started = time.perf_counter()
        dev.peers()
        dumps.append(time.perf_counter() - started)
    # trigger_keepalive 0: installs carry no endpoint, so the device sends nothing.
    installer = Installer(dev, trigger_keepalive=0)
    evictor = Evictor(installer, EvictionPolicy(idle_timeout=3600, handshake_grace=3600),
                      GatewayMetrics())
    evictor.run_pass()  # adopts all N; first sight
    keep_passes = []
    with Installs(installer) as keep_installs:
        for _ in range(3):
            keep_passes.append(evictor.run_pass())
    kept_evicted = sum(p["evicted"] for p in keep_passes)
    assert len(installer) >= n and kept_evicted == 0, \
        "a pass that should keep every peer removed some"
    # Now every never-handshaken peer is past its grace: one pass removes them all.
    evictor.set_policy(EvictionPolicy(idle_timeout=3600, handshake_grace=0.0))
    with Installs(installer) as evict_installs:
        result = evictor.run_pass()
    left = len(dev.peers())
    dev.close()
    return {
        "fill_seconds": fill_s,
        "dump_seconds": statistics.median(dumps),
        "keep_pass_seconds": statistics.median(p["seconds"] for p in keep_passes),
        "keep_pass_evicted": kept_evicted,
        "keep_pass_installs": keep_installs.summary(),
        "evict_pass_seconds": result["seconds"],
        "evicted": result["evicted"],
        "left_on_device": left,
        "evict_pass_installs": evict_installs.summary(),
    }


def proc_status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            out[name] = int(value.split()[0]) * 1024
    return out


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def wgjit(argv: list[str], ns: Netns | None = None) -> str:
    cmd = [*WGJIT, *argv]
    p = subprocess.run(ns.cmd(cmd) if ns else cmd, capture_output=True, text=True,
                       timeout=900)
    if p.returncode != 0:
        raise RuntimeError(f"wgjit {' '.join(argv[:2])} failed: {p.stderr.strip()[-1000:]}")
    return p.stdout


def start_registry(ns: Netns, tmp: Path, peers: list[PeerConfig], cleanup: Cleanup) -> Path:
    """`wgjit registry serve` in ns holding `peers`; returns the gateway token file.

    Through the CLI only (token create, tenant add, registry import), as an
    operator would seed it."""
    dbf, admin, gateway = tmp / "registry.db", tmp / "admin.token", tmp / "gateway.token"
    wgjit(["token", "create", "--db", str(dbf), "--scope", "admin", "--output", str(admin)])
    wgjit(["token", "create", "--db", str(dbf), "--scope", "gateway", "--output", str(gateway)])
    log = open(tmp / "registry.log", "wb")  # noqa: SIM115 - the child keeps its own copy
    proc = subprocess.Popen(ns.cmd([*WGJIT, "registry", "serve", "--db", str(dbf), "--listen",
                                    REGISTRY_LISTEN, "--workers", "2"]),
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    log.close()

    def stop() -> None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    cleanup.push("registry", stop)
    deadline = time.monotonic() + 60
    while True:
        try:
            wgjit(["tenant", "add", "--registry", REGISTRY_URL, "--token-file", str(admin),
                   "bench"], ns)
            break
        except RuntimeError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("registry did not start: "
                                   + (tmp / "registry.log").read_text()[-2000:]) from None
            time.sleep(0.5)
    lines = tmp / "peers.jsonl"
    with open(lines, "w") as f:
        for p in peers:
            f.write(json.dumps({"public_key": p.public_key,
                                "allowed_ips": [str(a) for a in p.allowed_ips]}) + "\n")
    wgjit(["registry", "import", "--db", str(dbf), "--tenant", "bench", str(lines)])
    return gateway


def bench_daemon(ns: Netns, ifname: str, capture_if: str, n: int, tmp: Path,
                 settle: float, watch: float, cleanup: Cleanup) -> dict:
    dev = open_device(ifname, "uapi", timeout=UAPI_TIMEOUT)
    existing = [p.public_key for p in dev.peers()]
    dev.remove_peers(existing)
    # A few with a trigger keepalive and no handshake: the handshake check then
    # reads the whole device as long as the daemon runs (its worst case). Not all
    # of them: wireguard-go itself gets slow and big with 50,000 keepalives.
    plain, pending = peer_configs(n - PENDING), peer_configs(PENDING, offset=n, keepalive=25)
    dev.set_peers(plain)
    dev.set_peers(pending)
    dev.close()
    token = start_registry(ns, tmp, plain + pending, cleanup)
    log_path = tmp / f"daemon-{n}.log"
    argv = [*WGJIT, "--log-level", "WARNING", "gateway", "run",
            "--interface", ifname,
            "--registry", REGISTRY_URL, "--token-file", str(token),
            "--state-dir", str(tmp / f"state-{n}"), "--metrics-listen", METRICS,
            "--backend", "uapi", "--capture-interface", capture_if,
            "--evict-interval", "10", "--idle-timeout", "3600", "--handshake-grace", "3600",
            "--log-format", "json"]
    started = time.monotonic()
    with open(log_path, "wb") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(ns.cmd(argv), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    try:
        with NetnsWorker(ns.name) as w, requests.Session() as s:
            w.on_close(s.close)

            def get(path: str) -> requests.Response:
                return w.call(s.get, f"http://{METRICS}{path}", timeout=10)

            health: dict = {}
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"daemon exited: {log_path.read_text()[-2000:]}")
                try:
                    health = get("/healthz").json()
                    # Adopted all N and checked them against the registry (the first
                    # start's full reconcile: one lookup per peer).
                    if health.get("installed_peers", 0) >= n and health.get("feed") == "ok":
                        break
                except requests.RequestException:
                    pass
                if time.monotonic() - started > READY_TIMEOUT:
                    raise RuntimeError(f"daemon not ready after {READY_TIMEOUT:g} s")
                time.sleep(0.2)
            ready_s = time.monotonic() - started
            installed_when_ready = health["installed_peers"]
            time.sleep(settle)  # a few eviction passes and handshake checks
            cpu0, t0 = cpu_seconds(proc.pid), time.monotonic()
            missed0 = metric(get("/metrics").text, "wgjit_gateway_scheduler_missed_total")
            rss_samples = []
            while time.monotonic() - t0 < watch:
                rss_samples.append(proc_status(proc.pid)["VmRSS"])
                time.sleep(0.5)
            cpu = (cpu_seconds(proc.pid) - cpu0) / (time.monotonic() - t0)
            text = get("/metrics").text
            health = get("/healthz").json()
            status = proc_status(proc.pid)
            missed = {}
            for line in text.splitlines():
                if line.startswith("wgjit_gateway_scheduler_missed_total{"):
                    job = line.split('job="', 1)[1].split('"', 1)[0]
                    missed[job] = float(line.rsplit(" ", 1)[1])
            passes = metric(text, "wgjit_gateway_evict_pass_seconds_count")
            pass_sum = metric(text, "wgjit_gateway_evict_pass_seconds_sum")

    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return {
        "ready_seconds": ready_s,
        # After the first start's reconcile: a peer the registry did not hold would
        # have been removed, so this being N says the registry answered for all.
        "installed_when_ready": installed_when_ready,
        "rss_sampled_max_bytes": max(rss_samples),
        "rss_peak_bytes": status["VmHWM"],
        "cpu_share": cpu,
        "evict_passes": passes,
        "evict_pass_mean_seconds": pass_sum / passes if passes else None,
        "last_evict_pass": health.get("last_evict_pass"),
        "missed_runs": missed,
        "missed_while_watched": metric(text, "wgjit_gateway_scheduler_missed_total") - missed0,
        "watch_seconds": watch,
    }


def run(n: int, settle: float, watch: float) -> dict:
    cleanup = Cleanup()
    prefix = "be" + secrets.token_hex(2)
    try:
        ns = create_netns(f"{prefix}-ns", cleanup)
        ifname = f"{prefix}gw"
        start_wireguard_go(ns, ifname, cleanup)
        dev = open_device(ifname, "uapi", timeout=UAPI_TIMEOUT)
        priv, _ = generate_keypair()
        dev.configure(private_key=priv, listen_port=51820)
        dev.close()
        # The WireGuard link stays down: wireguard-go then sends nothing, where an
        # up device would compute a handshake for every peer given a keepalive.
        # The daemon captures on an Ethernet interface; a veth pair inside the
        # namespace is enough (no dummy module on every kernel).
        ns.ip("link", "add", f"{prefix}ul", "type", "veth", "peer", "name", f"{prefix}up")
        ns.ip("link", "set", f"{prefix}ul", "up")
        with tempfile.TemporaryDirectory(prefix="wgjit-bench-evict-") as tmp:
            print(f"{n:,} peers: Evictor against wireguard-go ...", flush=True)
            ev = bench_evictor(ifname, n)
            print(f"{n:,} peers: the daemon adopting them ...", flush=True)
            daemon = bench_daemon(ns, ifname, f"{prefix}ul", n, Path(tmp), settle, watch,
                                  cleanup)
        # Other work shares the machine: say how busy it was.
        return {"peers": n, "evictor": ev, "daemon": daemon, "load_average": os.getloadavg(),
                "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    finally:
        problems = cleanup.run()
        if problems:
            print(f"cleanup problems: {problems}", file=sys.stderr)


def report(results: list[dict]) -> str:
    lines = ["eviction benchmark (wireguard-go, UAPI)", ""]
    head = ("peers", "full read", "pass keep", "per 10k", "pass evict-all", "install wait max",
            "daemon pass", "ready", "daemon RSS peak", "daemon CPU", "missed/s")
    rows = []
    for r in results:
        ev, d = r["evictor"], r["daemon"]
        per10k = ev["keep_pass_seconds"] / r["peers"] * 10_000
        wait = max(ev["keep_pass_installs"]["max_ms"], ev["evict_pass_installs"]["max_ms"])
        rows.append((f"{r['peers']:,}", f"{ev['dump_seconds']:.2f} s",
                     f"{ev['keep_pass_seconds']:.2f} s", f"{per10k:.2f} s",
                     f"{ev['evict_pass_seconds']:.2f} s ({ev['evicted']:,})",
                     f"{wait:.0f} ms",
                     f"{d['evict_pass_mean_seconds'] or 0:.2f} s",
                     f"{d['ready_seconds']:.1f} s",
                     f"{d['rss_peak_bytes'] / 2**20:.0f} MiB", f"{100 * d['cpu_share']:.0f} %",
                     f"{d['missed_while_watched'] / d['watch_seconds']:.1f}"))
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    lines.append("  ".join(h.rjust(w) for h, w in zip(head, widths, strict=True)))
    for row in rows:
        lines.append("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
    lines += ["", "full read: dev.peers(), every field parsed (housekeeping uses the cheaper",
              "activity read); pass keep: an Evictor pass removing nothing; pass evict-all:",
              "one pass removing every peer in batches; install wait: the longest install",
              "while a pass ran; daemon: `wgjit gateway run` over the same peers, 100 of",
              "them awaiting a handshake (the handshake check's worst case); daemon pass:",
              "its mean eviction pass; ready: start to all N adopted and checked against",
              "the registry; daemon RSS peak: VmHWM from /proc at the end of the run;",
              "missed/s: scheduled runs missed while watched."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peers", type=int, nargs="+", default=[10_000, 50_000])
    ap.add_argument("--settle", type=float, default=12.0,
                    help="seconds between the daemon's adoption and the measurements")
    ap.add_argument("--watch", type=float, default=20.0, help="seconds of CPU/RSS sampling")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results",
                    help="directory for evict.json and evict.txt (bench/results)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (network namespaces, wireguard-go)", file=sys.stderr)
        return 2
    results = [run(n, args.settle, args.watch) for n in args.peers]
    text = report(results)
    print()
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "evict.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "evict.txt").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
