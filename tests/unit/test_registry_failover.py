"""Several registry servers: settings, failover of lookups and feed polls, health.

The HTTP underneath is a fake transport (a requests adapter) in front of
several fake servers over one in-memory registry, so the real RegistryClient
maps statuses and exceptions exactly as it does on the wire.
tests/lab/test_gateway_registry_failover.py runs the same path against two real
gunicorn registries, a real daemon and wireguard-go, with one server killed.
"""

from __future__ import annotations

import json
import logging
import os
import urllib.parse
from pathlib import Path

import pytest
import requests

from appliance import config
from appliance.cli import build_parser
from appliance.gateway import cli as gateway_cli
from appliance.gateway.batch import LookupBatcher
from appliance.gateway.cache import CachePolicy, Outcome, PeerCache
from appliance.gateway.failover import DOWN_FIRST, RegistryServers
from appliance.gateway.feed import FeedFollower
from appliance.gateway.install import Installer
from appliance.gateway.metrics import GatewayMetrics
from appliance.gateway.pull import (
    CursorMismatch,
    GatewayRegistry,
    PeerNotFound,
    RegistryUnavailable,
    build_gateway_registry,
)
from appliance.gateway.ratelimit import TokenBucket
from appliance.gateway.state import GatewayState
from appliance.registry.client import RegistryClient
from tests.unit.test_evict import FakeDevice, sample
from tests.unit.test_feed import FakeRegistry, key

A, B, C = "https://192.0.2.2:8080", "https://192.0.2.3:8080", "https://192.0.2.4:8080"
REGISTRY_OPTION = next(o for o in gateway_cli.OPTIONS if o.name == "registry")


# --- settings ------------------------------------------------------------------

def gateway_settings(argv: list[str], monkeypatch, env: dict[str, str] | None = None,
                     config_file: Path | None = None):
    for k in [k for k in os.environ if k.startswith("WGJIT_")]:
        monkeypatch.delenv(k)
    for k, v in (env or {}).items():
        monkeypatch.setenv(k, v)
    base = ["gateway", "run", "--interface", "wg0", "--token-file", "/dev/null"]
    if config_file:
        base += ["--config", str(config_file)]
    settings, _ = gateway_cli.settings_from(build_parser().parse_args(base + argv))
    return settings


def test_one_registry_flag_works_as_before(monkeypatch):
    s = gateway_settings(["--registry", A + "/"], monkeypatch)
    assert s.registries == [A]


def test_repeated_registry_flags_keep_their_order(monkeypatch):
    s = gateway_settings(["--registry", B, "--registry", A, "--registry", C], monkeypatch)
    assert s.registries == [B, A, C]


@pytest.mark.parametrize("value", [f"{A},{B}", f"{A} {B}", f" {A},  {B} ", f"{A}\n{B}"])
def test_environment_takes_a_comma_or_space_separated_list(monkeypatch, value):
    assert gateway_settings([], monkeypatch, {"WGJIT_REGISTRY": value}).registries == [A, B]


def test_config_file_takes_a_string_or_a_list(monkeypatch, tmp_path):
    f = tmp_path / "gw.toml"
    f.write_text(f'[gateway]\nregistry = "{A}"\n')
    assert gateway_settings([], monkeypatch, config_file=f).registries == [A]
    f.write_text(f'[gateway]\nregistry = ["{A}", "{B}"]\n')
    assert gateway_settings([], monkeypatch, config_file=f).registries == [A, B]
    # The flag wins over the file, as for every setting.
    assert gateway_settings(["--registry", C], monkeypatch, config_file=f).registries == [C]


@pytest.mark.parametrize("value,needle", [
    ("ftp://192.0.2.2", "not an http:// or https:// URL"),
    ("192.0.2.2:8080", "not an http:// or https:// URL"),
    ("http://192.0.2.2:80x80", "not an http:// or https:// URL"),
    (f"{A},{A}/", "given twice"),
    (" , ", "no URL given"),
    ("http://user:secret@192.0.2.2:8080", "credentials do not belong in a URL"),
])
def test_bad_registry_lists_name_the_key(value, needle):
    opts = [REGISTRY_OPTION]
    with pytest.raises(config.ConfigError) as e:
        config.resolve(opts, {}, {}, "gateway", {"WGJIT_REGISTRY": value})
    assert "environment WGJIT_REGISTRY" in str(e.value) and needle in str(e.value)
    as_list = [v for v in value.split(",") if v.strip()] if "twice" in needle else [value]
    with pytest.raises(config.ConfigError, match=r"config key gateway\.registry"):
        config.resolve(opts, {}, {"gateway": {"registry": as_list}}, "gateway", {})


def test_a_toml_list_item_is_one_url():
    with pytest.raises(config.ConfigError, match="not an http"):
        config.resolve([REGISTRY_OPTION], {}, {"registry": [f"{A},{B}"]}, "gateway", {})


# --- a fake transport: several servers over one registry ------------------------

class FakeServers(requests.adapters.BaseAdapter):
    """Answers for every server URL from one FakeRegistry, unless that server is
    told to fail: "refused", "reset", "timeout", or an HTTP status."""

    def __init__(self, reg: FakeRegistry) -> None:
        super().__init__()
        self.reg = reg
        self.fail: dict[str, object] = {}
        self.sent: list[tuple[str, str]] = []  # (server URL, path)
        self.other: dict[str, FakeRegistry] = {}  # a server over another database
        self.missing_batch_route = False

    def send(self, request, stream=False, timeout=None, verify=True, cert=None, proxies=None):
        url = urllib.parse.urlsplit(request.url)
        server = f"{url.scheme}://{url.netloc}"
        self.sent.append((server, url.path))
        how = self.fail.get(server)
        if how == "refused":
            raise requests.ConnectionError(f"{server}: [Errno 111] Connection refused")
        if how == "reset":
            raise requests.ConnectionError("('Connection aborted.', ConnectionResetError(104))")
        if how == "timeout":
            raise requests.ReadTimeout(f"{server}: read timed out")
        if isinstance(how, int):
            return self._response(request, how, {"error": "fake", "message": "told to"})
        reg = self.other.get(server, self.reg)
        if url.path == "/healthz":
            return self._response(request, 200, {"status": "ok"})
        if url.path.startswith("/v1/gateway/peers/"):
            k = urllib.parse.unquote(url.path.rsplit("/", 1)[1])
            try:
                return self._response(request, 200, reg.peer(k).to_json())
            except PeerNotFound:
                return self._response(request, 404, {"error": "not_found", "message": k})
        if url.path == "/v1/gateway/lookup" and request.method == "POST" \
                and not self.missing_batch_route:
            found = reg.lookup(json.loads(request.body)["keys"])
            return self._response(request, 200, {
                "peers": [p.to_json() for p in found.values() if p],
                "not_found": [k for k, p in found.items() if p is None]})
        if url.path == "/v1/gateway/changes":
            q = dict(urllib.parse.parse_qsl(url.query))
            try:
                page = reg.changes(int(q["since"]), int(q["limit"]), q.get("digest"))
            except CursorMismatch as e:
                return self._response(request, 409, {"error": "cursor_mismatch",
                                                     "message": str(e)})
            return self._response(request, 200, page)
        return self._response(request, 404, {"error": "not_found", "message": url.path})

    @staticmethod
    def _response(request, status: int, body: dict) -> requests.Response:
        r = requests.Response()
        r.status_code = status
        r._content = json.dumps(body).encode()
        r.headers["Content-Type"] = "application/json"
        r.request, r.url = request, request.url
        return r

    def close(self) -> None:
        pass

    def asked(self, path_prefix: str = "/v1/") -> list[str]:
        """Servers asked, in order, for paths under path_prefix; then forget them."""
        got = [s for s, p in self.sent if p.startswith(path_prefix)]
        self.sent.clear()
        return got


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Net:
    """Registry servers A, B (and C) behind the fake transport, as the daemon builds them."""

    def __init__(self, urls=(A, B)) -> None:
        self.reg = FakeRegistry()
        self.transport = FakeServers(self.reg)
        self.metrics = GatewayMetrics()
        self.clock = Clock()
        self.sleeps: list[float] = []
        clients = []
        for url in urls:
            session = requests.Session()
            session.mount("https://", self.transport)
            clients.append(RegistryClient(url, "tok", timeout=1.0, session=session))
        self.servers = RegistryServers(clients, self.metrics, clock=self.clock,
                                       sleep=self.sleeps.append)
        self.registry = GatewayRegistry(self.servers, self.metrics)

    def up(self, url: str) -> float:
        return sample(self.metrics.registry_up, server=url)

    def failovers(self) -> float:
        return sample(self.metrics.registry_failovers)


@pytest.fixture
def net() -> Net:
    return Net()


@pytest.mark.parametrize("how", ["refused", "reset", "timeout", 500, 502, 503, 429])
def test_a_failing_server_costs_one_immediate_retry_on_the_next(net: Net, how) -> None:
    k = key()
    net.reg.create(k)
    net.transport.fail[A] = how
    assert net.registry.peer(k).public_key == k
    assert net.transport.asked() == [A, B]
    assert net.sleeps == [], "the retry on the next server does not wait"
    assert net.up(A) == 0 and net.up(B) == 1 and net.failovers() == 1
    assert sample(net.metrics.registry_server_failures, server=A) == 1
    # While A is down, lookups go straight to B.
    net.registry.peer(k)
    assert net.transport.asked() == [B]


@pytest.mark.parametrize("status,raised", [(404, PeerNotFound), (401, RegistryUnavailable),
                                           (403, RegistryUnavailable),
                                           (400, RegistryUnavailable)])
def test_an_answer_is_not_a_failure(net: Net, status, raised) -> None:
    net.transport.fail[A] = status
    with pytest.raises(raised):
        net.registry.peer(key())
    assert net.transport.asked() == [A], "no other server is asked"
    assert net.up(A) == 1 and net.failovers() == 0 and net.sleeps == []


def test_unknown_key_is_an_answer_from_the_registry(net: Net) -> None:
    with pytest.raises(PeerNotFound):
        net.registry.peer(key())
    assert net.transport.asked() == [A]


def test_peer_lookups_count_themselves_and_make_the_registry_health(net: Net) -> None:
    k = key()
    net.reg.create(k)
    assert net.registry.health() == "unknown"
    net.registry.peer(k)
    with pytest.raises(PeerNotFound):
        net.registry.peer(key())
    assert net.registry.health() == "ok", "a 404 is an answer"
    assert sample(net.metrics.registry_errors) == 0
    net.transport.fail = {A: "refused", B: 503}
    with pytest.raises(RegistryUnavailable):
        net.registry.peer(k)
    assert net.registry.health() == "unavailable"
    assert sample(net.metrics.registry_calls) == 3  # lookups, not HTTP attempts
    assert sample(net.metrics.registry_errors) == 1


def test_batch_lookups_count_calls_and_keys_apart(net: Net) -> None:
    ks = [key() for _ in range(5)]
    net.reg.create(ks[0])
    found = net.registry.lookup(ks)
    assert found[ks[0]].public_key == ks[0] and found[ks[1]] is None
    net.registry.lookup(ks[:1])  # one key: the single GET
    assert sample(net.metrics.registry_calls) == 2
    assert sample(net.metrics.registry_lookup_keys) == 6
    assert net.registry.health() == "ok" and sample(net.metrics.registry_errors) == 0
    net.transport.fail = {A: "refused", B: 503}
    with pytest.raises(RegistryUnavailable):
        net.registry.lookup(ks)
    assert net.registry.health() == "unavailable"
    assert (sample(net.metrics.registry_calls), sample(net.metrics.registry_lookup_keys),
            sample(net.metrics.registry_errors)) == (3, 11, 1)


def test_the_failover_spends_one_rate_limit_token(net: Net, tmp_path: Path) -> None:
    k, other = key(), key()
    net.reg.create(k)
    net.reg.create(other)
    # One token and (practically) no refill: a second registry call would find none.
    cache = PeerCache(tmp_path / "gw.db",
                      LookupBatcher(net.registry.lookup, TokenBucket(1e-6, 1), token_wait=0.0))
    net.transport.fail[A] = "refused"
    assert cache.lookup(k).outcome == Outcome.FETCHED
    assert net.transport.asked() == [A, B]
    assert cache.lookup(other).outcome == Outcome.RATE_LIMITED
    cache.close()


def test_a_down_server_is_probed_after_its_backoff_then_preferred_again(net: Net) -> None:
    k = key()
    net.reg.create(k)
    net.transport.fail[A] = "refused"
    net.registry.peer(k)
    net.transport.asked()
    net.servers.probe()  # within the backoff: nothing asked
    assert net.transport.asked("/") == []
    assert net.servers.health()[0]["probe_in"] == DOWN_FIRST

    net.clock.now += DOWN_FIRST
    net.servers.probe()  # still refused: the backoff doubles
    assert net.transport.asked("/") == [A]
    assert net.servers.health()[0] == {"url": A, "up": False, "failures": 2,
                                       "last_error": net.servers.health()[0]["last_error"],
                                       "probe_in": 2 * DOWN_FIRST}
    assert "Connection refused" in net.servers.health()[0]["last_error"]

    del net.transport.fail[A]
    net.clock.now += DOWN_FIRST
    net.servers.probe()
    assert net.transport.asked("/") == [], "not yet: the backoff doubled"
    net.clock.now += DOWN_FIRST
    net.servers.probe()
    assert net.transport.asked("/") == [A]
    assert net.up(A) == 1
    assert net.servers.health()[0] == {"url": A, "up": True, "failures": 0,
                                       "last_error": None, "probe_in": None}
    # Back in the order of preference.
    net.registry.peer(k)
    assert net.transport.asked() == [A]


def test_up_and_down_are_events_once_per_change(net: Net, caplog) -> None:
    k = key()
    net.reg.create(k)
    caplog.set_level(logging.INFO, logger="wgjit.events")
    net.transport.fail[A] = 503
    for _ in range(3):
        net.registry.peer(k)
    net.clock.now += 10
    del net.transport.fail[A]
    net.servers.probe()
    got = [(r.wgjit_event, r.wgjit_fields["server"]) for r in caplog.records]
    assert got == [("registry_server_down", A), ("registry_server_up", A)]


def test_all_down_tries_each_then_backs_off_and_is_unavailable(net: Net) -> None:
    net.transport.fail = {A: "refused", B: 503}
    with pytest.raises(RegistryUnavailable):
        net.registry.peer(key())
    assert net.transport.asked() == [A, B, A]
    assert len(net.sleeps) == 1 and 0 <= net.sleeps[0] <= 0.2
    assert net.up(A) == net.up(B) == 0
    # Still all down: calls keep trying them rather than give up without asking.
    del net.transport.fail[B]
    with pytest.raises(PeerNotFound):
        net.registry.peer(key())
    assert net.transport.asked() == [A, B]
    assert net.up(B) == 1


def test_the_stale_entry_is_served_when_every_server_is_down(net: Net, tmp_path) -> None:
    k = key()
    net.reg.create(k)
    clock = Clock()
    cache = PeerCache(tmp_path / "gw.db", LookupBatcher(net.registry.lookup,
                                                        TokenBucket(1000, 1000)),
                      CachePolicy(positive_ttl=1), clock=clock)
    assert cache.lookup(k).outcome == Outcome.FETCHED
    clock.now += 5
    net.transport.fail = {A: "timeout", B: "timeout"}
    assert cache.lookup(k).outcome == Outcome.STALE
    cache.close()


def test_one_server_retries_like_before() -> None:
    net = Net(urls=(A,))
    k = key()
    net.reg.create(k)
    net.transport.fail[A] = 503
    with pytest.raises(RegistryUnavailable):
        net.registry.peer(k)
    assert net.transport.asked() == [A, A, A]
    assert len(net.sleeps) == 2 and net.sleeps[0] <= 0.2 and net.sleeps[1] <= 0.4
    assert net.failovers() == 0


def test_three_servers_two_dead_answer_in_one_call() -> None:
    net = Net(urls=(A, B, C))
    k = key()
    net.reg.create(k)
    net.transport.fail = {A: "refused", B: "timeout"}
    assert net.registry.peer(k).public_key == k
    assert net.transport.asked() == [A, B, C] and net.sleeps == []
    net.registry.peer(k)
    assert net.transport.asked() == [C]


def test_build_gateway_registry_keeps_the_order() -> None:
    reg = build_gateway_registry([B, A], "tok", GatewayMetrics(), timeout=2.0)
    assert [s["url"] for s in reg.servers.health()] == [B, A]
    assert all(s.client.timeout == 2.0 for s in reg.servers.servers)


# --- the change feed across a server switch ------------------------------------

class FeedWorld:
    def __init__(self, path: Path, net: Net) -> None:
        self.net = net
        self.dev = FakeDevice()
        self.inst = Installer(self.dev)
        self.state = GatewayState(path / "gateway.db")
        self.cache = PeerCache(path / "gateway.db",
                               LookupBatcher(net.registry.lookup, TokenBucket(1000, 1000)))
        self.removed: list[tuple[str, str]] = []
        self.feed = FeedFollower(net.registry, self.state, self.cache, self.inst, net.metrics,
                                 lambda k, r: self.removed.append((k, r)))

    def close(self) -> None:
        self.state.close()
        self.cache.close()


def test_the_feed_cursor_carries_over_to_the_next_server(net: Net, tmp_path) -> None:
    w = FeedWorld(tmp_path, net)
    a, b = key(), key()
    net.reg.create(a)
    net.reg.create(b)
    w.feed.poll()  # first start: the one reconcile
    assert w.inst.install(net.registry.peer(a), "198.51.100.2:40000")
    assert w.inst.install(net.registry.peer(b), "198.51.100.3:40000")
    cursor = w.feed.cursor
    net.transport.asked()

    net.transport.fail[A] = "refused"  # A dies; a revocation is made through B
    net.reg.revoke(a)
    assert w.feed.poll() == 1
    assert net.transport.asked() == [A, B]
    assert w.removed == [(a, "revoked")] and a not in w.dev.table and b in w.dev.table
    assert w.feed.cursor == cursor + 1
    assert sample(net.metrics.reconciles) == 1, "same feed_id: no second reconcile"
    assert w.feed.healthy
    net.reg.revoke(b)
    assert w.feed.poll() == 1
    assert net.transport.asked() == [B]
    w.close()


def test_a_server_over_another_database_makes_the_feed_reconcile(net: Net, tmp_path) -> None:
    w = FeedWorld(tmp_path, net)
    a = key()
    net.reg.create(a)
    w.feed.poll()
    assert w.inst.install(net.registry.peer(a), "198.51.100.2:40000")
    stray = FakeRegistry()  # B was pointed at a different database by mistake
    net.transport.other[B] = stray
    net.transport.fail[A] = "refused"
    w.feed.poll()
    assert sample(net.metrics.reconciles) == 2
    # That database does not know a: the gateway follows what answers, and removes it.
    assert w.removed == [(a, "revoked")]
    assert w.state.get("feed_id") == stray.feed_id
    w.close()


def test_concurrent_lookups_while_a_server_dies_all_get_answers(net: Net) -> None:
    from concurrent.futures import ThreadPoolExecutor

    keys = [key() for _ in range(64)]
    for k in keys:
        net.reg.create(k)
    net.transport.fail[A] = "reset"
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda k: net.registry.peer(k).public_key, keys))
    assert got == keys and net.sleeps == []
    asked = net.transport.asked()
    assert asked.count(B) == len(keys)  # each lookup answered once, by B
    assert net.up(A) == 0 and net.up(B) == 1
    [a, _] = net.servers.health()
    assert (a["up"], a["failures"], a["probe_in"]) == (False, 1, DOWN_FIRST), \
        "one outage is one backoff step, however many calls it failed"


# --- batch lookups ------------------------------------------------------------------

def test_a_batch_fails_over_like_a_single_lookup(net: Net) -> None:
    ks = [key() for _ in range(5)]
    for k in ks[:4]:
        net.reg.create(k)
    net.transport.fail[A] = "reset"
    found = net.registry.lookup(ks)
    assert [found[k] and found[k].public_key for k in ks] == [*ks[:4], None]
    assert net.transport.asked() == [A, B] and net.failovers() == 1
    assert net.up(A) == 0
    net.registry.lookup(ks)
    assert net.transport.asked() == [B]  # the down server is left alone


def test_a_batch_over_every_server_down_is_unavailable(net: Net) -> None:
    net.transport.fail = {A: 503, B: "timeout"}
    with pytest.raises(RegistryUnavailable):
        net.registry.lookup([key(), key()])


def test_a_registry_without_the_batch_route_is_asked_key_by_key(net: Net) -> None:
    ks = [key() for _ in range(3)]
    net.reg.create(ks[0])
    net.transport.missing_batch_route = True  # an older registry: 404 for the route
    found = net.registry.lookup(ks)
    assert found[ks[0]].public_key == ks[0] and found[ks[1]] is None
    assert [p for _, p in net.transport.sent if p.startswith("/v1/gateway/peers/")] != []
    net.transport.sent.clear()
    net.registry.lookup(ks)
    assert all(p.startswith("/v1/gateway/peers/") for _, p in net.transport.sent)
