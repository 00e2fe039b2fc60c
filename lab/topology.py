"""A lab: namespaces on a bridge ("the internet"), a registry, gateways, clients.

    <prefix>-net   the internet: bridge br0, routes between the server and client nets
    <prefix>-reg   `wgjit registry serve` (gunicorn) on 192.0.2.2:8080
    <prefix>-regN  with registries=N > 1: more registry servers over the same database
                   (the same SQLite file: namespaces share the filesystem), 192.0.2.(1+N)
    <prefix>-gN    wireguard-go <prefix>gN on :51820; in "jit" mode `wgjit gateway run` adopts it
    <prefix>-cN    wireguard-go <prefix>cN, configured with `wg` only; pings its gateway

Every name carries the prefix, so labs coexist (UAPI sockets in /var/run/wireguard
are shared by all namespaces). `destroy(prefix)` finds what to remove by name, not
from memory, so it also cleans up after a crashed or interrupted run.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import requests

from appliance.keys import generate_keypair, generate_preshared_key
from appliance.secrets import write_secret
from lab import addressing, client, gateway, procs
from lab.addressing import UNDERLAY_IF, WG_PORT
from lab.netns import LabError, list_netns, sh, uapi_socket
from lab.nsexec import NetnsWorker
from lab.registry import RegistryClient, another_server, serve, start_registry
from lab.state import (
    Client,
    Gateway,
    LabState,
    StateError,
    check_prefix,
    create_state,
    list_labs,
    load_state,
    state_dir,
)

Progress = Callable[[str], None]

BRIDGE = "br0"
WG_START_TIMEOUT = 10.0
BUILD_THREADS = 8

T = TypeVar("T")


DATAPLANES = ("wireguard-go", "kernel")


def random_prefix() -> str:
    return "wj" + secrets.token_hex(2)


def _quiet(_: str) -> None:
    pass


@dataclass
class LabSpec:
    gateways: list[str] = field(default_factory=lambda: ["plain"])  # a mode per gateway
    clients: int = 1
    # Gateway name per client ("g1", ...); default: round robin.
    client_gateways: list[str] | None = None
    prefix: str | None = None
    registry: str = "yes"  # "yes" or "no"
    # Registry servers over the one database; jit gateways are given them all, in order.
    registries: int = 1
    daemon: bool = True  # in jit mode, start `wgjit gateway run`
    psk: bool = False
    endpoint_family: str = "4"  # how clients reach gateways: "4", "6" or "mixed"
    idle_timeout: float = 300.0
    evict_interval: float = 30.0
    # More `wgjit gateway run` flags per gateway name, e.g. {"g2": ["--trigger-keepalive", "0"]}.
    daemon_args: dict[str, list[str]] = field(default_factory=dict)
    # Emulated round-trip time, ms, between clients and gateways (lab/relay.py in the
    # internet namespace); None: clients reach gateways directly. client_rtt sets it
    # per client name ({"c1": 250}) and also brings up the relay.
    rtt: float | None = None
    client_rtt: dict[str, float] = field(default_factory=dict)
    # Whose WireGuard the hosts run: "wireguard-go" (userspace; the host kernel has no
    # module) or "kernel" (kernel WireGuard, e.g. the lab built inside a quick VM).
    dataplane: str = "wireguard-go"
    # Seconds for a daemon to answer /healthz; Python under emulation (a lab inside
    # a VM) needs minutes where the host takes under one.
    daemon_start_timeout: float = 20.0

    def check(self) -> None:
        if not 1 <= len(self.gateways) <= addressing.MAX_GATEWAYS:
            raise LabError(f"gateways: 1..{addressing.MAX_GATEWAYS}")
        for m in self.gateways:
            if m not in gateway.MODES:
                raise LabError(f"gateway mode {m!r}: use one of {', '.join(gateway.MODES)}")
        if not 0 <= self.clients <= addressing.MAX_CLIENTS:
            raise LabError(f"clients: 0..{addressing.MAX_CLIENTS}")
        if self.client_gateways is not None and len(self.client_gateways) != self.clients:
            raise LabError("client_gateways needs one gateway name per client")
        if self.registry not in ("yes", "no"):
            raise LabError("registry: yes or no")
        if not 1 <= self.registries <= addressing.MAX_REGISTRIES:
            raise LabError(f"registries: 1..{addressing.MAX_REGISTRIES}")
        if self.registries > 1 and self.registry == "no":
            raise LabError("registries > 1 needs the registry")
        if self.endpoint_family not in ("4", "6", "mixed"):
            raise LabError("endpoint_family: 4, 6 or mixed")
        if self.dataplane not in DATAPLANES:
            raise LabError(f"dataplane: {' or '.join(DATAPLANES)}")
        for name in self.daemon_args:
            if not re.fullmatch(r"g\d+", name) or int(name[1:]) > len(self.gateways):
                raise LabError(f"daemon_args: no gateway {name!r}")
        if self.rtt is not None and not 0 <= self.rtt <= 10_000:
            raise LabError("rtt: 0..10000 ms")
        for name, ms in self.client_rtt.items():
            if not re.fullmatch(r"c\d+", name) or not 1 <= int(name[1:]) <= self.clients:
                raise LabError(f"client_rtt: no client {name!r}")
            if not 0 <= ms <= 10_000:
                raise LabError(f"client_rtt {name}: 0..10000 ms")

    def client_rtt_ms(self, name: str) -> float | None:
        """The round-trip time the relay gives this client; None: no relay at all."""
        if self.rtt is None and not self.client_rtt:
            return None
        return self.client_rtt.get(name, self.rtt or 0.0)


# --- names -----------------------------------------------------------------------

def ns_name(prefix: str, host: str) -> str:
    return f"{prefix}-{host}"


def _ns_re(prefix: str) -> re.Pattern[str]:
    return re.compile(rf"^{re.escape(prefix)}-(net|reg\d*|g\d+|c\d+)$")


def _sock_re(prefix: str) -> re.Pattern[str]:
    return re.compile(rf"^{re.escape(prefix)}[gc]\d+\.sock$")


def registry_host(n: int) -> str:
    """The host name of registry server n: "reg", then "reg2", "reg3", ..."""
    return "reg" if n == 1 else f"reg{n}"


def lab_namespaces(prefix: str) -> list[str]:
    pat = _ns_re(prefix)
    return [n for n in list_netns() if pat.match(n)]


def lab_sockets(prefix: str) -> list[Path]:
    pat = _sock_re(prefix)
    d = Path("/var/run/wireguard")
    return sorted(p for p in d.iterdir() if pat.match(p.name)) if d.is_dir() else []


# --- teardown --------------------------------------------------------------------

def destroy(prefix: str) -> list[str]:
    """Remove every namespace, process, socket and file of lab `prefix`; list what failed.

    Idempotent, and needs no state: it finds the lab's things by their names.
    """
    check_prefix(prefix)
    problems: list[str] = []
    namespaces = lab_namespaces(prefix)
    # gunicorn stops at once on SIGINT; on SIGTERM it waits for workers to finish.
    reg_ns = re.compile(rf"^{re.escape(prefix)}-reg\d*$")
    targets = [(pid, signal.SIGINT if reg_ns.match(ns) else signal.SIGTERM)
               for ns in namespaces for pid in procs.netns_pids(ns)]
    procs.stop(targets)
    # wireguard-go removes its socket on SIGTERM, not on SIGKILL.
    for sock in lab_sockets(prefix):
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()
    for ns in namespaces:
        # A process that slipped in after the first sweep would pin the namespace.
        procs.stop([(pid, signal.SIGKILL) for pid in procs.netns_pids(ns)], grace=1.0)
        p = sh(["ip", "netns", "del", ns], check=False)
        if p.returncode != 0 and ns in list_netns():
            problems.append(f"ip netns del {ns}: {p.stderr.strip()}")
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(state_dir(prefix))
    _live.pop(prefix, None)
    return problems


def destroy_all() -> dict[str, list[str]]:
    return {prefix: destroy(prefix) for prefix in list_labs()}


def reap_orphans() -> list[str]:
    """Destroy labs whose owning process died without cleaning up (kill -9, a crash)."""
    reaped = []
    for prefix in list_labs():
        try:
            st = load_state(prefix)
        except StateError:
            continue
        if st is not None and st.owner_pid and not procs.alive(st.owner_pid):
            destroy(prefix)
            reaped.append(prefix)
    return reaped


# Labs built by this process that must not outlive it (tests, the demo).
_live: dict[str, Lab] = {}
_atexit_lock = threading.Lock()


@atexit.register
def _destroy_live() -> None:
    with _atexit_lock:
        for prefix in list(_live):
            destroy(prefix)


@contextlib.contextmanager
def signals_raise_interrupt() -> Iterator[None]:
    """Turn SIGTERM (and SIGHUP) into KeyboardInterrupt so cleanup code runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# --- building ------------------------------------------------------------------

def _new_netns(ns: str) -> None:
    sh(["ip", "netns", "add", ns])
    # Duplicate address detection would hold IPv6 back for a second per interface;
    # the lab's addresses are unique by construction.
    sh(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", "net.ipv6.conf.all.accept_dad=0",
        "net.ipv6.conf.default.accept_dad=0"])


def _parallel(fn: Callable[[T], object], items: list[T]) -> None:
    """Run fn over items on a few threads: each step is a handful of short subprocesses
    that wait on the kernel, so a 100-client lab builds in seconds, not a minute."""
    if len(items) <= 1:
        for it in items:
            fn(it)
        return
    with ThreadPoolExecutor(max_workers=BUILD_THREADS) as pool:
        for f in [pool.submit(fn, it) for it in items]:
            f.result()


def _batch(ns: str, lines: list[str]) -> None:
    sh(["ip", "-n", ns, "-batch", "-"], input="\n".join(lines) + "\n")


class Lab:
    """A running lab. Build with Lab.up(spec); find a running one with Lab.load(prefix)."""

    def __init__(self, state: LabState, progress: Progress | None = None) -> None:
        self.state = state
        self.progress = progress or _quiet
        self._workers: dict[str, NetnsWorker] = {}
        self._registry_clients: dict[int, RegistryClient] = {}  # by server number
        self._http: dict[str, requests.Session] = {}  # per namespace, for the daemons' HTTP

    # -- lifecycle --

    @classmethod
    def up(cls, spec: LabSpec, *, progress: Progress | None = None, keep: bool = False) -> Lab:
        """Build a lab. On any failure (or Ctrl-C) everything made so far is removed.

        keep=False: the lab is also destroyed when this process exits (tests, demo);
        keep=True: it outlives the process (`python -m lab up`).
        """
        spec.check()
        prefix = check_prefix(spec.prefix or random_prefix())
        st = create_state(prefix, time.time())
        lab = cls(st, progress)
        if not keep:
            _live[prefix] = lab
            st.owner_pid = os.getpid()
            st.save()
        try:
            with signals_raise_interrupt():
                lab._build(spec)
        except BaseException:
            lab.close()
            destroy(prefix)
            raise
        return lab

    @classmethod
    def load(cls, prefix: str, progress: Progress | None = None) -> Lab:
        st = load_state(prefix)
        if st is None:
            raise StateError(f"no lab {prefix} (no state in {state_dir(prefix)})")
        return cls(st, progress)

    def close(self) -> None:
        """Let go of this process's sockets and threads in the lab (the lab keeps running)."""
        for w in self._workers.values():
            w.close()
        self._workers.clear()
        self._registry_clients.clear()
        self._http.clear()

    def down(self) -> list[str]:
        self.close()
        for c in self.state.clients:
            c.ping_pid = 0
        return destroy(self.state.prefix)

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    @property
    def prefix(self) -> str:
        return self.state.prefix

    def _say(self, msg: str) -> None:
        self.progress(msg)

    def _build(self, spec: LabSpec) -> None:
        st = self.state
        keys = Path(st.dir) / "keys"
        keys.mkdir(mode=0o700, exist_ok=True)
        n_gw, n_cl = len(spec.gateways), spec.clients
        self._say(f"lab {st.prefix}: building the internet, {n_gw} gateway(s), "
                  f"{n_cl} client(s)")
        self._make_internet()

        want_registry = spec.registry == "yes"
        # (host, address4, address6, router4, router6) for every leg into the internet
        legs: list[tuple[str, str, str, str, str]] = []
        if want_registry:
            for n in range(1, spec.registries + 1):
                legs.append((registry_host(n), *addressing.registry_underlay(n),
                             addressing.ROUTER4[0], addressing.ROUTER6[0]))

        for i, mode in enumerate(spec.gateways, 1):
            u4, u6 = addressing.gateway_underlay(i)
            t4, t6 = addressing.gateway_tunnel(i)
            g = Gateway(name=f"g{i}", ns=ns_name(st.prefix, f"g{i}"), ifname=f"{st.prefix}g{i}",
                        mode=mode, underlay4=u4, underlay6=u6, tunnel4=t4, tunnel6=t6,
                        listen_port=WG_PORT)
            legs.append((g.name, u4, u6, addressing.ROUTER4[0], addressing.ROUTER6[0]))
            priv, g.public_key = generate_keypair()
            g.private_key_file = str(write_secret(keys / f"{g.name}.key", priv))
            g.wg_log = str(Path(st.dir) / f"wg-{g.name}.log")
            st.gateways.append(g)

        names = [g.name for g in st.gateways]
        for i in range(1, n_cl + 1):
            u4, r4, u6, r6 = addressing.client_underlay(i)
            t4, t6 = addressing.client_tunnel(i)
            gw_name = (spec.client_gateways[i - 1] if spec.client_gateways
                       else names[(i - 1) % n_gw])
            st.gateway(gw_name)  # fails early on a bad name
            fam = {"4": 4, "6": 6}.get(spec.endpoint_family, 4 if i % 2 else 6)
            c = Client(name=f"c{i}", ns=ns_name(st.prefix, f"c{i}"), ifname=f"{st.prefix}c{i}",
                       gateway=gw_name, underlay4=u4, underlay6=u6, tunnel4=t4, tunnel6=t6,
                       endpoint_family=fam, rtt_ms=spec.client_rtt_ms(f"c{i}"))
            legs.append((c.name, u4, u6, r4, r6))
            priv, c.public_key = generate_keypair()
            c.private_key_file = str(write_secret(keys / f"{c.name}.key", priv))
            if spec.psk:
                c.psk_file = str(write_secret(keys / f"{c.name}.psk", generate_preshared_key()))
            c.wg_log = str(Path(st.dir) / f"wg-{c.name}.log")
            c.ping_log = str(Path(st.dir) / f"ping-{c.name}.log")
            st.clients.append(c)
        st.save()
        _parallel(lambda leg: self._make_host(*leg), legs)
        st.save()
        if any(c.rtt_ms is not None for c in st.clients):
            self._start_relay(spec)

        if spec.dataplane == "kernel":
            self._say(f"making {n_gw + n_cl} kernel WireGuard interface(s)")
            for h in [*st.gateways, *st.clients]:
                sh(["ip", "-n", h.ns, "link", "add", h.ifname, "type", "wireguard"])
        else:
            self._say(f"starting {n_gw + n_cl} wireguard-go interface(s)")
            self._start_wireguard_go([*st.gateways, *st.clients])
        _parallel(gateway.configure_interface, st.gateways)
        _parallel(lambda c: client.configure_interface(
            c, st.gateway(c.gateway), client.gateway_endpoint(c, st.gateway(c.gateway))),
            st.clients)
        st.save()

        if want_registry:
            self._start_registry(spec)
        else:
            note = "registry not started (--no-registry)"
            st.notes.append(note)
            self._say(note)

        for g in st.gateways:
            mine = [c for c in st.clients if c.gateway == g.name]
            if g.mode == "plain":
                for c in mine:
                    gateway.provision(g, c)
                self._say(f"{g.name} plain: {len(mine)} peer(s) pre-provisioned with `wg set`")
            elif not spec.daemon:
                self._say(f"{g.name} jit: daemon not requested; the interface starts empty")
            elif st.registry is None:
                raise LabError(f"{g.name} jit: the daemon needs the registry")
            else:
                backend = ["--backend", "netlink"] if spec.dataplane == "kernel" else []
                gateway.start_daemon(g, st.registries, st.dir, spec.idle_timeout,
                                     spec.evict_interval,
                                     [*backend, *spec.daemon_args.get(g.name, ())])
                st.save()
                secs = gateway.wait_daemon(g, spec.daemon_start_timeout)
                self._say(f"{g.name} jit: `wgjit gateway run` adopted {g.ifname} "
                          f"(healthy after {secs * 1000:.0f} ms)")
        st.ready = True
        st.save()
        self._say(f"lab {st.prefix} is up")

    def _make_internet(self) -> None:
        st = self.state
        ns = ns_name(st.prefix, "net")
        _new_netns(ns)
        st.namespaces.append(ns)
        st.save()
        lines = ["link set lo up", f"link add {BRIDGE} type bridge", f"link set {BRIDGE} up"]
        for a in addressing.ROUTER4:
            lines.append(f"address add {a}/24 dev {BRIDGE}")
        for a in addressing.ROUTER6:
            lines.append(f"address add {a}/64 dev {BRIDGE} nodad")
        _batch(ns, lines)
        sh(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.forwarding=1"])

    def _make_host(self, host: str, addr4: str, addr6: str, router4: str, router6: str) -> None:
        st = self.state
        ns, net = ns_name(st.prefix, host), ns_name(st.prefix, "net")
        _new_netns(ns)
        st.namespaces.append(ns)
        # Created directly in both namespaces: the names never exist in the host's own.
        sh(["ip", "link", "add", UNDERLAY_IF, "netns", ns, "type", "veth", "peer", "name", host,
            "netns", net])
        _batch(net, [f"link set {host} master {BRIDGE}", f"link set {host} up"])
        _batch(ns, [
            "link set lo up", f"link set {UNDERLAY_IF} up",
            f"address add {addr4}/24 dev {UNDERLAY_IF}",
            f"address add {addr6}/64 dev {UNDERLAY_IF} nodad",
            f"route add default via {router4}",
            f"route add default via {router6}",
        ])

    def _start_relay(self, spec: LabSpec) -> None:
        """The delaying relay in the internet namespace: one route per gateway and family."""
        st = self.state
        routes = []
        for i, g in enumerate(st.gateways, 1):
            for fam, gw_ip, source in ((4, g.underlay4, addressing.ROUTER4[0]),
                                       (6, g.underlay6, addressing.ROUTER6[0])):
                routes.append({"listen": list(addressing.relay_listen(i, fam)),
                               "gateway": [gw_ip, g.listen_port], "source": source})
        by_ip = {ip: c.rtt_ms for c in st.clients if c.rtt_ms is not None
                 for ip in (c.underlay4, c.underlay6)}
        cfg = Path(st.dir) / "relay.json"
        cfg.write_text(json.dumps({"routes": routes, "rtt_ms": spec.rtt or 0.0,
                                   "client_rtt_ms": by_ip}, indent=2))
        st.relay_log = str(Path(st.dir) / "relay.log")
        st.relay_pid = procs.spawn(ns_name(st.prefix, "net"),
                                   [sys.executable, str(Path(__file__).with_name("relay.py")),
                                    "--config", str(cfg)], st.relay_log)
        st.save()
        deadline = time.monotonic() + WG_START_TIMEOUT
        while '"listening"' not in Path(st.relay_log).read_text(errors="replace"):
            if not procs.alive(st.relay_pid):
                raise LabError(f"relay exited: {procs.tail(st.relay_log)}")
            if time.monotonic() > deadline:
                raise LabError(f"relay: not listening after {WG_START_TIMEOUT:g} s")
            time.sleep(0.01)
        rtts = sorted({c.rtt_ms for c in st.clients if c.rtt_ms is not None})
        self._say(f"relay in {ns_name(st.prefix, 'net')}: clients reach gateways with "
                  f"{'/'.join(f'{r:g}' for r in rtts)} ms round-trip time added")

    def relay_flows(self) -> dict[str, str]:
        """The relay's upstream address (as the gateways see it) -> client address."""
        out: dict[str, str] = {}
        if not self.state.relay_log:
            return out
        for line in Path(self.state.relay_log).read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                doc = json.loads(line)
                if isinstance(doc, dict) and "upstream" in doc:
                    out[doc["upstream"]] = doc["client"]
        return out

    def _start_wireguard_go(self, hosts: list[Gateway | Client]) -> None:
        for h in hosts:
            if uapi_socket(h.ifname).exists():
                raise LabError(f"{uapi_socket(h.ifname)} exists: interface name in use")
        for h in hosts:
            h.wg_pid = procs.spawn_wireguard_go(h.ns, h.ifname, h.wg_log)
        self.state.save()
        deadline = time.monotonic() + WG_START_TIMEOUT
        for h in hosts:
            while not uapi_socket(h.ifname).exists():
                if not procs.alive(h.wg_pid):
                    raise LabError(f"wireguard-go {h.ifname} exited: {procs.tail(h.wg_log)}")
                if time.monotonic() > deadline:
                    raise LabError(f"wireguard-go {h.ifname}: no UAPI socket after "
                                   f"{WG_START_TIMEOUT:g}s")
                time.sleep(0.01)

    def _start_registry(self, spec: LabSpec) -> None:
        st = self.state
        st.registries.append(start_registry(st.dir, ns_name(st.prefix, registry_host(1))))
        st.save()
        rc = self.registry()
        secs = rc.wait_healthy()
        self._say(f"registry serving at {st.registries[0].url} "
                  f"(healthy after {secs * 1000:.0f} ms)")
        # One at a time, after the first: it has created the schema they all serve.
        for n in range(2, spec.registries + 1):
            st.registries.append(another_server(st.registries[0], n,
                                                ns_name(st.prefix, registry_host(n)), st.dir))
            st.save()
            secs = self.registry(n).wait_healthy()
            self._say(f"registry server {n} serving the same database at "
                      f"{st.registries[-1].url} (healthy after {secs * 1000:.0f} ms)")
        rc.create_tenant(st.registry.tenant)
        for c in st.clients:
            psk = Path(c.psk_file).read_text().strip() if c.psk_file else None
            rc.add_peer(public_key=c.public_key, allowed_ips=[c.tunnel4, c.tunnel6],
                        name=c.name, preshared_key=psk)
            c.registered = True
        st.save()
        if st.clients:
            self._say(f"registered {len(st.clients)} client peer(s) in tenant "
                      f"{st.registry.tenant!r} through POST /v1/peers")

    # -- using a lab --

    def worker(self, host: str = "net") -> NetnsWorker:
        """A thread inside one of the lab's namespaces, for Python-side network calls."""
        ns = ns_name(self.prefix, host)
        if ns not in self._workers:
            self._workers[ns] = NetnsWorker(ns)
        return self._workers[ns]

    def _registry_server(self, n: int):
        if not 1 <= n <= len(self.state.registries):
            raise LabError(f"lab {self.prefix} has no registry server {n} "
                           f"({len(self.state.registries)} in all)")
        return self.state.registries[n - 1]

    def registry(self, n: int = 1) -> RegistryClient:
        """The registry API through server n, spoken from the internet namespace."""
        if n not in self._registry_clients:
            self._registry_clients[n] = RegistryClient(self.worker("net"),
                                                       self._registry_server(n))
        return self._registry_clients[n]

    def stop_registry(self, n: int = 1, sig: int = signal.SIGINT) -> None:
        """Take registry server n down (an outage); restart_registry(n) brings it back.

        SIGINT: gunicorn stops at once (SIGTERM waits for its workers); SIGKILL:
        the server dies, master and workers alike, as with a crashed host.
        """
        reg = self._registry_server(n)
        procs.stop([(pid, sig) for pid in procs.netns_pids(reg.ns)])
        if procs.netns_pids(reg.ns):
            raise LabError(f"registry processes still running in {reg.ns}")
        reg.pid = 0
        self.state.save()

    def pause_registry(self, n: int = 1, pause: bool = True) -> None:
        """Freeze registry server n (SIGSTOP): a hung server, whose kernel still
        accepts connections but which never answers; pause=False thaws it."""
        reg = self._registry_server(n)
        for pid in procs.netns_pids(reg.ns):
            os.kill(pid, signal.SIGSTOP if pause else signal.SIGCONT)

    def restart_registry(self, n: int = 1) -> float:
        """Serve the same database again on server n; seconds until /healthz answered."""
        reg = self._registry_server(n)
        serve(reg)
        self.state.save()
        return self.registry(n).wait_healthy()

    def stop_daemon(self, gateway_name: str, sig: int = signal.SIGTERM,
                    timeout: float = 15.0) -> None:
        """Signal a gateway's daemon (SIGKILL: a crash) and wait until it is gone.

        The interface and its peers stay: wireguard-go is a process of its own.
        """
        g = self.gateway(gateway_name)
        pid = g.daemon_pid
        if not (pid and procs.alive(pid) and procs.in_netns(pid, g.ns)):
            raise LabError(f"{gateway_name}: no daemon running")
        os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while procs.alive(pid):
            if time.monotonic() > deadline:
                raise LabError(f"{gateway_name}: daemon {pid} still running {timeout:g} s "
                               f"after signal {sig}")
            time.sleep(0.02)
        procs.stop([])  # drops the reaped child from procs' table
        g.daemon_pid = 0
        self.state.save()

    def start_daemon(self, gateway_name: str) -> float:
        """Start a stopped daemon again (same flags, state dir); seconds until healthy."""
        g = self.gateway(gateway_name)
        gateway.restart_daemon(g)
        self.state.save()
        return gateway.wait_daemon(g)

    def _session(self, host: str) -> tuple[NetnsWorker, requests.Session]:
        w = self.worker(host)
        if host not in self._http:
            self._http[host] = s = requests.Session()
            w.on_close(s.close)
        return w, self._http[host]

    def metrics(self, gateway_name: str) -> gateway.Metrics:
        """A scrape of the gateway daemon's /metrics."""
        w, s = self._session(gateway_name)
        return gateway.scrape(w, self.gateway(gateway_name), s)

    def health(self, gateway_name: str) -> tuple[int, dict]:
        """The gateway daemon's /healthz: (HTTP status, JSON body)."""
        w, s = self._session(gateway_name)
        return gateway.health(w, self.gateway(gateway_name), s)

    def status(self, gateway_name: str, *, as_json: bool = False) -> str:
        """The output of `wgjit gateway status` for the gateway's daemon."""
        return gateway.status(self.gateway(gateway_name), as_json=as_json)

    def events(self, gateway_name: str) -> list[dict]:
        """The gateway daemon's JSON events so far."""
        return gateway.events(self.gateway(gateway_name))

    def gateway(self, name: str) -> Gateway:
        return self.state.gateway(name)

    def client(self, name: str) -> Client:
        return self.state.client(name)

    def peers(self, gateway_name: str) -> list[gateway.PeerInfo]:
        g = self.gateway(gateway_name)
        return gateway.peers(g.ifname, g.ns)

    def provision(self, client_name: str, gateway_name: str | None = None) -> None:
        c = self.client(client_name)
        gateway.provision(self.gateway(gateway_name or c.gateway), c)

    def connect(self, name: str, *, fresh: bool = False, family: int = 4) -> Client:
        """Start the client pinging its gateway through the tunnel.

        fresh: drop the client's session first, so its next packet is a new
        handshake initiation (a client that restarted, or came back after its
        session expired).
        """
        c = self.client(name)
        g = self.gateway(c.gateway)
        client.stop_ping(c)
        if fresh:
            client.reset_session(c, g)
        client.start_ping(c, g, family)
        self.state.save()
        return c

    def move(self, name: str, gateway_name: str) -> Client:
        """Point a client at another gateway (a roaming user): a new peer, so a new session.

        Every gateway has its own key, so moving means replacing the client's peer,
        not only its endpoint. The client stays quiet until connect().
        """
        c = self.client(name)
        client.stop_ping(c)
        client.switch_gateway(c, self.gateway(c.gateway), self.gateway(gateway_name))
        self.state.save()
        return c

    def disconnect(self, name: str) -> Client:
        c = self.client(name)
        if c.ping_pid and procs.in_netns(c.ping_pid, c.ns):
            client.stop_ping(c)
        c.ping_pid = 0
        self.state.save()
        return c

    def connected(self, name: str) -> bool:
        c = self.client(name)
        return bool(c.ping_pid) and procs.alive(c.ping_pid) and procs.in_netns(c.ping_pid, c.ns)

    def ping(self, name: str, *, count: int = 1, wait: float = 2.0, family: int = 4) -> bool:
        c = self.client(name)
        return client.ping_once(c, self.gateway(c.gateway), count=count, wait=wait,
                                family=family)
