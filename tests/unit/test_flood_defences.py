"""The flood defences' decisions: per-source limits, the fair lookup queue, bounded
repair, the served-endpoint index, the load signal and the replay memory on disk.

Bytes and times in, decisions out, with an injected clock. The lab test
(tests/lab/test_gateway_flood.py) runs the same parts against real floods.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from appliance.gateway.admission import FairQueue, Work
from appliance.gateway.load import BUSY_ENTER, LAG_ENTER, WINDOW, LoadSignal
from appliance.gateway.repair import EndpointRepair
from appliance.gateway.replay import ReplayGuard, ReplayStore
from appliance.gateway.served import ServedEndpoints
from appliance.gateway.sourcelimit import SourceLimiter, source_key


class Clock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# --- per-source limits -------------------------------------------------------------

def test_source_key_is_the_ipv4_address_or_the_ipv6_slash_64() -> None:
    assert source_key("192.0.2.1") == bytes([192, 0, 2, 1])
    assert source_key("2001:db8:1:2::1") == source_key("2001:db8:1:2:ffff::9")
    assert source_key("2001:db8:1:2::1") != source_key("2001:db8:1:3::1")
    assert source_key("::ffff:192.0.2.1") == source_key("192.0.2.1")


def test_limiter_allows_a_burst_of_5_then_20_a_second_per_source() -> None:
    clock = Clock()
    lim = SourceLimiter(clock=clock)
    assert [lim.allow("192.0.2.1") for _ in range(7)] == [True] * 5 + [False] * 2
    assert lim.allow("192.0.2.2")  # another source has its own bucket
    assert lim.allow("2001:db8::1") and lim.allow("2001:db8::2")  # one /64...
    assert sum(lim.allow("2001:db8::3") for _ in range(5)) == 3  # ...5 in all
    clock.now += 0.051  # one token at 20/s (and a little: float time)
    assert lim.allow("192.0.2.1") and not lim.allow("192.0.2.1")
    # Over one second a flooding source gets its burst plus 20.
    clock.now += 10
    allowed = 0
    for _ in range(1000):
        clock.now += 0.001
        allowed += lim.allow("192.0.2.1")
    assert allowed == 5 + 20 - 1 or allowed == 5 + 20  # the last token may fall at 1.0 s


def test_limiter_memory_is_bounded_by_expiry_and_the_cap() -> None:
    clock = Clock()
    lim = SourceLimiter(max_sources=100, clock=clock)
    for i in range(250):
        lim.allow(f"198.51.100.{i}")
    assert len(lim) == 100 and lim.evicted == 150
    clock.now += 1.0  # idle for EXPIRE_AFTER: a full bucket, forgotten
    lim.allow("192.0.2.1")
    assert len(lim) == 1
    # A forgotten source starts with a full bucket, as it would have had anyway.
    assert sum(lim.allow("198.51.100.5") for _ in range(6)) == 5


# --- the fair lookup queue ------------------------------------------------------------

def work(key: str, source: str, known: bool = False, seen: float = 0.0) -> Work:
    return Work(key, f"{source}:1", source_key(source), known, seen)


def drain(q: FairQueue) -> list[str]:
    out = []
    while (w := q.get(timeout=0)) is not None:
        out.append(w.key)
        q.done(w.key)
    return out


def test_a_real_clients_lookup_is_served_among_the_first_despite_a_flooder() -> None:
    clock = Clock()
    q = FairQueue(per_source=4, clock=clock)
    refused = [q.put(work(f"flood{i}", "203.0.113.9")) for i in range(1000)]
    assert refused.count(None) == 1000  # each newer one displaces the oldest...
    assert len(q) == 4 and q.dropped["source_full"] == 996  # ...of that source only
    assert q.put(work("real", "198.51.100.2")) is None
    served = drain(q)
    assert served.index("real") <= 1
    assert served.count("real") == 1 and len(served) == 5
    assert [k for k in served if k != "real"] == ["flood996", "flood997", "flood998",
                                                  "flood999"]  # the newest kept


def test_sources_take_turns_and_a_full_lane_drops_the_longest_waiting() -> None:
    clock = Clock()
    q = FairQueue(unknown_capacity=4, per_source=4, clock=clock)
    for i in range(3):
        q.put(work(f"a{i}", "192.0.2.1"))
    q.put(work("b0", "192.0.2.2"))
    assert q.put(work("c0", "192.0.2.3")) is None  # full: a0 (head of the rotation) goes
    assert q.dropped["lane_full"] == 1
    # Losing a0 counted as a's turn: b is served first, then a and the newcomer.
    assert drain(q) == ["b0", "a1", "c0", "a2"]


def test_known_and_unknown_lanes_have_their_own_places_and_share_of_service() -> None:
    clock = Clock()
    q = FairQueue(known_capacity=8, unknown_capacity=2, per_source=8, clock=clock)
    for i in range(50):
        q.put(work(f"u{i}", f"198.51.100.{i}"))
    assert len(q) == 2  # the unknown lane is full...
    for i in range(8):
        assert q.put(work(f"k{i}", f"192.0.2.{i}", known=True)) is None  # ...the known not
    order = drain(q)
    assert order[:4] == ["k0", "k1", "k2", "u48"]  # 3 known per unknown
    assert sorted(order) == sorted([f"k{i}" for i in range(8)] + ["u48", "u49"])


def test_stale_work_is_dropped_and_a_retry_refreshes_the_queued_item() -> None:
    clock = Clock()
    q = FairQueue(max_age=5.0, clock=clock)
    q.put(work("old", "192.0.2.1"))
    q.put(work("retried", "192.0.2.2", seen=1.0))
    clock.now += 4.0
    again = Work("retried", "192.0.2.9:7", source_key("192.0.2.9"), False, 5.0)
    assert q.put(again) == "pending"
    clock.now += 2.0
    got = q.get(timeout=0)
    assert (got.key, got.endpoint, got.seen_at) == ("retried", "192.0.2.9:7", 5.0)
    assert q.dropped["stale"] == 1  # "old" waited 6 s
    # A key being looked up is not queued again until done().
    assert q.put(work("retried", "192.0.2.2")) == "pending"
    q.done("retried")
    assert q.put(work("retried", "192.0.2.2")) is None


def test_get_blocks_until_work_and_close_wakes_workers() -> None:
    q = FairQueue()
    got: list = []
    t = threading.Thread(target=lambda: got.append(q.get()))
    t.start()
    q.put(work("k", "192.0.2.1"))
    t.join(5)
    assert [w.key for w in got] == ["k"]
    t = threading.Thread(target=lambda: got.append(q.get()))
    t.start()
    q.close()
    t.join(5)
    assert got[-1] is None and not t.is_alive()


# --- bounded endpoint repair ----------------------------------------------------------

def test_replays_of_one_key_fold_into_one_repair_and_the_queue_is_bounded() -> None:
    writes: list[tuple[str, str]] = []
    gate = threading.Event()

    def set_endpoint(key: str, endpoint: str) -> None:
        gate.wait(5)
        writes.append((key, endpoint))

    repair = EndpointRepair(set_endpoint, delay=0.0, capacity=3)
    try:
        # 1,000 copies of one capture: the data plane accepts only the first.
        outcomes = [repair.request("victim", f"203.0.113.9:{p}", "192.0.2.5:4000", ts(7))
                    for p in range(1000)]
        assert outcomes == ["queued"] + ["repeat"] * 999
        # Distinct newer captures while one waits fold into it (or queue once more
        # if the worker already took the first).
        more = [repair.request("victim", "203.0.113.9:1", "192.0.2.5:4000", ts(8 + i))
                for i in range(100)]
        assert more.count("queued") <= 1 and more.count("folded") >= 99
        assert [repair.request(f"k{i}", "x:1", "y:2", ts(1))
                for i in range(4)].count("refused") >= 1  # capacity 3
        assert repair.request("victim", "x:1", "y:2", ts(5)) == "repeat"  # older capture
        gate.set()
        deadline = time.monotonic() + 5
        while len(repair) and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)
        victim = [w for w in writes if w[0] == "victim"]
        assert 1 <= len(victim) <= 2 and set(victim) == {("victim", "192.0.2.5:4000")}
        # Installed afresh: the new peer on the device has not seen that capture.
        repair.forget("victim")
        assert repair.request("victim", "x:1", "192.0.2.5:4000", ts(7)) == "queued"
    finally:
        repair.close()


# --- served endpoints, load, replay memory ----------------------------------------------

def test_served_endpoints_follow_the_latest_address_of_each_key() -> None:
    served = ServedEndpoints()
    served.note("A", "192.0.2.1:1")
    assert served.serving("192.0.2.1:1") == "A"
    served.note("A", "192.0.2.1:2")  # roamed
    assert served.serving("192.0.2.1:1") is None and served.serving("192.0.2.1:2") == "A"
    served.note("B", "192.0.2.1:2")  # the address now belongs to B
    assert served.serving("192.0.2.1:2") == "B"
    served.drop("A")
    assert served.serving("192.0.2.1:2") == "B"
    served.drop("B")
    assert served.serving("192.0.2.1:2") is None and len(served) == 0


def feed(load: LoadSignal, clock: Clock, *, rate: float, seconds: float, cost: float,
         reads: float = 100.0, fill: float = 0.0) -> None:
    """`rate` initiations a second needing verification for `seconds`, in `reads`
    reads a second, each verified in `cost` seconds unless the gateway is under load
    (then answered with a cookie, ~nothing)."""
    carry = 0.0
    for _ in range(round(seconds * reads)):
        clock.now += 1 / reads
        carry += rate / reads
        n, carry = int(carry), carry - int(carry)
        busy = 0.0
        if not load.under_load:
            for _ in range(n):
                load.verified(cost)
            busy = n * cost
        load.observe(n, fill, busy)


def test_load_is_the_capture_thread_no_longer_keeping_up_not_a_count_per_read() -> None:
    """1,000/s at 400 us each (a loaded machine) keeps the capture thread 40% busy: a
    130 ms pause that leaves 130 initiations for one read is not load; the same
    stream at 2,500/s is (the thread would verify all the time)."""
    clock = Clock()
    load = LoadSignal(clock=clock)
    feed(load, clock, rate=1000, seconds=2, cost=400e-6)
    clock.now += 0.13  # the thread was not scheduled: one read finds 130
    for _ in range(130):
        load.verified(400e-6)
    load.observe(130, 0.0, 130 * 400e-6)
    assert not load.under_load
    feed(load, clock, rate=1000, seconds=2, cost=400e-6)
    assert not load.under_load
    assert 0.3 < load.busy < 0.5 and 0.3 < load.demand < 0.5
    assert load.verify_cost == pytest.approx(400e-6, rel=0.01)  # measured
    feed(load, clock, rate=3000, seconds=1, cost=400e-6)
    assert load.under_load
    # ...and it holds while the flood would keep the thread busy, though cookies
    # leave it idle now; at 1,000/s again it lapses.
    feed(load, clock, rate=3000, seconds=3, cost=400e-6)
    assert load.under_load and load.busy < 0.1 and load.demand >= 0.95
    feed(load, clock, rate=1000, seconds=2, cost=400e-6)
    assert not load.under_load
    # The same 2,500/s where a verification takes 110 us (an idle core): not load.
    quick = LoadSignal(clock=clock)
    feed(quick, clock, rate=2500, seconds=3, cost=110e-6)
    assert not quick.under_load and quick.busy < 0.5
    assert quick.verify_cost == pytest.approx(110e-6, rel=0.05)  # the start value gave way


def test_load_signal_holds_for_a_second_after_a_busy_window_or_a_filling_queue() -> None:
    clock = Clock()
    load = LoadSignal(clock=clock)
    feed(load, clock, rate=3000, seconds=0.5, cost=400e-6)
    assert load.under_load
    clock.now += 1.01
    load.observe(0, 0.0)
    assert not load.under_load
    load.observe(1, 0.5)
    assert load.under_load
    assert LoadSignal("always").under_load and not LoadSignal("off", clock=clock).under_load
    with pytest.raises(ValueError):
        LoadSignal("sometimes")


def test_a_capture_falling_behind_is_load_though_the_thread_reads_as_not_busy() -> None:
    """The backlog in the capture's buffer grows while the handling share stays below
    BUSY_ENTER (time in recv and GIL waits are not handling): the frames' age says it.
    A pause the thread catches up on within the window is not load."""
    clock = Clock()
    load = LoadSignal(clock=clock)
    reads = 40  # per 0.25 s window
    for lag in (0.6, 0.05, 0.02):  # a 0.6 s pause, then caught up
        clock.now += WINDOW / reads
        load.observe(10, 0.0, 0.5 * WINDOW / reads, lag)
    for _ in range(reads):
        clock.now += WINDOW / reads
        load.observe(10, 0.0, 0.5 * WINDOW / reads, 0.02)
    assert not load.under_load and load.lag < LAG_ENTER
    lag = 0.2
    while not load.under_load:  # 0.85 busy, and the backlog grows 0.75 s a second
        clock.now += WINDOW / reads
        lag += 0.75 * WINDOW / reads
        load.observe(10, 0.0, 0.85 * WINDOW / reads, lag)
        assert lag < LAG_ENTER + 2 * WINDOW, "entered within a window of the lag passing it"
    assert load.busy < BUSY_ENTER and load.lag >= LAG_ENTER


def test_a_thread_busy_with_cookies_for_one_source_is_not_load() -> None:
    """A replay flood from one address: the thread answers the source over its limit
    with cookies (it would under load too), busy and behind, with almost nothing to
    verify. Cookies for everyone would spare nothing and cost each real client 5 s."""
    clock = Clock()
    load = LoadSignal(clock=clock)
    reads = 40
    for i in range(8 * reads):  # two seconds; 80/s within limits get verified
        clock.now += WINDOW / reads
        within = 1 if i % 2 == 0 else 0
        if within:
            load.verified(400e-6)
        load.observe(within, 0.0, 0.99 * WINDOW / reads, 0.6)
    assert load.busy > BUSY_ENTER and load.lag > LAG_ENTER and load.demand < 0.1
    assert not load.under_load


def ts(n: int) -> bytes:
    return n.to_bytes(12, "big")


def test_replay_memory_of_installed_keys_survives_a_flood_and_a_restart(tmp_path: Path) -> None:
    db = tmp_path / "gateway.db"
    store = ReplayStore(db)
    guard = ReplayGuard(capacity=10, store=store)
    real = b"R" * 32
    assert guard.accept(real, ts(5))
    guard.keep(real, ts(5))  # installed
    for i in range(1000):  # random keys churn the LRU only
        guard.accept(i.to_bytes(32, "big"), ts(1))
    assert not guard.accept(real, ts(5))  # the captured initiation stays refused
    assert guard.accept(real, ts(6))
    store.close()

    guard = ReplayGuard(capacity=10, store=ReplayStore(db))  # restarted
    assert guard.kept(real)
    assert not guard.accept(real, ts(6)) and not guard.accept(real, ts(5))
    assert guard.accept(real, ts(7))
    assert not guard.kept((999).to_bytes(32, "big"))  # never installed: not on disk
    guard.forget(real)
    guard.flush()
    assert not ReplayGuard(store=ReplayStore(db)).kept(real)


def test_replay_memory_is_written_behind_in_one_go(tmp_path: Path) -> None:
    db = tmp_path / "gateway.db"
    store = ReplayStore(db)
    guard = ReplayGuard(store=store)
    keys = [bytes([i]) * 32 for i in range(1, 6)]
    for key in keys:
        guard.keep(key, ts(3))
    assert guard.accept(keys[0], ts(4))  # a newer timestamp of a kept key: noted too
    assert ReplayStore(db).load() == {}  # noted, not yet written (the capture never waits)
    assert store.flush() == 5 and store.flush() == 0
    assert ReplayStore(db).load() == {**{k: ts(3) for k in keys}, keys[0]: ts(4)}
    guard.forget(keys[1])
    store.close()  # a stop writes what is noted
    assert set(ReplayStore(db).load()) == set(keys) - {keys[1]}


# --- the gate: which initiations get DH work, a cookie, or nothing ----------------------

def make_gate(mode: str = "auto", limited: bool = True, served=lambda ep: False):
    from appliance.gateway.cookie import CookieResponder
    from appliance.gateway.gate import InitiationGate
    from appliance.gateway.handshake import Responder
    from appliance.keys import generate_private_key

    clock = Clock()
    responder = Responder(generate_private_key())
    cookies = CookieResponder(responder.public_key, clock=clock)
    limiters = ((SourceLimiter(clock=clock), SourceLimiter(clock=clock)) if limited else None)
    gate = InitiationGate(responder, cookies, LoadSignal(mode, clock=clock), limiters, served)
    return gate, responder, cookies, clock


def initiation(responder_public: bytes) -> bytes:
    from appliance.keys import generate_private_key
    from tests.initiations import build_initiation
    return build_initiation(generate_private_key(), responder_public)


def test_gate_sheds_junk_and_served_endpoints_before_anything_else() -> None:
    gate, responder, _, _ = make_gate(served=lambda ep: ep == "192.0.2.9:5")
    good = initiation(responder.public_key)
    assert gate.judge(good[:100], "192.0.2.1", 1, "192.0.2.1:1") == ("drop", "short")
    # Flipped, not zeroed: mac1's last byte is 0 in one run out of 256.
    bad_mac1 = good[:-17] + bytes(b ^ 0xFF for b in good[-17:])
    assert gate.judge(bad_mac1, "192.0.2.1", 1, "192.0.2.1:1") == ("drop", "mac1")
    assert gate.judge(good, "192.0.2.9", 5, "192.0.2.9:5") == ("drop", "served_endpoint")
    assert gate.judge(good, "192.0.2.1", 1, "192.0.2.1:1") == ("verify", "")
    assert gate.backlog == 1


def test_gate_answers_a_source_over_its_limit_with_a_cookie_and_its_mac2_gets_through() -> None:
    """A forger sending from the victim's address uses up the unproven bucket; the
    victim, answered with a cookie, proves its address and is verified."""
    from appliance.gateway.cookie import consume_cookie_reply, with_mac2
    from appliance.gateway.handshake import OFFSET_MAC1, OFFSET_MAC2

    gate, responder, cookies, _ = make_gate()
    forged = initiation(responder.public_key)
    verdicts = [gate.judge(forged, "198.51.100.2", 9, "198.51.100.2:9") for _ in range(30)]
    assert verdicts == [("verify", "")] * 5 + [("cookie", "ratelimited")] * 25
    assert gate.backlog == 5  # shed ones are not verification work
    real = initiation(responder.public_key)
    assert gate.judge(real, "198.51.100.2", 4000, "198.51.100.2:4000") \
        == ("cookie", "ratelimited")
    tau = consume_cookie_reply(cookies.reply(real, "198.51.100.2", 4000), responder.public_key,
                               real[OFFSET_MAC1:OFFSET_MAC2])
    retry = with_mac2(initiation(responder.public_key), tau)
    assert gate.judge(retry, "198.51.100.2", 4000, "198.51.100.2:4000") == ("verify", "")
    # mac2 is bound to the address and port: from elsewhere it proves nothing.
    assert gate.judge(retry, "198.51.100.3", 4000, "198.51.100.3:4000") == ("verify", "")
    assert gate.judge(retry, "198.51.100.2", 4001, "198.51.100.2:4001")[0] == "cookie"


def stranger_read(gate, packet: bytes, n: int, first: int = 0) -> None:
    """One read of n initiations from n forged sources, each verified in 400 us
    unless the gateway is under load."""
    for i in range(first, first + n):
        ip = f"198.18.{i // 250 % 250}.{i % 250 + 1}"
        if gate.judge(packet, ip, 1, f"{ip}:1").action == "verify":
            gate.verified(400e-6)


def test_gate_under_load_verifies_only_mac2_and_stays_loaded_while_the_flood_lasts() -> None:
    from appliance.gateway.cookie import with_mac2

    gate, responder, cookies, clock = make_gate()
    packet = initiation(responder.public_key)
    # 2,500 a second from forged sources, each within its limit, 400 us each:
    # verification would take all the capture thread's time.
    for tick in range(6):
        clock.now += 0.1
        stranger_read(gate, packet, 250, first=tick * 250)
        gate.end_of_read(0.0, 250 * 400e-6)
    assert gate.load.under_load
    # 5,000 a second from 2,500 more sources for 2 s: cookies, and the state holds.
    for tick in range(20):
        clock.now += 0.1
        sources = [f"203.0.{(tick * 250 + i) // 250 % 250}.{i + 1}" for i in range(250)]
        assert {gate.judge(packet, ip, 2, f"{ip}:2") for ip in sources} == {("cookie", "mac2")}
        gate.end_of_read(0.0)
        assert gate.load.under_load
    signed = with_mac2(packet, cookies.cookie("198.51.100.2", 4000))
    assert gate.judge(signed, "198.51.100.2", 4000, "198.51.100.2:4000") == ("verify", "")
    for _ in range(16):  # a quiet window, a second and a bit later it ends
        clock.now += 0.1
        gate.end_of_read(0.0)
    assert not gate.load.under_load


def test_a_herd_of_known_keys_is_not_load_but_the_same_count_of_strangers_is() -> None:
    gate, responder, _, clock = make_gate()
    packet = initiation(responder.public_key)
    for tick in range(6):  # 2,000 a second, each fresh from a key the gateway expects
        clock.now += 0.1
        for i in range(200):
            ip = f"203.0.113.{i}"
            assert gate.judge(packet, ip, tick + 1, f"{ip}:{tick + 1}").action == "verify"
            gate.verified_known()  # called during the verification, as intake.admit does
            gate.verified(500e-6)
        gate.end_of_read(0.0, 200 * 500e-6)  # the thread did nothing else
    assert not gate.load.under_load and gate.load.busy < 0.05
    for tick in range(6):  # the same work for keys nobody registered: a flood
        clock.now += 0.1
        stranger_read(gate, packet, 250, first=tick * 250)
        gate.end_of_read(0.0, 250 * 400e-6)
    assert gate.load.under_load


def test_gate_without_defences_verifies_everything_and_sends_no_cookies() -> None:
    gate, responder, _, _ = make_gate(mode="off", limited=False)
    p = initiation(responder.public_key)
    assert {gate.judge(p, "192.0.2.1", 1, "192.0.2.1:1") for _ in range(100)} \
        == {("verify", "")}
    gate.end_of_read(1.0)
    assert not gate.load.under_load
    gate, responder, _, _ = make_gate(mode="off")  # limit on, cookies off: plain drops
    p = initiation(responder.public_key)
    assert [gate.judge(p, "192.0.2.1", 1, "192.0.2.1:1").action for _ in range(6)] \
        == ["verify"] * 5 + ["drop"]


def test_load_holds_while_a_flood_keeps_arriving_and_not_for_a_trickle() -> None:
    clock = Clock()
    load = LoadSignal(clock=clock)
    load.observe(0, 0.5)  # the unknown lane half full: under load
    for _ in range(10):  # 5 s of 5,000 initiations a second (cookies: none verified)
        feed(load, clock, rate=5000, seconds=0.5, cost=400e-6, reads=10)
        assert load.under_load
    # then 1,000 a second: verification would take 40% of the thread, below STAY_DEMAND
    feed(load, clock, rate=1000, seconds=2, cost=400e-6, reads=10)
    assert not load.under_load
    feed(load, clock, rate=1000, seconds=2, cost=400e-6, reads=10)  # nor does it start it
    assert not load.under_load
    load.observe(0, 0.5)  # the lane fills; while it drains it holds...
    for _ in range(30):
        clock.now += 0.1
        load.observe(0, 0.2)
        assert load.under_load
    clock.now += 1.01
    load.observe(0, 0.1)  # ...until below an eighth, and a second
    assert not load.under_load
