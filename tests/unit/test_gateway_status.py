"""`wgjit gateway status`: the drops window, the table, and the command against
a real metrics endpoint (the daemon's own HTTP server, serving a document)."""

from __future__ import annotations

import json
import socket
import threading

import pytest

from appliance.cli import main
from appliance.gateway.metrics import GatewayMetrics, http_server
from appliance.gateway.status import RecentCounts, counter_by_label, render

DOC = {
    "status": "ok", "interface": "wgjit0", "backend": "uapi", "listen_port": 51820,
    "install_mode": "reinject", "uptime_seconds": 3723.4,
    "peers": {"installed": 12, "awaiting_handshake": 2, "max": 0},
    "cache": {"found": 40, "not_found": 3},
    "registry_servers": [
        {"url": "https://198.51.100.10:8443", "up": True, "failures": 0, "last_error": None},
        {"url": "https://198.51.100.11:8443", "up": False, "failures": 3,
         "last_error": "connection refused"}],
    "feed": {"cursor": 981, "healthy": True, "caught_up_seconds_ago": 1.2},
    "known_keys": 1043, "under_load": False,
    "last_evict_pass": {"seconds_ago": 14.0, "seconds": 0.0123, "peers": 14, "evicted": 2},
    "drops_last_minute": {"replay": 3, "unknown_key": 17},
}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_recent_counts_forget_what_is_older_than_the_window() -> None:
    metrics, clock = GatewayMetrics(), Clock()
    window = RecentCounts(counter_by_label(metrics.drops), window=60, clock=clock)
    metrics.drops.labels("replay").inc(5)
    assert window.last_window() == {"replay": 5}
    for _ in range(7):  # 70 s of samples, one every 10 s
        clock.now += 10
        window.sample()
    metrics.drops.labels("unknown_key").inc(2)
    # The 5 replays are more than a minute old now; the new drops show at once.
    assert window.last_window() == {"unknown_key": 2}
    clock.now += 10
    metrics.drops.labels("replay").inc()
    window.sample()
    assert window.last_window() == {"replay": 1, "unknown_key": 2}


def test_render_shows_what_an_operator_asks_first() -> None:
    text = render(DOC)
    assert "12 installed, 2 awaiting a handshake" in text
    assert "wgjit0 (uapi, port 51820, install mode reinject)" in text
    assert "https://198.51.100.11:8443  DOWN (connection refused)" in text
    assert "cursor 981, following, last caught up 1 s ago" in text
    assert "replay 3, unknown_key 17" in text
    assert "14 s ago: 2 of 14 peers in 12 ms" in text
    # Values start in one column, whatever the name's length.
    width = len("drops (1 min)")
    assert all(line[width:width + 2] == "  " and line[width + 2] != " "
               for line in text.splitlines())


def test_render_says_when_the_data_plane_issues_the_cookies() -> None:
    assert "ours are withheld" not in render(DOC)
    text = render({**DOC, "under_load": True, "dataplane_issuing_cookies": True})
    assert "yes (cookie replies)" in text
    assert "the data plane is sending cookie replies: ours are withheld" in text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def endpoint():
    port = _free_port()
    doc = dict(DOC)
    server = http_server(f"127.0.0.1:{port}", GatewayMetrics(), lambda: (True, {}), lambda: doc)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{port}", doc
    server.shutdown()
    server.server_close()


def test_status_command_reads_the_daemon(endpoint, capsys) -> None:
    listen, _ = endpoint
    assert main(["gateway", "status", "--metrics-listen", listen, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == DOC
    assert main(["gateway", "status", "--metrics-listen", listen]) == 0
    assert "12 installed" in capsys.readouterr().out


def test_status_command_finds_the_address_in_the_config_file(endpoint, tmp_path,
                                                              capsys) -> None:
    listen, doc = endpoint
    conf = tmp_path / "gateway.toml"
    conf.write_text(f'[gateway]\ninterface = "wgjit0"\nmetrics_listen = "{listen}"\n')
    doc["status"] = "failing"
    assert main(["gateway", "status", "--config", str(conf)]) == 1
    assert capsys.readouterr().out.startswith("status")


def test_status_command_says_when_no_gateway_answers(capsys) -> None:
    listen = f"127.0.0.1:{_free_port()}"
    assert main(["gateway", "status", "--metrics-listen", listen]) == 3
    assert f"no gateway answering on {listen}" in capsys.readouterr().err
