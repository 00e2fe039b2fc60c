"""Every setting of `wgjit gateway run`, declared once.

Each `Option` below is the flag, the `[gateway]` key of the TOML file, the
`WGJIT_<NAME>` variable, the default, the check and the help. The daemon's
`GatewaySettings`, the CLI's flags, the eviction and cache policies and the
deploy's fallbacks are all derived from this table, so a default lives here and
nowhere else (tests/unit/test_settings.py fails when one appears elsewhere).

Kept free of heavy imports: the CLI builds its parser from it, and
prometheus_client must not be imported before `registry serve` has set up its
multiprocess directory.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from appliance import config, transport
from appliance.config import Option
from appliance.gateway import batch, load, sourcelimit
from appliance.gateway.modes import DEFAULT_INSTALL_MODE, INSTALL_MODES
from appliance.registry.limits import MAX_LOOKUP_KEYS

# The keepalive that makes the device handshake towards a new peer at once
# (role inversion): WireGuard's usual persistent keepalive.
TRIGGER_KEEPALIVE = 25


def _one_of(*choices: str):
    def check(value: str) -> str | None:
        return None if value in choices else f"must be {' or '.join(choices)}"
    return check


def _port(value: int) -> str | None:
    return None if 0 < value < 65536 else "must be a port from 1 to 65535"


def _non_negative(value: float) -> str | None:
    return None if value >= 0 else "must not be negative"


def _lookup_batch(value: int) -> str | None:
    return (None if 1 <= value <= MAX_LOOKUP_KEYS
            else f"must be from 1 to {MAX_LOOKUP_KEYS} (the registry's limit per call)")


S = "SECONDS"
OPTIONS: list[Option] = [
    Option("interface", required=True, metavar="IFNAME",
           help="WireGuard interface to adopt or create"),
    Option("registry", config.URLS, required=True, repeat=True, metavar="URL",
           field="registries",
           help="registry server base URL; repeat for several servers over one database, "
                "asked in this order, failing over between them (WGJIT_REGISTRY: a comma- "
                "or space-separated list)"),
    Option("token-file", required=True, metavar="FILE",
           help="0600 file with a gateway-scope token"),
    *transport.OPTIONS,
    Option("listen-port", int, 51820, check=_port, metavar="PORT",
           help="UDP port when creating"),
    Option("private-key-file", metavar="FILE",
           help="0600 private key, to create the interface"),
    Option("state-dir", default="/var/lib/wgjit", metavar="DIR",
           help="cache, replay memory and feed cursor"),
    Option("metrics-listen", default="127.0.0.1:9587", check=config.host_port,
           metavar="HOST:PORT", help="/metrics, /healthz and /status"),
    # Keep it above 180 s (REJECT_AFTER_TIME) in production: README, "Defaults".
    Option("idle-timeout", float, 300.0, check=config.positive, metavar=S,
           help="evict after this idle"),
    Option("evict-interval", float, 30.0, check=config.positive, metavar=S,
           help="eviction pass period"),
    Option("handshake-grace", float, 15.0, check=config.positive, metavar=S,
           help="evict installed peers that never handshook after this"),
    Option("max-peers", int, 0, check=_non_negative, metavar="N",
           help="cap on installed peers, 0 = none"),
    Option("feed-interval", float, 5.0, check=config.positive, metavar=S,
           help="change-feed poll period"),
    Option("reconcile-interval", float, 3600.0, check=_non_negative, metavar=S,
           help="check every installed peer against the registry this often, whatever "
                "the feed says; 0: never"),
    Option("backend", default="auto", check=_one_of("auto", "netlink", "uapi"),
           metavar="auto|netlink|uapi", help="device backend"),
    Option("capture-interface", config.LIST, [], repeat=True, metavar="IFNAME",
           field="capture_interfaces",
           help="underlay interface to watch (repeatable; default: every Ethernet "
                "interface)"),
    Option("address", config.LIST, [], repeat=True, metavar="CIDR", field="addresses",
           help="tunnel address to give a created interface (repeatable)"),
    Option("rate", float, 50.0, check=config.positive, metavar="PER_SECOND",
           help="registry lookup calls per second"),
    Option("burst", int, 100, check=config.positive, metavar="N",
           help="registry lookup call burst"),
    Option("positive-ttl", float, 300.0, check=config.positive, metavar=S,
           help="cache a found peer (longer while the feed is followed)"),
    Option("negative-ttl", float, 30.0, check=config.positive, metavar=S,
           help="cache an unknown key"),
    Option("stale-ttl", float, 86_400.0, check=_non_negative, metavar=S,
           help="serve a cached peer this old while the registry is down"),
    Option("registry-timeout", float, 3.0, check=config.positive, metavar=S,
           help="per request"),
    Option("workers", int, 8, check=config.positive, metavar="N",
           help="lookup/install threads, and registry calls at once"),
    Option("lookup-batch", int, batch.MAX_BATCH, check=_lookup_batch, metavar="N",
           help="keys per registry lookup call, one rate-limit token each; 1: one GET "
                "per key"),
    Option("lookup-linger", float, batch.LINGER, check=_non_negative, metavar=S,
           help="how long a lookup waits for others to share its call"),
    Option("trigger-keepalive", int, TRIGGER_KEEPALIVE, check=_non_negative, metavar=S,
           help="keepalive that makes the device handshake towards a new peer at once, "
                "cleared after the handshake; 0 disables role inversion"),
    Option("install-mode", default=DEFAULT_INSTALL_MODE, check=_one_of(*INSTALL_MODES),
           metavar="|".join(INSTALL_MODES),
           help="how a new peer's first handshake completes: reinject hands the client's "
                "captured initiation back to the data plane (the client stays the "
                "initiator; falls back to invert if unanswered); invert makes the gateway "
                "handshake towards the client, one round trip slower"),
    Option("cookies", default="auto", check=_one_of(*load.MODES),
           metavar="|".join(load.MODES),
           help="answer initiations without a valid mac2 with a cookie reply: under load "
                "(auto), always, or never"),
    Option("source-rate", float, sourcelimit.PACKETS_PER_SECOND, check=_non_negative,
           metavar="PER_SECOND",
           help="initiations verified per source address (IPv6: per /64) a second; 0: no "
                "limit"),
    Option("source-burst", int, sourcelimit.PACKETS_BURSTABLE, check=config.positive,
           metavar="N", help="burst of the per-source limit"),
    Option("key-filter", default="on", check=_one_of("on", "off"), metavar="on|off",
           help="refuse keys the registry does not hold without asking it, from a filter "
                "loaded from the registry at start and kept current by the change feed"),
    Option("log-format", default="json", check=_one_of("json", "text"),
           metavar="json|text", help="event log format"),
]

BY_NAME = {o.name: o for o in OPTIONS}


def default(name: str) -> Any:
    """The declared default of the option `name` (with dashes), for the places that
    need it outside the daemon: the policies, the deploy, `gateway status`."""
    value = BY_NAME[name].default
    return list(value) if isinstance(value, list) else value


def _field(o: Option) -> tuple[str, Any, Any]:
    pytype = {int: int, float: float, config.BOOL: bool}.get(o.type, Any)
    if o.required:
        return o.attribute, pytype, dataclasses.field()
    if isinstance(o.default, list):
        return o.attribute, list, dataclasses.field(default_factory=list)
    return o.attribute, pytype, dataclasses.field(default=o.default)


# Required ones first: a dataclass wants fields without defaults before the others.
GatewaySettings = dataclasses.make_dataclass(
    "GatewaySettings",
    [_field(o) for o in OPTIONS if o.required] + [_field(o) for o in OPTIONS
                                                  if not o.required])
GatewaySettings.__module__ = __name__
GatewaySettings.__doc__ = ("What `wgjit gateway run` was told, one attribute per option in "
                           "OPTIONS (`registry` is `registries`, `capture-interface` "
                           "`capture_interfaces`, `address` `addresses`).")


def settings(values: dict[str, Any]) -> GatewaySettings:
    """GatewaySettings from config.resolve's output (keys with underscores)."""
    return GatewaySettings(**{o.attribute: values[o.key] for o in OPTIONS if o.key in values})
