"""`wgjit gateway ...` (the daemon lands with the gateway issue)."""

from __future__ import annotations

import argparse


def add_commands(sub: argparse._SubParsersAction) -> None:
    gw = sub.add_parser("gateway", help="the gateway daemon")
    gsub = gw.add_subparsers(dest="gateway_command", required=True, metavar="COMMAND")
    run = gsub.add_parser("run", help="catch first initiations and install peers just in time")
    run.set_defaults(func=lambda args: gw.error("gateway run is not built yet"))
