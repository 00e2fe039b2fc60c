"""Shared parts of the gateway benchmarks (bench/connect.py, herd.py, coldstart.py).

- `lab_running(spec)`: a namespace lab that is torn down on return, exception,
  Ctrl-C or SIGTERM.
- `Pinger`: ICMP echo from many lab clients at once, from this one process, so a
  herd starts as close together as the CPU allows (one `ping` process per client
  would spread the start over the second it takes to spawn them on a 2-core
  machine; what is left is each woken wireguard-go building its initiation, and
  the herd bench reports that spread). Replies are stamped by the kernel
  (SO_TIMESTAMPNS), sends just before sendto().
- `InitiationCapture`: tcpdump on the lab's router, to count handshake initiations
  and see when the first one of each client crossed the wire.
- gateway daemon control for the benches that restart it with other settings,
  metrics scraping, percentiles, tables, JSON.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import selectors
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from appliance.wg.uapi import open_uapi  # noqa: E402
from lab import client as lab_client  # noqa: E402
from lab import gateway as lab_gateway  # noqa: E402
from lab import procs  # noqa: E402
from lab.netns import LabError  # noqa: E402
from lab.nsexec import NetnsWorker  # noqa: E402
from lab.state import Client, Gateway  # noqa: E402
from lab.timeline import Event, EventFollower, parse_line  # noqa: E402
from lab.topology import Lab, LabSpec, ns_name, signals_raise_interrupt  # noqa: E402

# Like `ping -i 0.2` in the lab: resend until the first reply, in case the
# first echo is lost while the session is being set up.
ECHO_INTERVAL = 0.2
ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY = 8, 0
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_main(main: Callable[[], int]) -> None:
    """Exit with main's status; Ctrl-C or SIGTERM: 130 without a traceback (the lab is
    already gone by then: lab_running tears it down on the way out)."""
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        say("interrupted")
        sys.exit(130)


# --- statistics and output ------------------------------------------------------

def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100): always a value that was measured."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def ms(seconds: float) -> str:
    return "-" if seconds is None or math.isnan(seconds) else f"{seconds * 1000:.1f}"


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A plain text table; numbers right-aligned, the first column left-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(r, widths, strict=True)))
    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


@dataclass
class RunInfo:
    """What the numbers were measured on; other people's tests share these 2 cores."""
    started: float = field(default_factory=time.time)
    cpus: int = field(default_factory=lambda: os.cpu_count() or 0)
    load_before: tuple[float, float, float] = field(default_factory=load_average)
    load_after: tuple[float, float, float] | None = None
    commit: str = ""

    def finish(self) -> None:
        self.load_after = load_average()
        p = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                           capture_output=True, text=True)
        self.commit = p.stdout.strip()

    def describe(self) -> str:
        def fmt(la: tuple[float, float, float] | None) -> str:
            return "?" if la is None else " ".join(f"{x:.2f}" for x in la)
        return (f"{self.cpus} cpus, load average (1/5/15 min) before {fmt(self.load_before)}, "
                f"after {fmt(self.load_after)}; commit {self.commit or '?'}")


def write_json(path: Path | None, bench: str, info: RunInfo, params: dict[str, Any],
               results: Any) -> None:
    if path is None:
        return
    doc = {"bench": bench, "run": asdict(info), "params": params, "results": results}
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    say(f"wrote {path}")


# --- the lab ---------------------------------------------------------------------

@contextlib.contextmanager
def lab_running(spec: LabSpec) -> Iterator[Lab]:
    """Lab.up(spec), and down on the way out whatever happens (SIGTERM included)."""
    with signals_raise_interrupt():
        t0 = time.monotonic()
        lab = Lab.up(spec, progress=lambda m: say(f"  {m}"))
        say(f"  lab {lab.prefix} built in {time.monotonic() - t0:.1f} s")
        try:
            yield lab
        finally:
            problems = lab.down()
            if problems:
                say(f"lab teardown problems: {problems}")


def reset_sessions(lab: Lab, clients: Iterable[Client], threads: int = 8) -> None:
    """Make each client's next packet a fresh handshake initiation (a new session)."""
    def one(c: Client) -> None:
        lab_client.reset_session(c, lab.gateway(c.gateway))
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, clients))


def clear_peers(g: Gateway) -> int:
    """Remove every peer from the gateway's interface; returns how many there were."""
    dev = open_uapi(g.ifname, timeout=60)
    keys = [p.public_key for p in dev.peers()]
    dev.remove_peers(keys)
    return len(keys)


def stop_daemon(lab: Lab, g: Gateway) -> None:
    if g.daemon_pid and procs.alive(g.daemon_pid) and procs.in_netns(g.daemon_pid, g.ns):
        lab.stop_daemon(g.name)


def wipe_daemon_state(lab: Lab, g: Gateway) -> None:
    """Forget the daemon's peer cache and feed cursor: the next start is a first start."""
    state_dir = Path(lab.state.dir) / f"gateway-{g.name}"
    for p in state_dir.glob("gateway.db*"):
        p.unlink()


def start_daemon(lab: Lab, g: Gateway, extra: Sequence[str] = (), *,
                 timeout: float = 60.0) -> tuple[float, float]:
    """Start `wgjit gateway run` on g; (unix time of the spawn, of its gateway_ready)."""
    st = lab.state
    assert st.registry is not None
    log = Path(st.dir) / f"gateway-{g.name}.log"
    follower = EventFollower(log, g.name, from_end=True)
    spawned = time.time()
    lab_gateway.start_daemon(g, st.registries, st.dir, 300.0, 30.0, extra)
    st.save()
    return spawned, wait_event(follower, "gateway_ready", g, timeout)


def wait_event(follower: EventFollower, event: str, g: Gateway, timeout: float,
               poll: float = 0.002) -> float:
    deadline = time.monotonic() + timeout
    while True:
        for ev in follower.events():
            if ev.event == event:
                return ev.ts
        if not procs.alive(g.daemon_pid):
            raise LabError(f"gateway daemon {g.name} exited:\n{procs.tail(g.daemon_log)}")
        if time.monotonic() > deadline:
            raise LabError(f"gateway daemon {g.name}: no {event} after {timeout:g} s")
        time.sleep(poll)


def restart_daemon_empty(lab: Lab, g: Gateway,
                         extra: Sequence[str] = ()) -> tuple[float, float]:
    """A gateway as after a reboot: no daemon, no peers, no cache; then start it
    (see start_daemon)."""
    stop_daemon(lab, g)
    clear_peers(g)
    wipe_daemon_state(lab, g)
    return start_daemon(lab, g, extra)


def gateway_metrics(lab: Lab, g: Gateway) -> dict[str, float]:
    """The daemon's /metrics as {'name{label="v"}': value} (samples, not families)."""
    out: dict[str, float] = {}
    for (name, labels), value in lab.metrics(g.name).samples.items():
        text = ",".join(f'{k}="{v}"' for k, v in sorted(labels))
        out[f"{name}{{{text}}}" if text else name] = value
    return out


def metric_sum(metrics: dict[str, float], name: str) -> float:
    """Sum of a metric over all its labels."""
    return sum(v for k, v in metrics.items() if k == name or k.startswith(name + "{"))


def labelled(metrics: dict[str, float], name: str) -> dict[str, float]:
    """{label value: value} of a one-label metric, non-zero ones only."""
    out = {}
    for k, v in metrics.items():
        m = re.fullmatch(re.escape(name) + r'\{\w+="([^"]*)"\}', k)
        if m and v:
            out[m.group(1)] = v
    return out


def daemon_events(g: Gateway, since: float = 0.0) -> list[Event]:
    """The daemon's JSON events (see appliance/gateway/events.py) stamped at or after since."""
    try:
        text = Path(g.daemon_log).read_text(errors="replace")
    except (FileNotFoundError, TypeError):
        return []
    return [e for e in (parse_line(line, 0.0, g.name) for line in text.splitlines())
            if e is not None and e.ts >= since]


def pipeline(events: Sequence[Event], t0: float) -> dict[str, Any]:
    """Where the daemon's time went: per-client milliseconds its events report
    (peer_installed.pulled_ms and .ms, or peer_pulled.ms where the daemon logs its
    DEBUG steps: since the initiation was seen) and when the last of each step
    happened, in seconds after t0."""
    installs = [e for e in events if e.event == "peer_installed"]

    def last(name: str) -> float:
        ts = [e.ts for e in events if e.event == name]
        return max(ts) - t0 if ts else math.nan

    def field_ms(evs: Sequence[Event], name: str) -> dict[str, float]:
        vals = [e.get(name) / 1000 for e in evs if isinstance(e.get(name), (int, float))]
        return summarise(vals)
    counts: dict[str, int] = {}
    for e in events:
        counts[e.event] = counts.get(e.event, 0) + 1
    pulled = [e for e in events if e.event == "peer_pulled"]
    seen = [e.get("seen") for e in installs if isinstance(e.get("seen"), (int, float))]
    return {"counts": counts,
            "pulled": field_ms(pulled, "ms") if pulled else field_ms(installs, "pulled_ms"),
            "installed": field_ms(installs, "ms"),
            "last_seen_s": last("initiation_seen") if counts.get("initiation_seen")
            else (max(seen) - t0 if seen else math.nan),
            "last_installed_s": last("peer_installed"),
            "last_handshake_s": last("handshake_completed")}


def cpu_seconds(*pids: int) -> float:
    """User + system CPU time the processes used so far (dead ones count 0)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    """Resident memory of a process, in MiB (what N peers cost wireguard-go)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return math.nan


# --- ICMP echo from many clients -------------------------------------------------

def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def echo_request(ident: int, seq: int) -> bytes:
    payload = b"wgjit-bench-echo"
    header = struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, 0, ident, seq)
    csum = _checksum(header + payload)
    return struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, csum, ident, seq) + payload


def _raw_icmp_socket() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    s.setblocking(False)
    return s


@dataclass
class Echo:
    """One client's attempt to reach its gateway through the tunnel."""
    client: str
    gateway: str
    start_at: float  # when it is due to start (unix time)
    first_sent: float = 0.0  # unix time of the first echo request
    first_reply: float = 0.0  # kernel receive time of the first echo reply
    sent: int = 0

    @property
    def latency(self) -> float:
        """Seconds from the first echo request to the first reply; nan if none came."""
        return self.first_reply - self.first_sent if self.first_reply else math.nan


class Pinger:
    """Raw ICMP sockets made inside each client's namespace, driven from one thread.

    A socket stays in the namespace it was made in, so one epoll loop here can
    ping from all of them. Close it (or use it as a context manager) before the
    lab goes down: an open socket keeps its namespace alive.
    """

    def __init__(self, lab: Lab, clients: Sequence[Client]) -> None:
        self.lab = lab
        self.socks: dict[str, socket.socket] = {}
        self.idents: dict[str, int] = {}
        self.targets: dict[str, str] = {}
        try:
            for c in clients:
                with NetnsWorker(c.ns) as w:
                    self.socks[c.name] = w.call(_raw_icmp_socket)
                self.targets[c.name] = lab.gateway(c.gateway).tunnel4_ip
        except BaseException:
            self.close()
            raise
        self.by_fd = {s.fileno(): name for name, s in self.socks.items()}

    def close(self) -> None:
        for s in self.socks.values():
            s.close()
        self.socks.clear()

    def __enter__(self) -> Pinger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, starts: dict[str, float], timeout: float) -> dict[str, Echo]:
        """Ping each client's gateway from starts[client] (unix time) until its first
        reply; give up `timeout` seconds after a client's start."""
        echoes = {n: Echo(n, self.lab.client(n).gateway, t) for n, t in starts.items()}
        # New identifiers each run: a late reply to an earlier run's echo must not
        # count as this run's first reply.
        base = int.from_bytes(os.urandom(2), "big")
        for i, n in enumerate(starts):
            self.idents[n] = (base + i) & 0xFFFF
            self._receive(n)
        next_send = dict(starts)
        sel = selectors.DefaultSelector()
        for n in starts:
            sel.register(self.socks[n], selectors.EVENT_READ, n)
        try:
            while next_send:
                now = time.time()
                for n, due in list(next_send.items()):
                    if due > now:
                        continue
                    e = echoes[n]
                    if e.first_sent and now - e.start_at > timeout:
                        del next_send[n]
                        continue
                    self._send(n, e)
                    next_send[n] = (e.first_sent or now) + e.sent * ECHO_INTERVAL
                if not next_send:
                    break
                wait = max(0.0, min(next_send.values()) - time.time())
                for key, _ in sel.select(min(wait, 0.05)):
                    n = key.data
                    ts = self._receive(n)
                    if ts and n in next_send and not echoes[n].first_reply:
                        echoes[n].first_reply = ts
                        del next_send[n]
        finally:
            sel.close()
        return echoes

    def _send(self, n: str, e: Echo) -> None:
        packet = echo_request(self.idents[n], e.sent + 1)
        now = time.time()
        # A failed send (none expected from wireguard-go's tun) must not stop the
        # others; the client just counts as not connected if it never gets through.
        with contextlib.suppress(OSError):
            self.socks[n].sendto(packet, (self.targets[n], 0))
        if not e.first_sent:
            e.first_sent = now
        e.sent += 1

    def _receive(self, n: str) -> float:
        """Drain the socket; the kernel time of the first echo reply to us, else 0."""
        s = self.socks[n]
        found = 0.0
        while True:
            try:
                data, anc, _, _ = s.recvmsg(256, socket.CMSG_SPACE(16))
            except BlockingIOError:
                return found
            ihl = (data[0] & 0x0F) * 4
            if len(data) < ihl + 8:
                continue
            icmp_type, _, _, ident, _ = struct.unpack("!BBHHH", data[ihl:ihl + 8])
            if icmp_type != ICMP_ECHO_REPLY or ident != self.idents.get(n) or found:
                continue
            found = time.time()
            for level, kind, value in anc:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                    sec, nsec = struct.unpack("qq", value[:16])
                    found = sec + nsec / 1e9


# --- handshake initiations on the wire ------------------------------------------

# "1732540000.123456 IP 198.51.100.2.41000 > 192.0.2.11.51820: UDP, length 148"
_TCPDUMP_LINE = re.compile(
    r"^(\d+\.\d+) IP (\d+\.\d+\.\d+\.\d+)\.(\d+) > (\d+\.\d+\.\d+\.\d+)\.(\d+): UDP")


@dataclass
class Initiation:
    ts: float
    src: str
    dst: str
    from_gateway: bool  # the gateway initiating towards the client (role inversion)
    dport: int = 0


class InitiationCapture:
    """tcpdump on the lab router's bridge: every type-1 WireGuard message, IPv4.

    `-Q in` sees each routed packet once (as it enters the router). The lab's
    clients sit in other subnets than the gateways, so every handshake crosses
    the router. With the RTT relay (lab/relay.py) in the router's namespace,
    client initiations enter addressed to the relay's port, and the gateway's
    to the relay's upstream socket of that client (Lab.relay_flows); so the
    filter takes any port and an initiation's length (148 + 8 UDP bytes).
    Timestamps are the kernel's, on the same clock as the Pinger's.
    """

    def __init__(self, lab: Lab, port: int = 51820) -> None:
        self.lab = lab
        self.log = Path(lab.state.dir) / "bench-initiations.log"
        ns = ns_name(lab.prefix, "net")
        expr = "ip and udp and udp[4:2] = 156 and udp[8] = 1"
        self.pid = procs.spawn(ns, ["tcpdump", "-i", "br0", "-Q", "in", "-n", "-tt", "-l",
                                    "-s", "64", "-B", "4096", expr], self.log)
        self.port = port
        deadline = time.monotonic() + 10
        while "listening on" not in self.log.read_text(errors="replace"):
            if not procs.alive(self.pid) or time.monotonic() > deadline:
                raise LabError(f"tcpdump did not start: {procs.tail(self.log)}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.pid and procs.alive(self.pid):
            procs.stop([(self.pid, signal.SIGINT)], grace=3.0)
        self.pid = 0

    def initiations(self) -> list[Initiation]:
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            m = _TCPDUMP_LINE.match(line)
            if m:
                ts, src, sport, dst, dport = m.groups()
                out.append(Initiation(float(ts), src, dst, int(sport) == self.port,
                                      int(dport)))
        return out

    def per_client(self, since: float = 0.0) -> dict[str, list[Initiation]]:
        """Initiations by client name (either direction), in time order."""
        by_addr = {c.underlay4: c.name for c in self.lab.state.clients}
        # The relay's upstream "ip:port" -> the client's "ip:port" it stands for.
        relayed = {up: client.rpartition(":")[0]
                   for up, client in self.lab.relay_flows().items()}
        out: dict[str, list[Initiation]] = {}
        for i in self.initiations():
            if i.ts < since:
                continue
            if i.from_gateway:
                target = relayed.get(f"{i.dst}:{i.dport}", i.dst)
                name = by_addr.get(target)
            else:
                name = by_addr.get(i.src)
            if name:
                out.setdefault(name, []).append(i)
        return out

    def __enter__(self) -> InitiationCapture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def summarise(latencies: Sequence[float]) -> dict[str, float]:
    ok = [x for x in latencies if not math.isnan(x)]
    return {"n": len(latencies), "ok": len(ok),
            "p50": percentile(ok, 50), "p90": percentile(ok, 90),
            "p99": percentile(ok, 99), "max": max(ok) if ok else math.nan,
            "mean": sum(ok) / len(ok) if ok else math.nan}


def spec_for(**kw: Any) -> LabSpec:
    return LabSpec(registry="yes", **kw)
