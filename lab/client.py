"""Lab client hosts: ordinary WireGuard clients, configured with `wg` only.

Nothing of wgjit's own runs on a client: it is the unmodified user the gateway
must serve. "Connected" means a ping runs through the tunnel; "quiet" means none.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from lab import addressing, procs
from lab.netns import sh, wg
from lab.state import Client, Gateway

# Fast enough that a first reply is timed to ~0.2 s even if the first echo is lost.
PING_INTERVAL = 0.2


def gateway_endpoint(c: Client, g: Gateway) -> str:
    """The gateway's underlay address in the family this client uses to reach it,
    or the relay standing in for it when the lab emulates a round-trip time."""
    if c.rtt_ms is not None:
        ip, port = addressing.relay_listen(int(g.name[1:]), c.endpoint_family)
        return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
    if c.endpoint_family == 6:
        return f"[{g.underlay6}]:{g.listen_port}"
    return f"{g.underlay4}:{g.listen_port}"


def set_peer(c: Client, g: Gateway, endpoint: str) -> None:
    args = ["set", c.ifname, "peer", g.public_key, "endpoint", endpoint,
            "allowed-ips", f"{g.tunnel4_ip}/32,{g.tunnel6_ip}/128"]
    if c.psk_file:
        args += ["preshared-key", c.psk_file]
    wg(args, ns=c.ns)


def configure_interface(c: Client, g: Gateway, endpoint: str) -> None:
    wg(["set", c.ifname, "private-key", c.private_key_file], ns=c.ns)
    set_peer(c, g, endpoint)
    batch = "\n".join([
        f"address add {c.tunnel4} dev {c.ifname}",
        f"address add {c.tunnel6} dev {c.ifname} nodad",
        f"link set {c.ifname} up",
        f"route add {addressing.TUNNEL_NET4} dev {c.ifname}",
        f"route add {addressing.TUNNEL_NET6} dev {c.ifname}",
    ]) + "\n"
    sh(["ip", "-n", c.ns, "-batch", "-"], input=batch)


def current_endpoint(c: Client, g: Gateway) -> str:
    for line in wg(["show", c.ifname, "endpoints"], ns=c.ns).splitlines():
        key, _, ep = line.partition("\t")
        if key == g.public_key and ep and ep != "(none)":
            return ep
    return gateway_endpoint(c, g)


def reset_session(c: Client, g: Gateway) -> None:
    """Forget the session, as a client that restarts does: its next packet initiates."""
    endpoint = current_endpoint(c, g)
    wg(["set", c.ifname, "peer", g.public_key, "remove"], ns=c.ns)
    set_peer(c, g, endpoint)


def switch_gateway(c: Client, old: Gateway, new: Gateway) -> None:
    """Drop the peer for `old` and add `new` (its key, endpoint, tunnel address)."""
    wg(["set", c.ifname, "peer", old.public_key, "remove"], ns=c.ns)
    set_peer(c, new, gateway_endpoint(c, new))
    c.gateway = new.name


def start_ping(c: Client, g: Gateway, family: int = 4) -> None:
    """Ping the gateway's tunnel address until stopped; -D stamps each reply (unix time)."""
    target = g.tunnel6_ip if family == 6 else g.tunnel4_ip
    c.ping_log = str(Path(c.ping_log or f"/tmp/{c.ifname}-ping.log"))
    Path(c.ping_log).write_text("")
    c.ping_started = time.time()
    c.ping_pid = procs.spawn(c.ns, ["ping", "-D", "-n", "-i", str(PING_INTERVAL), target],
                             c.ping_log)


def stop_ping(c: Client) -> None:
    if c.ping_pid and procs.alive(c.ping_pid):
        procs.stop([(c.ping_pid, 15)], grace=2.0)
    c.ping_pid = 0


def ping_once(c: Client, g: Gateway, *, count: int = 1, wait: float = 2.0,
              family: int = 4) -> bool:
    """True if one echo came back through the tunnel within `wait` seconds."""
    target = g.tunnel6_ip if family == 6 else g.tunnel4_ip
    p = subprocess.run(["ip", "netns", "exec", c.ns, "ping", "-n", "-c", str(count),
                        "-w", f"{wait:g}", "-i", str(PING_INTERVAL), target],
                       capture_output=True, text=True, timeout=wait + 10)
    return p.returncode == 0
