"""`python -m lab status`: what a lab is and how its parts are doing, at a glance.

Reads live facts (processes, `wg show`, registry /healthz) rather than trusting
the state file, which only says what was made. Prints no secrets: the `wg show`
dump's private and preshared keys are dropped where it is parsed.
"""

from __future__ import annotations

import time
from typing import Any

from lab import gateway, procs
from lab.netns import LabError
from lab.topology import Lab, lab_namespaces, lab_sockets


def _ago(ts: int, now: float) -> str:
    return "never" if not ts else f"{now - ts:.0f}s ago"


def collect(lab: Lab) -> dict[str, Any]:
    st = lab.state
    now = time.time()
    out: dict[str, Any] = {
        "prefix": st.prefix, "state_dir": st.dir, "ready": st.ready,
        "age_s": round(now - st.created, 1), "namespaces": lab_namespaces(st.prefix),
        "sockets": [p.name for p in lab_sockets(st.prefix)], "notes": st.notes,
        "owner_pid": st.owner_pid if st.owner_pid and procs.alive(st.owner_pid) else 0,
    }
    if st.registry:
        servers = []
        for n, r in enumerate(st.registries, 1):
            try:
                healthy = lab.registry(n).healthy()
            except LabError:
                healthy = False
            servers.append({"url": r.url, "ns": r.ns, "pid": r.pid,
                            "running": procs.alive(r.pid), "healthy": healthy})
        out["registry"] = servers[0]
        if len(servers) > 1:
            out["registry_servers"] = servers
    handshakes: dict[str, int] = {}
    out["gateways"] = []
    for g in st.gateways:
        try:
            peers = gateway.peers(g.ifname, g.ns)
        except LabError:
            peers = []
        for p in peers:
            handshakes[p.public_key] = p.latest_handshake
        out["gateways"].append({
            "name": g.name, "mode": g.mode, "ifname": g.ifname, "public_key": g.public_key,
            "endpoint": f"{g.underlay4}:{g.listen_port}",
            "endpoint6": f"[{g.underlay6}]:{g.listen_port}",
            "tunnel": [g.tunnel4, g.tunnel6], "wireguard_go": procs.alive(g.wg_pid),
            "peers": len(peers),
            "peers_with_handshake": sum(1 for p in peers if p.latest_handshake),
            "daemon_pid": g.daemon_pid,
            "daemon": procs.alive(g.daemon_pid) if g.daemon_pid else None,
            "daemon_log": g.daemon_log,
        })
    out["clients"] = []
    for c in st.clients:
        out["clients"].append({
            "name": c.name, "gateway": c.gateway, "ifname": c.ifname, "public_key": c.public_key,
            "underlay": c.underlay4 if c.endpoint_family == 4 else c.underlay6,
            "tunnel": [c.tunnel4, c.tunnel6], "registered": c.registered,
            "wireguard_go": procs.alive(c.wg_pid), "connected": lab.connected(c.name),
            "gateway_handshake": handshakes.get(c.public_key, 0),
            "installed_on_gateway": c.public_key in handshakes,
            "rtt_ms": c.rtt_ms,
        })
    return out


def render(s: dict[str, Any]) -> str:
    now = time.time()
    lines = [f"lab {s['prefix']}  {'up' if s['ready'] else 'NOT READY'} for {s['age_s']:.0f}s"
             f"  state {s['state_dir']}",
             f"  namespaces {len(s['namespaces'])}, WireGuard sockets {len(s['sockets'])}"
             + (f", removed when process {s['owner_pid']} exits" if s.get("owner_pid") else "")]
    if "registry" in s:
        for r in s.get("registry_servers", [s["registry"]]):
            health = "healthy" if r["healthy"] else ("running, not answering" if r["running"]
                                                      else "NOT RUNNING")
            lines.append(f"  registry {r['url']}  {health}  (ns {r['ns']}, pid {r['pid']})")
    else:
        lines.append("  registry: none")
    for g in s["gateways"]:
        daemon = ""
        if g["mode"] == "jit":
            daemon = ("  daemon: none" if g["daemon"] is None
                      else f"  daemon pid {g['daemon_pid']} "
                           f"{'running' if g['daemon'] else 'EXITED'}")
        wgs = "" if g["wireguard_go"] else "  wireguard-go NOT RUNNING"
        lines.append(f"  {g['name']}  {g['mode']:5}  {g['ifname']}  {g['endpoint']}  "
                     f"tunnel {' '.join(g['tunnel'])}  peers {g['peers']} "
                     f"({g['peers_with_handshake']} handshaken){daemon}{wgs}")
    for c in s["clients"]:
        conn = "connected" if c["connected"] else "quiet"
        inst = (f"on {c['gateway']}: handshake {_ago(c['gateway_handshake'], now)}"
                if c["installed_on_gateway"] else f"not installed on {c['gateway']}")
        reg = "registered" if c["registered"] else "not registered"
        rtt = f"  rtt {c['rtt_ms']:g} ms (relay)" if c.get("rtt_ms") is not None else ""
        lines.append(f"  {c['name']}  -> {c['gateway']}  {c['ifname']}  {c['underlay']}  "
                     f"tunnel {c['tunnel'][0]}  {reg}  {conn}  {inst}{rtt}")
    lines += [f"  note: {n}" for n in s["notes"]]
    return "\n".join(lines)
