"""The lab's pure parts: the demo timeline's parsing and bookkeeping, the address plan.

The same timeline runs for real in tests/lab/test_lab.py::test_demo_runs_and_tells_the_story.
"""

from __future__ import annotations

import io
import ipaddress
import json

from lab import addressing
from lab.timeline import Event, EventFollower, PingFollower, Timeline, parse_line

KEY = "nrz8zFGtll7+XL92wJuUWHL2gPlu1wp6XD2a5iTKpQU="


def test_parse_line_takes_json_after_any_prefix() -> None:
    ev = parse_line('2024-01-01 INFO appliance.gateway {"ts": 12.5, "event": "peer_installed",'
                    f' "public_key": "{KEY}", "endpoint": "198.51.100.2:4000"}}', now=99.0)
    assert ev is not None
    assert (ev.ts, ev.event, ev.get("endpoint")) == (12.5, "peer_installed", "198.51.100.2:4000")


def test_parse_line_ignores_non_events_and_falls_back_to_read_time() -> None:
    assert parse_line("plain text", now=1.0) is None
    assert parse_line('{"no_event": 1}', now=1.0) is None
    assert parse_line('{"event": "x", "broken"', now=1.0) is None
    ev = parse_line('{"event": "initiation_seen", "endpoint": "[2001:db8:2::3]:5"}', now=7.0)
    assert ev is not None and ev.ts == 7.0
    iso = parse_line('{"event": "x", "ts": "1970-01-01T00:00:10.250Z"}', now=0.0)
    assert iso is not None and iso.ts == 10.25


def test_followers_return_only_complete_new_lines(tmp_path) -> None:
    log = tmp_path / "gw.log"
    log.write_text('{"event": "a", "ts": 1}\n{"event": "b", ')
    f = EventFollower(log, "g1")
    assert [e.event for e in f.events()] == ["a"]
    with open(log, "a") as out:
        out.write('"ts": 2}\n')
    [b] = f.events()
    assert (b.event, b.ts, b.source) == ("b", 2.0, "g1")
    assert f.events() == []

    ping = tmp_path / "ping.log"
    ping.write_text("PING 198.18.0.1 (198.18.0.1) 56(84) bytes of data.\n"
                    "[1700000000.250000] 64 bytes from 198.18.0.1: icmp_seq=3 ttl=64 time=0.4 ms\n")
    pf = PingFollower(ping)
    assert pf.replies() == [1700000000.25]
    ping.write_text("")  # a new ping run truncates its log
    assert pf.replies() == []
    ping.write_text("[1700000001.5] 64 bytes from fd00::1: icmp_seq=1 ttl=64 time=0.4 ms\n")
    assert pf.replies() == [1700000001.5]


def _ev(ts: float, event: str, **fields) -> Event:
    return Event(ts, event, {"event": event, **fields}, "g1")


def test_timeline_names_clients_and_measures_each_step_from_the_first_ping() -> None:
    out = io.StringIO()
    tl = Timeline(t0=100.0, out=out, names={KEY: "c1"}, hosts={"198.51.100.2": "c1"})
    tl.connect("c1", "g1 (jit)", ts=101.0)
    tl.feed(_ev(101.010, "initiation_seen", endpoint="198.51.100.2:4000"))
    tl.feed(_ev(101.012, "identity_recovered", endpoint="198.51.100.2:4000", public_key=KEY))
    tl.feed(_ev(101.015, "peer_pulled", public_key=KEY, source="registry", ms=2.4))
    tl.feed(_ev(101.016, "peer_installed", public_key=KEY, endpoint="198.51.100.2:4000"))
    tl.reply("c1", 101.020)
    tl.reply("c1", 101.220)  # later replies do not move the first
    tl.feed(_ev(107.0, "peer_evicted", public_key=KEY, reason="idle"))
    text = out.getvalue().splitlines()
    assert text[1] == "[+    1010 ms] c1    g1 caught a handshake initiation from 198.51.100.2:4000"
    assert text[3].endswith("c1    g1 pulled the peer from the registry in 2 ms")
    assert text[5] == "[+    1020 ms] c1    first reply through the tunnel, 20 ms after it started"
    assert text[6].endswith("c1    g1 evicted the peer (idle)")
    [a] = tl.attempts
    assert {k: round((v - a.started) * 1000) for k, v in a.marks.items()} == {
        "initiation_seen": 10, "identity_recovered": 12, "peer_pulled": 15,
        "peer_installed": 16, "first_reply": 20}
    row = tl.summary().splitlines()[2]
    assert row.split() == ["c1", "g1", "(jit)", "10", "ms", "12", "ms", "15", "ms", "16", "ms",
                           "20", "ms"]


def test_timeline_ignores_events_from_before_a_connect_and_unknown_keys() -> None:
    out = io.StringIO()
    tl = Timeline(t0=0.0, out=out, names={KEY: "c1"})
    tl.connect("c1", "g1", ts=10.0)
    tl.feed(_ev(9.0, "initiation_seen", endpoint="198.51.100.2:1"))  # stale: before the ping
    tl.feed(_ev(10.5, "peer_unknown", public_key="B" * 43 + "="))
    tl.feed(_ev(10.6, "something_new", endpoint="192.0.2.9:1"))
    assert tl.attempts[0].marks == {}
    lines = out.getvalue().splitlines()
    assert "BBBBBBBB…" in lines[2] and "not in the registry" in lines[2]
    assert lines[3].endswith("g1 something new endpoint=192.0.2.9:1")
    json.dumps([vars(a) for a in tl.attempts])  # plain data, printable as JSON


def test_address_plan_uses_documentation_and_benchmark_ranges_only() -> None:
    doc = [ipaddress.ip_network(n) for n in
           ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32")]
    tunnel = [ipaddress.ip_network("198.18.0.0/15"), ipaddress.ip_network("fd00::/8")]
    seen = set()
    hosts = [addressing.registry_underlay()]
    hosts += [addressing.gateway_underlay(n) for n in (1, addressing.MAX_GATEWAYS)]
    for n in (1, 253, 254, addressing.MAX_CLIENTS):
        a4, r4, a6, r6 = addressing.client_underlay(n)
        hosts.append((a4, a6))
        assert r4 in addressing.ROUTER4 and r6 in addressing.ROUTER6
    for pair in hosts:
        for a in pair:
            ip = ipaddress.ip_address(a)
            assert any(ip in net for net in doc if net.version == ip.version), a
            assert a not in seen and a not in addressing.ROUTER4 + addressing.ROUTER6
            seen.add(a)
    for n in (1, 2, addressing.MAX_CLIENTS):
        for cidr in (*addressing.client_tunnel(n), *addressing.gateway_tunnel(min(n, 99))):
            iface = ipaddress.ip_interface(cidr)
            assert any(iface.ip in net for net in tunnel if net.version == iface.version)
    # Clients' tunnel addresses never collide with a gateway's.
    gw = {ipaddress.ip_interface(addressing.gateway_tunnel(n)[0]).ip for n in range(1, 100)}
    cl = {ipaddress.ip_interface(addressing.client_tunnel(n)[0]).ip for n in range(1, 507)}
    assert not gw & cl and len(cl) == 506
