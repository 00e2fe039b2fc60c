"""The gateway benchmarks run end to end on tiny inputs and clean up after themselves.

Not timed: the numbers are the benchmarks' business. What must hold is what
they report on: every client got through, the registry was asked once per
client (or, batched, fewer times than there were clients), the push pushed
every peer.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from bench import coldstart, connect, flood, herd
from lab.state import list_labs, load_state

pytestmark = [pytest.mark.lab, pytest.mark.slow]


def _labs_of_this_process() -> set[str]:
    # Only labs this process made: other labs may come and go on a shared machine.
    return {p for p in list_labs()
            if (st := load_state(p)) is not None and st.owner_pid == os.getpid()}


def run(main, argv: list[str], tmp_path: Path) -> dict:
    before = _labs_of_this_process()
    out = tmp_path / "out.json"
    assert main([*argv, "--json", str(out)]) == 0
    assert _labs_of_this_process() <= before, "the benchmark left its lab behind"
    return json.loads(out.read_text())


def test_connect(tmp_path: Path) -> None:
    doc = run(connect.main, ["--clients", "2", "--spacing", "0.2", "--rtt", "20"], tmp_path)
    [cell] = doc["results"]["rtts"].values()
    assert set(cell) == {"g1", "g2", "g3"}
    for g in cell.values():
        assert g["from_echo"]["ok"] == g["from_echo"]["n"] == 2
        assert g["client_initiations_mean"] == 1  # nobody needed a retry
    for g in ("g2", "g3"):
        assert cell[g]["daemon"]["registry_calls"] == 2
        assert cell[g]["daemon"]["installs"] == 2
    # Role inversion: the gateway initiates; re-injection: only the client does.
    assert cell["g2"]["gateway_initiations_mean"] >= 1
    assert cell["g3"]["gateway_initiations_mean"] == 0
    assert cell["g3"]["daemon"]["reinjections"].get("answered") == 2
    assert cell["g1"]["gateway_initiations_mean"] == 0
    assert set(doc["results"]["summary"]["20"]["p50_ms"]) == {
        "pre-provisioned", "role inversion", "re-injection"}


def test_herd_batches_lookups_and_every_case_installs_every_client(tmp_path: Path) -> None:
    doc = run(herd.main, ["--clients", "30", "--spread", "0.05", "--timeout", "20"], tmp_path)
    rounds = {r["case"]: r for r in doc["results"]["rounds"]}
    assert list(rounds) == list(herd.CASES)
    for r in rounds.values():
        assert r["installed"] == 30, r
        assert r["registry_keys"] <= 30 + r["retried"]
    # One GET per key before batching; batched, 30 keys in 50 ms share calls.
    assert rounds["cold-single"]["keys_per_call"] == 1
    assert rounds["cold"]["registry_calls"] < 30 and rounds["cold"]["keys_per_call"] > 1
    # The restart cases found the cache entries of the round before, aged.
    assert rounds["warm"]["aged_entries"] >= 30 and rounds["gap"]["aged_entries"] >= 30


def test_coldstart(tmp_path: Path) -> None:
    doc = run(coldstart.main, ["--peers", "20", "--repeat", "1"], tmp_path)
    [r] = doc["results"]["runs"]
    assert r["peers"] == 20
    assert r["pushed"] == 21  # the bulk peers and the client's own
    for mode in ("jit", "push"):
        assert not math.isnan(r[mode]["cold_start"])  # the client's first reply came
    # What each model left in wireguard-go: JIT only the client that spoke, push everything.
    assert r["jit"]["device_peers"] == 1
    assert r["push"]["device_peers"] == 21


def test_flood_defences_keep_the_flood_off_the_registry(tmp_path: Path) -> None:
    doc = run(flood.main, ["--clients", "2", "--rates", "500", "--floods",
                           "random, one source", "--spacing", "0.2"], tmp_path)
    rows = {(r["flood"], r["defences"]): r for r in doc["results"]}
    assert set(rows) == {(f, d) for f in ("none", "random, one source") for d in ("on", "off")}
    for r in rows.values():
        assert r["connects"]["ok"] == r["connects"]["n"] == 2
    on, off = rows[("random, one source", "on")], rows[("random, one source", "off")]
    assert on["sent"] > 0 and off["sent"] > 0
    assert on["registry_calls_by_flood"] == 0  # the known-key filter
    assert on["drops"].get("ratelimited", 0) > 0 and not off["drops"].get("ratelimited")
    assert on["verified"] < off["verified"]  # the per-source limit spared the DH work
