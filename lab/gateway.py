"""Lab gateway hosts: a wireguard-go interface, and in "jit" mode the wgjit daemon on it.

The lab always creates the interface itself and the daemon adopts it (the CLI
contract: an existing interface's private key is read from the device). So the
"plain" baseline and the JIT gateway differ only in who installs peers: `wg set`
by hand before any traffic, or the daemon on the first initiation.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import requests
from prometheus_client.parser import text_string_to_metric_families

from lab import addressing, procs
from lab.netns import LabError, sh, wg
from lab.nsexec import NetnsWorker
from lab.registry import gateway_token, wgjit_argv
from lab.state import Client, Gateway, Registry

MODES = ("jit", "plain")
METRICS_LISTEN = "127.0.0.1:9586"


def configure_interface(g: Gateway) -> None:
    wg(["set", g.ifname, "private-key", g.private_key_file, "listen-port", str(g.listen_port)],
       ns=g.ns)
    batch = "\n".join([
        f"address add {g.tunnel4} dev {g.ifname}",
        f"address add {g.tunnel6} dev {g.ifname} nodad",
        f"link set {g.ifname} up",
    ]) + "\n"
    sh(["ip", "-n", g.ns, "-batch", "-"], input=batch)


def provision(g: Gateway, c: Client) -> None:
    """Pre-provision a client by hand, the way push-provisioning does (the baseline)."""
    args = ["set", g.ifname, "peer", c.public_key, "allowed-ips", f"{c.tunnel4},{c.tunnel6}"]
    if c.psk_file:
        args += ["preshared-key", c.psk_file]
    wg(args, ns=g.ns)


def remove_peer(g: Gateway, public_key: str) -> None:
    wg(["set", g.ifname, "peer", public_key, "remove"], ns=g.ns)


@dataclass
class PeerInfo:
    public_key: str
    endpoint: str | None
    allowed_ips: list[str]
    latest_handshake: int  # unix seconds, 0 = never
    rx_bytes: int
    tx_bytes: int
    persistent_keepalive: int


def peers(ifname: str, ns: str | None = None) -> list[PeerInfo]:
    """The interface's peers from `wg show dump`, without the private or preshared keys."""
    lines = wg(["show", ifname, "dump"], ns=ns).splitlines()
    out = []
    for line in lines[1:]:  # the first line is the interface, with its private key
        f = line.split("\t")
        if len(f) < 8:
            continue
        out.append(PeerInfo(
            public_key=f[0], endpoint=None if f[2] == "(none)" else f[2],
            allowed_ips=[] if f[3] == "(none)" else f[3].split(","),
            latest_handshake=int(f[4]), rx_bytes=int(f[5]), tx_bytes=int(f[6]),
            persistent_keepalive=0 if f[7] == "off" else int(f[7])))
    return out


def daemon_argv(g: Gateway, regs: Sequence[Registry], state_dir: str, idle_timeout: float,
                evict_interval: float, extra: Sequence[str] = ()) -> list[str]:
    """regs: the registry servers, in the gateway's order of preference.

    extra: more `wgjit gateway run` flags; later flags win, so they may override
    these (but a `--registry` there adds a server).
    """
    servers = [arg for r in regs for arg in ("--registry", r.url)]
    ca = ["--registry-ca", regs[0].ca_file] if regs[0].ca_file else []
    # DEBUG: the steps of every install as events, the story the demo, the tests and
    # the benches read (a daemon's INFO has one line per install).
    return [*wgjit_argv(), "gateway", "run", "--log-level", "DEBUG", "--interface", g.ifname,
            *servers, *ca, "--token-file", gateway_token(regs[0], g.name),
            "--listen-port", str(g.listen_port), "--state-dir", state_dir,
            "--metrics-listen", g.metrics, "--idle-timeout", f"{idle_timeout:g}",
            "--evict-interval", f"{evict_interval:g}", "--backend", "uapi",
            "--capture-interface", addressing.UNDERLAY_IF, "--log-format", "json", *extra]


def start_daemon(g: Gateway, regs: Sequence[Registry], lab_dir: str, idle_timeout: float,
                 evict_interval: float, extra: Sequence[str] = ()) -> None:
    state_dir = Path(lab_dir) / f"gateway-{g.name}"
    state_dir.mkdir(mode=0o700, exist_ok=True)
    g.metrics = METRICS_LISTEN
    g.daemon_log = str(Path(lab_dir) / f"gateway-{g.name}.log")
    g.daemon_argv = daemon_argv(g, regs, str(state_dir), idle_timeout, evict_interval, extra)
    g.daemon_pid = procs.spawn(g.ns, g.daemon_argv, g.daemon_log)


def restart_daemon(g: Gateway) -> None:
    """Start a stopped daemon again: same flags, same state dir, log appended."""
    if not g.daemon_argv:
        raise LabError(f"{g.name}: no daemon was started on this gateway")
    if g.daemon_pid and procs.alive(g.daemon_pid) and procs.in_netns(g.daemon_pid, g.ns):
        raise LabError(f"{g.name}: the daemon is still running (pid {g.daemon_pid})")
    g.daemon_pid = procs.spawn(g.ns, g.daemon_argv, g.daemon_log)


def wait_daemon(g: Gateway, timeout: float = 20.0) -> float:
    """Seconds until the daemon's /healthz answered 200 inside its namespace."""
    t0 = time.monotonic()
    with NetnsWorker(g.ns) as w, requests.Session() as s:
        w.on_close(s.close)
        while True:
            try:
                if w.call(s.get, f"http://{g.metrics}/healthz", timeout=1.0).status_code == 200:
                    return time.monotonic() - t0
            except requests.RequestException:
                pass
            if not procs.alive(g.daemon_pid):
                raise LabError(f"gateway daemon {g.name} exited:\n{procs.tail(g.daemon_log)}")
            if time.monotonic() - t0 > timeout:
                raise LabError(f"gateway daemon {g.name}: no /healthz after {timeout}s:\n"
                               f"{procs.tail(g.daemon_log)}")
            time.sleep(0.05)


@dataclass
class Metrics:
    """One scrape of a daemon's /metrics: sample name and labels -> value."""

    samples: dict[tuple[str, frozenset[tuple[str, str]]], float]

    def value(self, name: str, **labels: str) -> float:
        """Sum of the samples called `name` whose labels include `labels` (0 if none)."""
        want = {(k, str(v)) for k, v in labels.items()}
        return sum(v for (n, ls), v in self.samples.items() if n == name and want <= ls)


def scrape(w: NetnsWorker, g: Gateway, session: requests.Session) -> Metrics:
    """The daemon's /metrics, fetched from inside its namespace (it listens on loopback)."""
    r = w.call(session.get, f"http://{g.metrics}/metrics", timeout=5.0)
    r.raise_for_status()
    samples = {(s.name, frozenset(s.labels.items())): s.value
               for fam in text_string_to_metric_families(r.text) for s in fam.samples}
    return Metrics(samples)


def health(w: NetnsWorker, g: Gateway, session: requests.Session) -> tuple[int, dict]:
    """(HTTP status, JSON body) of the daemon's /healthz."""
    r = w.call(session.get, f"http://{g.metrics}/healthz", timeout=5.0)
    return r.status_code, r.json()


def status(g: Gateway, *, as_json: bool = False) -> str:
    """What `wgjit gateway status` prints for this gateway, run in its namespace."""
    argv = [*wgjit_argv(), "gateway", "status", "--metrics-listen", g.metrics]
    p = sh(["ip", "netns", "exec", g.ns, *argv, *(["--json"] if as_json else [])],
           check=False, timeout=30)
    if p.returncode not in (0, 1):
        raise LabError(f"wgjit gateway status on {g.name}: {p.stderr.strip()[-300:]}")
    return p.stdout


def events(g: Gateway) -> list[dict]:
    """Every JSON event the daemon logged so far, oldest first (other lines skipped)."""
    out = []
    try:
        text = Path(g.daemon_log).read_text(errors="replace")
    except FileNotFoundError:
        return out
    for line in text.splitlines():
        if not line.startswith("{"):
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            continue  # a line still being written
        if isinstance(obj, dict) and "event" in obj:
            out.append(obj)
    return out
