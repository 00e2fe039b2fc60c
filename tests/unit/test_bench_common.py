"""Pure helpers of the gateway benchmarks (bench/common.py)."""

from __future__ import annotations

import math
import struct

import pytest

from bench.common import (
    _TCPDUMP_LINE,
    _checksum,
    echo_request,
    labelled,
    metric_sum,
    percentile,
    summarise,
    table,
)


def test_percentile_is_nearest_rank_of_measured_values() -> None:
    values = [float(x) for x in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile([3.0], 99) == 3.0
    assert math.isnan(percentile([], 50))


def test_summarise_counts_failures_apart() -> None:
    s = summarise([0.01, math.nan, 0.03])
    assert (s["n"], s["ok"], s["p50"], s["max"]) == (3, 2, 0.01, 0.03)


def test_echo_request_is_a_valid_icmp_echo() -> None:
    packet = echo_request(0x1234, 7)
    kind, code, _, ident, seq = struct.unpack("!BBHHH", packet[:8])
    assert (kind, code, ident, seq) == (8, 0, 0x1234, 7)
    assert _checksum(packet) == 0  # a correct checksum sums to zero


def test_tcpdump_lines_parse() -> None:
    m = _TCPDUMP_LINE.match("1732540000.123456 IP 198.51.100.2.41000 > 192.0.2.11.51820: "
                            "UDP, length 148")
    assert m is not None
    assert m.groups() == ("1732540000.123456", "198.51.100.2", "41000", "192.0.2.11", "51820")
    assert _TCPDUMP_LINE.match("1732540000.1 IP6 2001:db8::2.1 > 2001:db8::3.51820: UDP") is None


def test_metric_helpers() -> None:
    metrics = {"wgjit_gateway_drops_total{reason=\"mac1\"}": 3.0,
               "wgjit_gateway_drops_total{reason=\"pending\"}": 0.0,
               "wgjit_gateway_drops_total_created{reason=\"mac1\"}": 1e9,
               "wgjit_gateway_installs_total": 5.0}
    assert labelled(metrics, "wgjit_gateway_drops_total") == {"mac1": 3.0}
    assert metric_sum(metrics, "wgjit_gateway_drops_total") == 3.0
    assert metric_sum(metrics, "wgjit_gateway_installs_total") == 5.0


@pytest.mark.parametrize("rows", [[["a", 1]], [["long name", 12345], ["b", 2]]])
def test_table_aligns_columns(rows: list[list[object]]) -> None:
    lines = table(["name", "value"], rows).splitlines()
    assert len(lines) == len(rows) + 2
    assert len({len(line) for line in lines}) == 1
