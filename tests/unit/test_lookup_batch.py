"""Lookups coalesced into registry calls (batch.py), with a fake fetch; the lab and
bench/herd.py run the real registry route behind it."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from appliance.gateway.admission import FairQueue, Work
from appliance.gateway.batch import LookupBatcher, RateLimited
from appliance.gateway.pull import RegistryUnavailable
from appliance.gateway.ratelimit import TokenBucket


class Fetch:
    """A registry that finds every key not starting with 'x', and fails any call that
    asks for a key starting with 'bad'; it can be held to let keys pile up."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.hold = threading.Event()
        self.hold.set()
        self.entered = threading.Event()
        self.lock = threading.Lock()

    def __call__(self, keys: list[str]) -> dict:
        with self.lock:
            self.calls.append(list(keys))
        self.entered.set()
        self.hold.wait(10)
        if any(k.startswith("bad") for k in keys):
            raise RegistryUnavailable("told to fail")
        return {k: f"peer:{k}" for k in keys if not k.startswith("x")}


def batcher(fetch: Fetch, **kw) -> LookupBatcher:
    kw.setdefault("bucket", TokenBucket(1e6, 10**6))
    return LookupBatcher(fetch, kw.pop("bucket"), **kw)


def test_a_batch_never_exceeds_n_and_every_waiter_gets_its_own_answer():
    fetch = Fetch()
    b = batcher(fetch, max_batch=16, linger=0.002, in_flight=3)
    keys = [f"k{i}" if i % 7 else f"x{i}" for i in range(2000)]

    def ask(chunk: list[str]) -> list:
        return [f.result(10) for f in b.submit(chunk)]

    with ThreadPoolExecutor(8) as pool:
        chunks = [keys[i:i + 25] for i in range(0, len(keys), 25)]
        answers = [a for got in pool.map(ask, chunks) for a in got]
    b.close()
    assert answers == [None if k.startswith("x") else f"peer:{k}" for k in keys]
    assert max(len(c) for c in fetch.calls) <= 16
    assert sorted(k for c in fetch.calls for k in c) == sorted(keys)
    assert b.calls == len(fetch.calls) and b.keys == len(keys)
    # They did share calls: far fewer than one per key.
    assert len(fetch.calls) < len(keys) / 4


def test_keys_waiting_while_the_calls_are_busy_go_together():
    fetch = Fetch()
    fetch.hold.clear()
    b = batcher(fetch, max_batch=64, linger=0, in_flight=1)
    first = b.submit(["k0"])
    assert fetch.entered.wait(5)
    later = b.submit([f"k{i}" for i in range(1, 41)])
    fetch.hold.set()
    assert [f.result(5) for f in first + later] == [f"peer:k{i}" for i in range(41)]
    b.close()
    assert fetch.calls == [["k0"], [f"k{i}" for i in range(1, 41)]]


def test_an_error_in_a_batch_fails_only_its_waiters():
    fetch = Fetch()
    fetch.hold.clear()
    b = batcher(fetch, max_batch=4, linger=0, in_flight=1)
    first = b.submit(["k0"])
    assert fetch.entered.wait(5)
    doomed = b.submit(["k1", "bad2", "k3", "x4"])  # one batch of 4 ...
    fine = b.submit(["k5", "x6", "k7"])  # ... and the next
    fetch.hold.set()
    assert first[0].result(5) == "peer:k0"
    for f in doomed:
        with pytest.raises(RegistryUnavailable):
            f.result(5)
    assert [f.result(5) for f in fine] == ["peer:k5", None, "peer:k7"]
    b.close()
    assert fetch.calls[1:] == [["k1", "bad2", "k3", "x4"], ["k5", "x6", "k7"]]


def test_one_token_buys_a_whole_batch_and_no_token_fails_that_batch():
    fetch = Fetch()
    fetch.hold.clear()
    # One token, practically no refill.
    b = batcher(fetch, bucket=TokenBucket(1e-6, 1), max_batch=100, linger=0, in_flight=1,
                token_wait=0.0)
    first = b.submit(["k0"])  # takes the token
    assert fetch.entered.wait(5)
    refused = b.submit([f"k{i}" for i in range(1, 51)])
    fetch.hold.set()
    assert first[0].result(5) == "peer:k0"
    for f in refused:
        with pytest.raises(RateLimited):
            f.result(5)
    b.close()
    assert fetch.calls == [["k0"]]


def test_closing_fails_what_still_waits():
    fetch = Fetch()
    fetch.hold.clear()
    b = batcher(fetch, max_batch=2, linger=0, in_flight=1)
    running = b.submit(["k0"])
    assert fetch.entered.wait(5)
    waiting = b.submit(["k1", "k2", "k3"])
    threading.Timer(0.05, fetch.hold.set).start()
    b.close()
    assert running[0].result(5) == "peer:k0"
    assert all(f.done() for f in waiting)
    # Answered (a call may have started before the close), or failed as by an
    # unreachable registry: the cache then serves what it has.
    assert all(f.exception(0) is None or isinstance(f.exception(0), RegistryUnavailable)
               for f in waiting)
    with pytest.raises(RegistryUnavailable):
        b.submit(["k9"])[0].result(1)
    b.close()  # again: nothing left to do


def test_closing_does_not_wait_for_tokens_that_would_serve_the_queue_for_minutes():
    # A stop after a herd with one key per call: thousands of keys behind a token
    # bucket of 50 a second. They are failed at once, not one token_wait each (the
    # daemon closes the batcher before it waits for its workers, daemon.stop).
    b = batcher(Fetch(), bucket=TokenBucket(50, 1), max_batch=1, linger=0, in_flight=8,
                token_wait=1.0)
    waiting = b.submit([f"k{i}" for i in range(2000)])
    started = time.monotonic()
    b.close()
    assert all(f.done() for f in waiting)
    assert time.monotonic() - started < 10  # ~1 s: the token wait under way ends first
    failed = sum(1 for f in waiting if isinstance(f.exception(0), RegistryUnavailable))
    assert failed > 1900


def test_a_worker_takes_the_ready_items_in_turn_order():
    q = FairQueue()
    for i in range(10):
        assert q.put(Work(f"k{i}", "192.0.2.1:1", bytes([i % 3]), True, 0.0)) is None
    taken = q.get_many(4)
    assert len(taken) == 4 and len({w.source for w in taken[:3]}) == 3  # sources take turns
    rest = q.get_many(100, timeout=0)
    assert len(rest) == 6 and len(q) == 0
    # Taken items are busy: their keys are not queued again until done.
    assert q.put(Work("k0", "192.0.2.1:2", b"\0", True, 0.0)) == "pending"
    q.done("k0")
    assert q.put(Work("k0", "192.0.2.1:2", b"\0", True, 0.0)) is None
    q.close()
    assert q.get_many(4) == []


def test_a_lone_lookup_does_not_linger_but_one_behind_a_running_call_does():
    fetch = Fetch()
    b = batcher(fetch, max_batch=64, linger=30.0, in_flight=2)
    assert b.submit(["k0"])[0].result(5) == "peer:k0"  # not 30 s: nothing else was running
    fetch.hold.clear()
    fetch.entered.clear()
    running = b.submit(["k1"])
    assert fetch.entered.wait(5)
    behind = b.submit(["k2"])  # a call is under way: k2 waits for company (or a full batch)
    b.submit([f"k{i}" for i in range(3, 66)])  # ... which comes: 64 keys wait
    fetch.hold.set()
    assert running[0].result(5) == "peer:k1" and behind[0].result(5) == "peer:k2"
    b.close()
    assert fetch.calls[2] == [f"k{i}" for i in range(2, 66)]
