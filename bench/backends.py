"""WireGuard device backends: add, list and remove many peers; rate and total time.

    .venv/bin/python bench/backends.py [--peers 10000] [--backend all|uapi|netlink|codec]
                                       [--json PATH]

uapi     real wireguard-go in a throwaway namespace on this machine.
netlink  the kernel module inside a quick VM (lab/vm/quick.py): qemu TCG, so every figure
         is EMULATED (Python runs ~10x slower than on the host, and the kernel's
         per-peer RCU waits on removal are far slower); compare rows within it,
         not with the uapi rows. Also compares pyroute2's stock WireGuard.set()
         (one peer per request) and info() decoding with this backend's own.
codec    host CPU: the netlink peer codec, ours vs pyroute2's, without a kernel.

Rows per backend: add one set_peer() per peer (the capture path), list (one dump),
remove in batches (eviction), add in batches, remove one remove_peer() per peer.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from appliance.keys import encode_key, generate_keypair  # noqa: E402
from appliance.wg import PeerConfig, WgDevice, create_device, stop_wireguard_go  # noqa: E402
from bench.common import RunInfo, write_json  # noqa: E402
from lab.netns import create_netns, delete_netns  # noqa: E402


@dataclass
class Row:
    backend: str
    operation: str
    count: int
    seconds: float
    emulated: bool = False

    @property
    def rate(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else float("inf")


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def make_peers(n: int) -> list[PeerConfig]:
    base = int.from_bytes(bytes([198, 18, 0, 0]), "big")
    out = []
    for i in range(n):
        a = base + i
        ip = ".".join(str((a >> s) & 255) for s in (24, 16, 8, 0))
        out.append(PeerConfig(encode_key(secrets.token_bytes(32)), allowed_ips=[f"{ip}/32"],
                              endpoint=f"203.0.113.{1 + i % 250}:{1024 + i % 60000}",
                              persistent_keepalive=0))
    return out


def device_rows(dev: WgDevice, n: int, single_removes: int, emulated: bool) -> list[Row]:
    b = dev.backend
    rows = []
    peers = make_peers(n)
    rows.append(Row(b, "add, one set_peer each", n,
                    timed(lambda: [dev.set_peer(p) for p in peers]), emulated))
    listed: list = []
    rows.append(Row(b, f"list {n} peers (one dump)", n,
                    timed(lambda: listed.extend(dev.peers())), emulated))
    assert len(listed) == n, (len(listed), n)
    rows.append(Row(b, "remove, batched remove_peers", n,
                    timed(lambda: dev.remove_peers(p.public_key for p in peers)), emulated))
    assert dev.peers() == []
    rows.append(Row(b, "add, batched set_peers", n,
                    timed(lambda: dev.set_peers(peers)), emulated))
    m = min(single_removes, n)
    rows.append(Row(b, "remove, one remove_peer each", m,
                    timed(lambda: [dev.remove_peer(p.public_key) for p in peers[:m]]), emulated))
    dev.remove_peers(p.public_key for p in peers[m:])
    assert dev.peers() == []
    return rows


def bench_uapi(n: int) -> list[Row]:
    from appliance.wg.uapi import UapiDevice

    prefix = f"bk{secrets.token_hex(2)}"
    ns = create_netns(f"{prefix}-bench")
    dev = None
    try:
        dev = create_device(f"{prefix}u", private_key=generate_keypair()[0], listen_port=51820,
                            addresses=["198.18.0.1/15"], backend="uapi", netns=ns.name,
                            output=subprocess.DEVNULL)
        rows = device_rows(dev, n, n, emulated=False)
        # How many peers per set=1 transaction pay off (see uapi.PEERS_PER_TRANSACTION).
        peers = make_peers(n)
        for per in (10, 100, 1000, 10_000):
            d = UapiDevice(dev.ifname, peers_per_transaction=per)
            rows.append(Row("uapi", f"add, batched, {per}/transaction", n,
                            timed(lambda d=d: d.set_peers(peers))))
            rows.append(Row("uapi", f"remove, batched, {per}/transaction", n,
                            timed(lambda d=d: d.remove_peers(p.public_key for p in peers))))
        return rows
    finally:
        if dev is not None and dev.process is not None:
            stop_wireguard_go(dev.process, dev.ifname)
        delete_netns(ns.name)


def bench_netlink_inner(n: int, single_removes: int) -> list[Row]:
    """Runs inside the VM."""
    from pyroute2 import WireGuard
    from pyroute2.netlink import NETLINK_GENERIC

    from appliance.wg import netlink_dump
    from appliance.wg.nsenter import netlink_socket_fd

    prefix = f"bk{secrets.token_hex(2)}"
    ns = create_netns(f"{prefix}-bench")
    try:
        dev = create_device(f"{prefix}k", private_key=generate_keypair()[0], listen_port=51820,
                            addresses=["198.18.0.1/15"], backend="netlink", netns=ns.name)
        rows = device_rows(dev, n, single_removes, emulated=True)
        # Stock pyroute2 for comparison: set() sends one peer per request. Both
        # sides add the same number of peers to an empty device, back to back.
        m = min(n, 500)
        peers = make_peers(m)
        stock = WireGuard(fileno=netlink_socket_fd(ns.name, NETLINK_GENERIC))
        try:
            rows.append(Row("netlink", f"add {m}, one set_peer each", m,
                            timed(lambda: [dev.set_peer(p) for p in peers]), True))
            dev.remove_peers(p.public_key for p in peers)

            def stock_add() -> None:
                for p in peers:
                    stock.set(dev.ifname, peer={
                        "public_key": p.public_key, "persistent_keepalive": 0,
                        "endpoint_addr": str(p.endpoint.host), "endpoint_port": p.endpoint.port,
                        "allowed_ips": [str(a) for a in p.allowed_ips]})
            rows.append(Row("netlink", f"add {m}, pyroute2 WireGuard.set() each", m,
                            timed(stock_add), True))
            dev.remove_peers(p.public_key for p in peers)
            # Dump decoding on the same kernel messages: pyroute2's decoder vs ours.
            dev.set_peers(make_peers(n))
            raw = dev.dump_messages()

            def stock_decode() -> None:
                from pyroute2.netlink.generic.wireguard import wgmsg
                count = 0
                for r in raw:
                    msg = wgmsg(r)
                    msg.decode()
                    for peer in msg.get_attr("WGDEVICE_A_PEERS") or ():
                        peer.get_attr("WGPEER_A_ALLOWEDIPS")
                        peer.get_attr("WGPEER_A_ENDPOINT")
                        count += 1
                assert count >= n
            rows.append(Row("netlink", f"decode {n}-peer dump, pyroute2", n,
                            timed(stock_decode), True))
            rows.append(Row("netlink", f"decode {n}-peer dump, ours", n,
                            timed(lambda: netlink_dump.merge_dump(raw, dev.ifname)), True))
        finally:
            stock.close()
        return rows
    finally:
        delete_netns(ns.name)


def bench_netlink(n: int, single_removes: int) -> list[Row]:
    from lab.vm import VM

    with VM(memory_mb=1024) as vm:
        out = vm.shared_dir / "rows.json"
        result = vm.run([".venv/bin/python", "bench/backends.py", "--inner", "netlink",
                         "--peers", str(n), "--single-removes", str(single_removes),
                         "--json", str(out)], cwd=ROOT, timeout=3600, echo=True)
        if result.returncode != 0:
            raise SystemExit(f"netlink bench in the VM failed:\n{result.output}")
        fields = set(Row.__dataclass_fields__)
        return [Row(**{k: v for k, v in r.items() if k in fields})
                for r in json.loads(out.read_text())["rows"]]


def bench_codec(n: int) -> list[Row]:
    """Host CPU only: encoding n peer updates and decoding an n-peer dump."""
    from pyroute2.netlink.generic.wireguard import wgmsg

    from appliance.wg.netlink import peer_batches
    from appliance.wg.netlink_dump import merge_dump
    from tests.unit.test_wg_netlink_dump import kernel_dump
    from tests.unit.test_wg_netlink_dump import make_peers as dump_peers

    peers = make_peers(n)

    def ours_encode() -> None:
        for batch in peer_batches(peers):
            b"".join(batch)

    def stock_encode() -> None:
        for p in peers:
            msg = wgmsg()
            msg["cmd"] = 1
            msg["version"] = 1
            msg["attrs"] = [["WGDEVICE_A_IFNAME", "wg0"], ["WGDEVICE_A_PEERS", [{"attrs": [
                ["WGPEER_A_PUBLIC_KEY", p.public_key], ["WGPEER_A_FLAGS", 2],
                ["WGPEER_A_ENDPOINT", {"addr": str(p.endpoint.host), "port": p.endpoint.port}],
                ["WGPEER_A_ALLOWEDIPS", [{"attrs": [
                    ["WGALLOWEDIP_A_FAMILY", 2],
                    ["WGALLOWEDIP_A_IPADDR", p.allowed_ips[0].network_address.packed],
                    ["WGALLOWEDIP_A_CIDR_MASK", 32]]}]]]}]]]
            msg.encode()

    raw = kernel_dump(dump_peers(n, 1), budget=32768)

    def stock_decode() -> None:
        for r in raw:
            msg = wgmsg(r)
            msg.decode()
            for peer in msg.get_attr("WGDEVICE_A_PEERS") or ():
                peer.get_attr("WGPEER_A_ALLOWEDIPS")
                peer.get_attr("WGPEER_A_ENDPOINT")

    return [
        Row("codec", "encode peer updates, ours", n, timed(ours_encode)),
        Row("codec", "encode peer updates, pyroute2", n, timed(stock_encode)),
        Row("codec", "decode dump, ours (merged Peers)", n,
            timed(lambda: merge_dump(raw, "wg0"))),
        Row("codec", "decode dump, pyroute2 (attrs only)", n, timed(stock_decode)),
    ]


def table(rows: list[Row]) -> str:
    lines = [f"{'backend':<9} {'operation':<40} {'count':>7} {'total s':>9} {'per s':>10}"]
    for r in rows:
        tag = "netlink*" if r.emulated else r.backend
        lines.append(f"{tag:<9} {r.operation:<40} {r.count:>7} {r.seconds:>9.3f} "
                     f"{r.rate:>10,.0f}")
    if any(r.emulated for r in rows):
        lines.append("* emulated: kernel WireGuard in a qemu TCG VM; compare only within it")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peers", type=int, default=10_000)
    ap.add_argument("--single-removes", type=int, default=None,
                    help="peers removed one by one (default: all for uapi, 1000 for netlink, "
                         "whose kernel removals are slow under emulation)")
    ap.add_argument("--backend", choices=["all", "uapi", "netlink", "codec"], default="all")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--inner", choices=["netlink"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        ap.error("needs root (namespaces, wireguard-go, qemu)")

    info = RunInfo()
    if args.inner == "netlink":
        rows = bench_netlink_inner(args.peers, args.single_removes or 1000)
    else:
        rows = []
        if args.backend in ("all", "uapi"):
            rows += bench_uapi(args.peers)
        if args.backend in ("all", "codec"):
            rows += bench_codec(args.peers)
        if args.backend in ("all", "netlink"):
            rows += bench_netlink(args.peers, args.single_removes or 1000)
    if args.inner is None:
        print(table(rows))
    results = {"host": platform.node(), "kernel": platform.release(),
               "python": platform.python_version(),
               "rows": [dict(asdict(r), rate_per_s=r.rate) for r in rows]}
    if args.inner is not None:  # the VM's half: bench_netlink reads its rows
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    else:
        info.finish()
        write_json(args.json, "backends", info, {k: v for k, v in vars(args).items()
                                                  if k not in ("json", "inner")}, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
