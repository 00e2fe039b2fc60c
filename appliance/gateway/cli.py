"""`wgjit gateway run`: the just-in-time gateway daemon."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import signal
import sys

from appliance import config, transport
from appliance.gateway.settings import OPTIONS, default

log = logging.getLogger(__name__)


def settings_from(args: argparse.Namespace):
    from appliance.gateway.settings import settings

    s = config.resolve(OPTIONS, vars(args), config.read_config_file(args.config), "gateway")
    transport.check_urls(s["registry"], s["allow_insecure_http"])
    return settings(s), s["log_format"]


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
    run.add_argument("--config", metavar="FILE", help="TOML config file ([gateway] table)")
    # Also here, after the command, so that a later flag overrides the global one
    # (the lab runs its daemons at DEBUG, a bench may want INFO back).
    run.add_argument("--log-level", default=argparse.SUPPRESS,
                     choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                     help="as wgjit --log-level; INFO: one line per install, DEBUG: "
                          "each step of it too")
    config.add_flags(run, OPTIONS)
    run.set_defaults(func=cmd_run)

    st = gsub.add_parser(
        "status", help="what a running gateway holds and how it is doing",
        description="Read a running gateway's status from its local metrics endpoint "
                    "(read-only). Exit 0 when healthy, 1 when it reports failing, 3 when no "
                    "gateway answers (2: a usage or config error).")
    st.add_argument("--metrics-listen", metavar="HOST:PORT",
                    help=f"the daemon's --metrics-listen ({default('metrics-listen')})")
    st.add_argument("--config", metavar="FILE", help="the daemon's TOML config file")
    st.add_argument("--json", action="store_true", help="print the JSON document as it came")
    st.set_defaults(func=cmd_status)
