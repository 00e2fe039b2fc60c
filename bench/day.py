"""A simulated day on one gateway: installed peers under push vs just-in-time.

    .venv/bin/python bench/day.py [--clients 20000] [--idle-timeout 300] [--seed 1]
                                  [--out bench/results] [--json PATH]

Writes day.png (installed peers over the day), day.csv (one row a minute) and
day.md (hourly table and summary) to --out, and prints the table; --json also
writes the parameters, the hourly rows and the day's totals like the other
benches (bench/common.py).

An event-driven simulation, not a lab run: a day of WireGuard traffic does not
fit in a test. What is simulated is the clients; what decides evictions is the
gateway's own policy, `Evictor.choose` from appliance/gateway/evict.py, run
every --evict-interval seconds over the simulated device's activity (latest
handshake, received bytes), exactly as the daemon's pass feeds it.

Clients: a registered population that grows during the day (sign-ups), most
of whom use the VPN in sessions whose start times follow a two-peak day
(morning and evening) and whose lengths are log-normal (median 20 min); a few
are always on (servers, appliances). While in a session a client sends
traffic, so its received bytes grow, and it handshakes every REKEY_AFTER_TIME
(120 s). A few installs never handshake (a client that left at once).

Push provisioning installs every registered peer on every gateway and
removes none, so its curve is the registered count: it only grows. Under JIT
a peer is installed at its client's first packet and evicted by the policy,
so the curve tracks the clients active in the last idle timeout.
"""

from __future__ import annotations

import argparse
import bisect
import csv
import heapq
import math
import random
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from appliance.gateway.evict import THRASH_WINDOW, EvictionPolicy, Evictor  # noqa: E402
from appliance.gateway.metrics import GatewayMetrics  # noqa: E402
from appliance.wg import PeerActivity  # noqa: E402
from bench.common import RunInfo, write_json  # noqa: E402

DAY = 86_400.0
REKEY_AFTER_TIME = 120.0  # whitepaper 6.1: a session in use re-handshakes this often
DEFAULT_OUT = Path(__file__).resolve().parent / "results"


@dataclass
class Params:
    clients: int = 20_000  # registered at midnight
    signups: int = 2_000  # registered during the day
    daily_users: float = 0.55  # share of the registered who connect at all today
    sessions_per_user: float = 2.5  # mean, Poisson
    always_on: float = 0.02  # share connected all day
    median_session: float = 1200.0  # seconds
    session_sigma: float = 1.0  # of the log-normal
    never_handshake: float = 0.005  # share of installs that never handshake
    idle_timeout: float = 300.0
    evict_interval: float = 30.0
    handshake_grace: float = 15.0
    max_peers: int = 0
    seed: int = 1


def diurnal_start(rng: random.Random) -> float:
    """A session start time: a morning and an evening peak over a flat floor."""
    pick = rng.random()
    if pick < 0.45:
        t = rng.gauss(10.0, 2.0)
    elif pick < 0.85:
        t = rng.gauss(20.0, 2.0)
    else:
        t = rng.uniform(0.0, 24.0)
    return (t % 24.0) * 3600.0


def poisson(rng: random.Random, mean: float) -> int:
    # Knuth's method: small means only, which is all this needs.
    limit, k, p = math.exp(-mean), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


def make_sessions(p: Params, rng: random.Random) -> tuple[dict[str, list[tuple[float, float]]],
                                                          list[float]]:
    """client -> merged (start, end) intervals; and the sign-up time of every client."""
    registered_at = [0.0] * p.clients + sorted(rng.uniform(0, DAY) for _ in range(p.signups))
    sessions: dict[str, list[tuple[float, float]]] = {}
    for i, since in enumerate(registered_at):
        key = f"client{i}"
        if rng.random() < p.always_on:
            sessions[key] = [(since, DAY)]
            continue
        new = since > 0
        if not new and rng.random() >= p.daily_users:
            continue
        spans = []
        for _ in range(max(1 if new else 0, poisson(rng, p.sessions_per_user))):
            start = diurnal_start(rng)
            if start < since:
                start = since + rng.uniform(0, 600)  # a new sign-up connects soon after
            length = rng.lognormvariate(math.log(p.median_session), p.session_sigma)
            spans.append((start, min(DAY, start + min(length, 8 * 3600))))
        spans.sort()
        merged: list[tuple[float, float]] = []
        for s, e in spans:
            if merged and s <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], e))
            else:
                merged.append((s, e))
        if merged:
            sessions[key] = merged
    return sessions, registered_at


class Installed:
    """What Evictor.choose reads of the installer: when each peer was installed."""

    def __init__(self, installed_at: float) -> None:
        self.installed_at = installed_at


class SimInstaller:
    def __init__(self) -> None:
        self.peers: dict[str, Installed] = {}

    def snapshot(self) -> dict[str, Installed]:
        return self.peers


@dataclass
class SimPeer:
    rx: int = 0
    last_handshake: float | None = None
    handshakes: bool = True  # False: the client left before answering


def simulate(p: Params) -> dict:
    rng = random.Random(p.seed)
    sessions, registered_at = make_sessions(p, rng)
    # Session starts and ends as events; the pass times as a fixed grid.
    events: list[tuple[float, int, str]] = []  # (time, +1 start / -1 end, client)
    for key, spans in sessions.items():
        for s, e in spans:
            heapq.heappush(events, (s, 1, key))
            heapq.heappush(events, (e, -1, key))
    session_start: dict[str, float] = {}  # client -> start of its current session
    installer = SimInstaller()
    evictor = Evictor(installer, EvictionPolicy(p.idle_timeout, p.handshake_grace,
                                                p.max_peers), GatewayMetrics())
    device: dict[str, SimPeer] = {}
    evicted_at: dict[str, float] = {}
    counts = Counter()
    minutes = []
    t_pass = p.evict_interval
    next_sample = 0.0

    def install(key: str, now: float) -> None:
        counts["installs"] += 1
        if now - evicted_at.get(key, -math.inf) < THRASH_WINDOW:
            counts["reinstalls_within_10_min"] += 1
        device[key] = SimPeer(handshakes=rng.random() >= p.never_handshake)
        installer.peers[key] = Installed(now)
        touch(key, now)

    def touch(key: str, now: float) -> None:
        """The client sends: bytes arrive, and a handshake is due every REKEY_AFTER_TIME."""
        peer = device[key]
        if not peer.handshakes:
            return
        peer.rx += 1
        start = session_start.get(key, now)
        peer.last_handshake = start + REKEY_AFTER_TIME * ((now - start) // REKEY_AFTER_TIME)

    while events or t_pass <= DAY:
        t_event = events[0][0] if events else math.inf
        if t_event <= t_pass and t_event <= DAY:
            now, delta, key = heapq.heappop(events)
            if delta > 0:
                session_start[key] = now
                if key not in device:  # the first packet of the session brings it back
                    install(key, now)
                else:
                    touch(key, now)
            else:
                session_start.pop(key, None)
            continue
        if t_pass > DAY:
            break
        now = t_pass
        for key in session_start:
            if key in device:
                touch(key, now)
            else:  # evicted mid-session (cap): its next packet brings it back
                install(key, now)
        activity = [PeerActivity(k, d.last_handshake, d.rx, 0) for k, d in device.items()]
        chosen = evictor.choose(activity, now)
        for key, reason in chosen.items():
            del device[key]
            del installer.peers[key]
            evicted_at[key] = now
            counts[f"evicted_{reason}"] += 1
        while next_sample <= now and next_sample < DAY:
            registered = bisect.bisect_right(registered_at, next_sample)
            minutes.append({"t": next_sample, "registered_push": registered,
                            "installed_jit": len(device), "active": len(session_start)})
            next_sample += 60.0
        t_pass += p.evict_interval
    return {"params": p, "minutes": minutes, "counts": dict(counts),
            "clients_seen": len(sessions)}


def hourly(minutes: list[dict]) -> list[dict]:
    rows = []
    for h in range(24):
        span = [m for m in minutes if h * 3600 <= m["t"] < (h + 1) * 3600]
        if not span:
            continue
        rows.append({"hour": f"{h:02d}:00",
                     "active": round(sum(m["active"] for m in span) / len(span)),
                     "jit_mean": round(sum(m["installed_jit"] for m in span) / len(span)),
                     "jit_max": max(m["installed_jit"] for m in span),
                     "push": span[-1]["registered_push"]})
    return rows


def table(result: dict) -> str:
    p: Params = result["params"]
    m = result["minutes"]
    c = result["counts"]
    jit = [x["installed_jit"] for x in m]
    active = [x["active"] for x in m]
    lines = [f"Simulated day: {p.clients:,} registered at midnight, {p.signups:,} sign-ups, "
             f"idle timeout {p.idle_timeout:g} s, pass every {p.evict_interval:g} s"
             + (f", cap {p.max_peers:,}" if p.max_peers else "") + f", seed {p.seed}", "",
             "| hour  | active clients | JIT installed (mean) | JIT installed (max) "
             "| push installed |",
             "|-------|---------------:|---------------------:|--------------------:"
             "|---------------:|"]
    for r in hourly(m):
        lines.append(f"| {r['hour']} | {r['active']:>14,} | {r['jit_mean']:>20,} "
                     f"| {r['jit_max']:>19,} | {r['push']:>14,} |")
    evictions = {k.removeprefix("evicted_"): v for k, v in c.items()
                 if k.startswith("evicted_")}
    lines += ["",
              f"- push: {m[-1]['registered_push']:,} peers installed at the end of the day "
              "(every registered peer, none ever removed)",
              f"- JIT: peak {max(jit):,}, mean {sum(jit) / len(jit):,.0f} installed; "
              f"peak {max(active):,} clients active at once; "
              f"{result['clients_seen']:,} distinct clients connected",
              f"- JIT installs {c.get('installs', 0):,}; evictions "
              + ", ".join(f"{k} {v:,}" for k, v in sorted(evictions.items()))
              + f"; reinstalled within {THRASH_WINDOW / 60:g} min of an eviction "
              f"{c.get('reinstalls_within_10_min', 0):,}"]
    return "\n".join(lines)


def summary(result: dict) -> dict:
    """What the README states about a day, and the hourly rows it comes from."""
    m = result["minutes"]
    jit = [x["installed_jit"] for x in m]
    return {"hourly": hourly(m),
            "push_installed_at_end": m[-1]["registered_push"],
            "jit_peak": max(jit), "jit_mean": round(sum(jit) / len(jit)),
            "active_peak": max(x["active"] for x in m),
            "clients_seen": result["clients_seen"], "counts": result["counts"]}


def write_csv(result: dict, path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["t", "active", "installed_jit", "registered_push"])
        w.writeheader()
        for row in result["minutes"]:
            w.writerow({k: row[k] for k in w.fieldnames})


def plot(result: dict, path: Path) -> bool:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no PNG (the table and CSV are written)",
              file=sys.stderr)
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p: Params = result["params"]
    m = result["minutes"]
    hours = [x["t"] / 3600 for x in m]
    fig, ax = plt.subplots(figsize=(10, 5.5), dpi=120)
    ax.plot(hours, [x["registered_push"] for x in m], label="push: every registered peer",
            color="tab:red", linewidth=2)
    ax.plot(hours, [x["installed_jit"] for x in m],
            label=f"JIT: installed (idle timeout {p.idle_timeout:g} s)", color="tab:blue",
            linewidth=2)
    ax.plot(hours, [x["active"] for x in m], label="clients active now", color="tab:gray",
            linewidth=1, linestyle="--")
    ax.set_xlim(0, 24)
    ax.set_xticks(range(0, 25, 2))
    ax.set_ylim(bottom=0)
    ax.set_xlabel("hour of the day")
    ax.set_ylabel("peers installed on the gateway")
    ax.set_title("Installed peers over a simulated day: push vs just-in-time")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="center right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = Params()
    ap.add_argument("--clients", type=int, default=d.clients)
    ap.add_argument("--signups", type=int, default=d.signups)
    ap.add_argument("--idle-timeout", type=float, default=d.idle_timeout)
    ap.add_argument("--evict-interval", type=float, default=d.evict_interval)
    ap.add_argument("--max-peers", type=int, default=d.max_peers)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT,
                    help="directory for day.png, day.csv, day.md (bench/results)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    info = RunInfo()
    p = Params(clients=args.clients, signups=args.signups, idle_timeout=args.idle_timeout,
               evict_interval=args.evict_interval, max_peers=args.max_peers, seed=args.seed)
    result = simulate(p)
    args.out.mkdir(parents=True, exist_ok=True)
    text = table(result)
    (args.out / "day.md").write_text(text + "\n")
    write_csv(result, args.out / "day.csv")
    drew = plot(result, args.out / "day.png")
    print(text)
    print(f"\nwritten: {args.out / 'day.md'}, {args.out / 'day.csv'}"
          + (f", {args.out / 'day.png'}" if drew else ""))
    info.finish()
    write_json(args.json, "day", info, asdict(p), summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
