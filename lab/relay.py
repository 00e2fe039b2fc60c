"""A delaying UDP relay: round-trip time for the namespace lab, whose host kernel has
no netem qdisc ("Specified qdisc kind is unknown").

    python lab/relay.py --config relay.json     (the lab starts it in <prefix>-net)

Each route listens on one address and port of the internet namespace and stands
for one gateway. A client sends there instead of to the gateway; for each client
address the relay opens one upstream socket towards the gateway (so the gateway
sees the relay's address as the client's endpoint, as behind a NAT) and holds
every datagram for half the client's round-trip time in each direction, on
the event loop's timers: no thread per packet, order kept per flow.

Config (JSON): {"routes": [{"listen": [ip, port], "gateway": [ip, port],
"source": ip}], "rtt_ms": 100, "client_rtt_ms": {"198.51.100.2": 250}}.
Prints one JSON line when listening and one per new flow (client, upstream),
which benchmarks use to tell whose initiation the gateway sent.

Standard library only: it runs as a script, outside the `lab` package.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import socket
import sys
from typing import Any

MAX_DATAGRAM = 65535


def _family(ip: str) -> int:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def _key(addr: tuple) -> str:
    ip, port = addr[0], addr[1]
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


class Route:
    """One listening socket (a gateway's stand-in) and its flows, one per client address."""

    def __init__(self, loop: asyncio.AbstractEventLoop, cfg: dict[str, Any],
                 rtt_ms: float, client_rtt_ms: dict[str, float]) -> None:
        self.loop = loop
        self.gateway = tuple(cfg["gateway"])
        self.source = cfg["source"]
        self.rtt_ms, self.client_rtt_ms = rtt_ms, client_rtt_ms
        ip, port = cfg["listen"]
        self.sock = socket.socket(_family(ip), socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.sock.bind((ip, port))
        self.sock.setblocking(False)
        self.flows: dict[tuple, socket.socket] = {}
        loop.add_reader(self.sock.fileno(), self._from_client)

    def _delay(self, client_ip: str) -> float:
        return self.client_rtt_ms.get(client_ip, self.rtt_ms) / 2000.0

    def _from_client(self) -> None:
        while True:
            try:
                data, addr = self.sock.recvfrom(MAX_DATAGRAM)
            except BlockingIOError:
                return
            addr = addr[:2]
            up = self.flows.get(addr) or self._open(addr)
            self.loop.call_later(self._delay(addr[0]), _send, up, data)

    def _open(self, client: tuple) -> socket.socket:
        up = socket.socket(_family(self.source), socket.SOCK_DGRAM)
        up.bind((self.source, 0))
        up.connect(self.gateway)
        up.setblocking(False)
        self.flows[client] = up
        self.loop.add_reader(up.fileno(), self._from_gateway, up, client)
        print(json.dumps({"client": _key(client), "upstream": _key(up.getsockname()),
                          "gateway": _key(self.gateway),
                          "rtt_ms": self._delay(client[0]) * 2000}), flush=True)
        return up

    def _from_gateway(self, up: socket.socket, client: tuple) -> None:
        while True:
            try:
                data = up.recv(MAX_DATAGRAM)
            except BlockingIOError:
                return
            except OSError:  # e.g. ICMP port unreachable from a gateway not listening yet
                continue
            self.loop.call_later(self._delay(client[0]), self._to_client, data, client)

    def _to_client(self, data: bytes, client: tuple) -> None:
        _send_to(self.sock, data, client)


def _send(sock: socket.socket, data: bytes) -> None:
    with contextlib.suppress(OSError):  # lost, like on a real path
        sock.send(data)


def _send_to(sock: socket.socket, data: bytes, addr: tuple) -> None:
    with contextlib.suppress(OSError):
        sock.sendto(data, addr)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    args = ap.parse_args(argv)
    with open(args.config) as f:
        cfg = json.load(f)
    loop = asyncio.new_event_loop()
    routes = [Route(loop, r, float(cfg.get("rtt_ms", 0)), cfg.get("client_rtt_ms", {}))
              for r in cfg["routes"]]
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, loop.stop)
    print(json.dumps({"listening": [r["listen"] for r in cfg["routes"]],
                      "rtt_ms": cfg.get("rtt_ms", 0)}), flush=True)
    loop.run_forever()
    for r in routes:
        r.sock.close()
        for up in r.flows.values():
            up.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
