"""`wgjit gateway run`: the just-in-time gateway daemon."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import signal
import sys

from appliance import config, transport
from appliance.config import Option
from appliance.gateway import batch, load, sourcelimit
from appliance.gateway.modes import DEFAULT_INSTALL_MODE, INSTALL_MODES

log = logging.getLogger(__name__)


def _backend(value: str) -> str | None:
    return None if value in ("auto", "netlink", "uapi") else "must be auto, netlink or uapi"


def _install_mode(value: str) -> str | None:
    return None if value in INSTALL_MODES else f"must be {' or '.join(INSTALL_MODES)}"


def _port(value: int) -> str | None:
    return None if 0 < value < 65536 else "must be a port from 1 to 65535"


def _cookie_mode(value: str) -> str | None:
    return None if value in load.MODES else f"must be one of {', '.join(load.MODES)}"


def _non_negative(value: float) -> str | None:
    return None if value >= 0 else "must not be negative"


def _lookup_batch(value: int) -> str | None:
    from appliance.registry.gateway import MAX_LOOKUP_KEYS

    return (None if 1 <= value <= MAX_LOOKUP_KEYS
            else f"must be from 1 to {MAX_LOOKUP_KEYS} (the registry's limit per call)")


OPTIONS = [
    Option("interface", required=True),
    Option("registry", config.URLS, required=True),
    Option("token-file", required=True),
    *transport.OPTIONS,
    Option("listen-port", int, 51820, check=_port),
    Option("private-key-file"),
    Option("state-dir", default="/var/lib/wgjit"),
    Option("metrics-listen", default="127.0.0.1:9587", check=config.host_port),
    Option("idle-timeout", float, 300.0, check=config.positive),
    Option("evict-interval", float, 30.0, check=config.positive),
    Option("handshake-grace", float, 15.0, check=config.positive),
    Option("max-peers", int, 0, check=_non_negative),
    Option("feed-interval", float, 5.0, check=config.positive),
    Option("reconcile-interval", float, 3600.0, check=_non_negative),
    Option("backend", default="auto", check=_backend),
    Option("capture-interface", config.LIST, []),
    Option("address", config.LIST, []),
    Option("rate", float, 50.0, check=config.positive),
    Option("burst", int, 100, check=config.positive),
    Option("positive-ttl", float, 300.0, check=config.positive),
    Option("negative-ttl", float, 30.0, check=config.positive),
    Option("stale-ttl", float, 86_400.0, check=_non_negative),
    Option("registry-timeout", float, 3.0, check=config.positive),
    Option("workers", int, 8, check=config.positive),
    Option("lookup-batch", int, batch.MAX_BATCH, check=_lookup_batch),
    Option("lookup-linger", float, batch.LINGER, check=_non_negative),
    Option("trigger-keepalive", int, 25, check=_non_negative),
    Option("install-mode", default=DEFAULT_INSTALL_MODE, check=_install_mode),
    Option("cookies", default="auto", check=_cookie_mode),
    Option("source-rate", float, sourcelimit.PACKETS_PER_SECOND, check=_non_negative),
    Option("source-burst", int, sourcelimit.PACKETS_BURSTABLE, check=config.positive),
    Option("key-filter", default="on",
           check=lambda v: None if v in ("on", "off") else "must be on or off"),
    Option("log-format", default="json",
           check=lambda v: None if v in ("json", "text") else "must be json or text"),
]


def settings_from(args: argparse.Namespace):
    from appliance.gateway.daemon import GatewaySettings

    s = config.resolve(OPTIONS, vars(args), config.read_config_file(args.config), "gateway")
    transport.check_urls(s["registry"], s["allow_insecure_http"])
    fields = {f.name for f in dataclasses.fields(GatewaySettings)}
    renamed = {"registry": "registries", "capture_interface": "capture_interfaces",
               "address": "addresses"}
    values = {renamed.get(k, k): v for k, v in s.items()}
    return GatewaySettings(**{k: v for k, v in values.items() if k in fields}), s["log_format"]


def cmd_run(args: argparse.Namespace) -> int:
    from appliance.gateway.daemon import build_gateway
    from appliance.gateway.events import setup_logging
    from appliance.secrets import SecretFileError
    from appliance.wg import WgError

    settings, log_format = settings_from(args)
    setup_logging(args.log_level, log_format)

    def reload(*_: object) -> None:
        try:
            new, _fmt = settings_from(args)
        except config.ConfigError as e:
            log.error("reload refused, keeping the running settings: %s", e)
            return
        gateway.apply(new)

    try:
        gateway = build_gateway(settings)
        signal.signal(signal.SIGHUP, reload)
        return gateway.run()
    except (WgError, SecretFileError, OSError) as e:
        log.error("gateway: %s", e)
        print(f"wgjit gateway: {e}", file=sys.stderr)
        return 1


def cmd_status(args: argparse.Namespace) -> int:
    import urllib.error

    from appliance.gateway import status

    # The address comes from where the daemon's does (flag, WGJIT_METRICS_LISTEN,
    # the [gateway] table of --config, the option's default), so pointing both
    # commands at one config file is enough.
    optional = [dataclasses.replace(o, required=False) for o in OPTIONS]
    flags = {o.key: None for o in optional} | {"metrics_listen": args.metrics_listen}
    listen = config.resolve(optional, flags, config.read_config_file(args.config),
                            "gateway")["metrics_listen"]
    try:
        report = status.fetch(listen)
    except (OSError, urllib.error.URLError, ValueError) as e:
        print(f"wgjit gateway status: no gateway answering on {listen}: {e}", file=sys.stderr)
        return 3
    print(json.dumps(report, indent=2) if args.json else status.render(report))
    return 0 if report.get("status") == "ok" else 1


def add_commands(sub: argparse._SubParsersAction) -> None:
    gw = sub.add_parser("gateway", help="the just-in-time gateway daemon")
    gsub = gw.add_subparsers(dest="gateway_command", required=True, metavar="COMMAND")
    run = gsub.add_parser(
        "run", help="catch first initiations and install peers just in time",
        description="Hold no peers; install each client on its first handshake initiation, "
                    "pulled from the registry, and evict idle ones. Every option may also "
                    "come from the [gateway] table of --config or a WGJIT_<OPTION> variable.")
    a = run.add_argument
    a("--config", metavar="FILE", help="TOML config file ([gateway] table)")
    a("--interface", metavar="IFNAME", help="WireGuard interface to adopt or create")
    a("--registry", action="append", metavar="URL",
      help="registry server base URL; repeat for several servers over one database, "
           "asked in this order, failing over between them (WGJIT_REGISTRY: a comma- "
           "or space-separated list)")
    a("--token-file", metavar="FILE", help="0600 file with a gateway-scope token")
    transport.add_flags(run)
    a("--listen-port", type=int, metavar="PORT", help="UDP port when creating (51820)")
    a("--private-key-file", metavar="FILE", help="0600 private key, to create the interface")
    a("--state-dir", metavar="DIR", help="cache and feed cursor (/var/lib/wgjit)")
    a("--metrics-listen", metavar="HOST:PORT", help="/metrics and /healthz (127.0.0.1:9587)")
    a("--idle-timeout", type=float, metavar="SECONDS", help="evict after this idle (300)")
    a("--evict-interval", type=float, metavar="SECONDS", help="eviction pass period (30)")
    a("--handshake-grace", type=float, metavar="SECONDS",
      help="evict installed peers that never handshook after this (15)")
    a("--max-peers", type=int, metavar="N", help="cap on installed peers, 0 = none (0)")
    a("--feed-interval", type=float, metavar="SECONDS", help="change-feed poll period (5)")
    a("--reconcile-interval", type=float, metavar="SECONDS",
      help="check every installed peer against the registry this often, whatever the "
           "feed says; 0: never (3600)")
    a("--backend", metavar="auto|netlink|uapi", help="device backend (auto)")
    a("--capture-interface", action="append", metavar="IFNAME",
      help="underlay interface to watch (repeatable; default: every Ethernet interface)")
    a("--address", action="append", metavar="CIDR",
      help="tunnel address to give a created interface (repeatable)")
    a("--rate", type=float, metavar="PER_SECOND", help="registry lookup calls per second (50)")
    a("--burst", type=int, metavar="N", help="registry lookup call burst (100)")
    a("--positive-ttl", type=float, metavar="SECONDS", help="cache a found peer (300)")
    a("--negative-ttl", type=float, metavar="SECONDS", help="cache an unknown key (30)")
    a("--stale-ttl", type=float, metavar="SECONDS",
      help="serve a cached peer this old while the registry is down (86400)")
    a("--registry-timeout", type=float, metavar="SECONDS", help="per request (3)")
    a("--workers", type=int, metavar="N",
      help="lookup/install threads, and registry calls at once (8)")
    a("--lookup-batch", type=int, metavar="N",
      help="keys per registry lookup call, one rate-limit token each; 1: one GET per key "
           f"({batch.MAX_BATCH})")
    a("--lookup-linger", type=float, metavar="SECONDS",
      help=f"how long a lookup waits for others to share its call ({batch.LINGER:g})")
    a("--trigger-keepalive", type=int, metavar="SECONDS",
      help="keepalive that makes the device handshake towards a new peer at once, "
           "cleared after the handshake; 0 disables role inversion (25)")
    a("--install-mode", metavar="|".join(INSTALL_MODES),
      help="how a new peer's first handshake completes: reinject hands the client's "
           "captured initiation back to the data plane (the client stays the initiator; "
           "falls back to invert if unanswered); invert makes the gateway handshake "
           f"towards the client, one round trip slower ({DEFAULT_INSTALL_MODE})")
    a("--cookies", metavar="auto|always|off",
      help="answer initiations without a valid mac2 with a cookie reply: under load "
           "(auto), always, or never (auto)")
    a("--source-rate", type=float, metavar="PER_SECOND",
      help="initiations verified per source address (IPv6: per /64) a second; 0: no "
           f"limit ({sourcelimit.PACKETS_PER_SECOND:g})")
    a("--source-burst", type=int, metavar="N",
      help=f"burst of the per-source limit ({sourcelimit.PACKETS_BURSTABLE})")
    a("--key-filter", metavar="on|off",
      help="refuse keys the registry does not hold without asking it, from a filter "
           "loaded from the registry at start and kept current by the change feed (on)")
    a("--log-format", metavar="json|text", help="event log format (json)")
    run.set_defaults(func=cmd_run)

    st = gsub.add_parser(
        "status", help="what a running gateway holds and how it is doing",
        description="Read a running gateway's status from its local metrics endpoint "
                    "(read-only). Exit 0 when healthy, 1 when it reports failing, 3 when no "
                    "gateway answers (2: a usage or config error).")
    st.add_argument("--metrics-listen", metavar="HOST:PORT",
                    help="the daemon's --metrics-listen (127.0.0.1:9587)")
    st.add_argument("--config", metavar="FILE", help="the daemon's TOML config file")
    st.add_argument("--json", action="store_true", help="print the JSON document as it came")
    st.set_defaults(func=cmd_status)
