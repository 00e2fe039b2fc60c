"""`wgjit`: one console script, one subcommand group per component."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from appliance import __version__
from appliance.config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    # Imported here so `wgjit --help` stays fast and one broken component
    # does not take the others' commands down with it.
    from appliance.gateway import cli as gateway_cli
    from appliance.registry import cli as registry_cli

    parser = argparse.ArgumentParser(
        prog="wgjit", description="Just-in-time WireGuard peer provisioning."
    )
    parser.add_argument("--version", action="version", version=f"wgjit {__version__}")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    registry_cli.add_commands(sub)
    gateway_cli.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # The registry database (and its WAL and SHM) holds preshared keys, the gateway's
    # state its cache: nothing wgjit creates is for other users' eyes.
    os.umask(0o077)
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"wgjit: config: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
