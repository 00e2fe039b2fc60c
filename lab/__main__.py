"""`python -m lab up|status|connect|disconnect|down|demo|vm|vagrant-box`: the network-namespace lab.

Run as root from the repository root (the `lab` package is not installed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from lab import procs, topology
from lab.netns import LabError
from lab.state import StateError, check_prefix, list_labs, load_state


def _which_lab(args: argparse.Namespace) -> str:
    if args.prefix:
        return args.prefix
    labs = list_labs()
    if len(labs) == 1:
        return labs[0]
    if not labs:
        raise StateError("no lab is running; `python -m lab up` starts one")
    raise StateError(f"{len(labs)} labs are running ({', '.join(labs)}): choose with --prefix")


def _progress(t0: float):
    def say(msg: str) -> None:
        print(f"[{(time.monotonic() - t0) * 1000:7.0f} ms] {msg}", flush=True)
    return say


def cmd_up(args: argparse.Namespace) -> int:
    modes = args.mode or ["plain"]
    gateways = modes * args.gateways if len(modes) == 1 else modes
    spec = topology.LabSpec(
        gateways=gateways, clients=args.clients, prefix=args.prefix,
        registry="no" if args.no_registry else "yes",
        registries=args.registries,
        daemon=not args.no_daemon, psk=args.psk, endpoint_family=args.family,
        idle_timeout=args.idle_timeout, evict_interval=args.evict_interval,
        rtt=args.rtt, client_rtt=dict(args.client_rtt or []),
        daemon_args=_daemon_args(args.install_mode, len(gateways)))
    lab = topology.Lab.up(spec, progress=_progress(time.monotonic()), keep=not args.foreground)
    lab.close()
    if not args.foreground:
        print(f"lab {lab.prefix} is running. `python -m lab status --prefix {lab.prefix}`; "
              f"`python -m lab down --prefix {lab.prefix}` removes it.")
        return 0
    print(f"lab {lab.prefix} is running until Ctrl-C or SIGTERM", flush=True)
    try:
        with topology.signals_raise_interrupt():
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        problems = lab.down()
        print(f"lab {lab.prefix} removed" + "".join(f"\n  {p}" for p in problems), flush=True)
    return 0


def _client_rtt(text: str) -> tuple[str, float]:
    name, sep, ms = text.partition("=")
    try:
        if not sep:
            raise ValueError
        return name, float(ms)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: use CLIENT=MS, e.g. c2=250") from None


def _daemon_args(modes: list[str] | None, n: int) -> dict[str, list[str]]:
    """--install-mode once for every gateway, or once per gateway."""
    if not modes:
        return {}
    per = modes * n if len(modes) == 1 else modes
    if len(per) != n:
        raise LabError(f"--install-mode: once, or once per gateway ({n})")
    return {f"g{i}": ["--install-mode", m] for i, m in enumerate(per, 1)}


def _owner(prefix: str) -> int:
    """The live process a lab belongs to (a test session, a demo), or 0."""
    try:
        st = load_state(prefix)
    except StateError:
        return 0
    return st.owner_pid if st and st.owner_pid and procs.alive(st.owner_pid) else 0


def cmd_down(args: argparse.Namespace) -> int:
    if args.all:
        prefixes = list_labs()
        if not args.force:
            # A running test session or demo removes its own labs when it ends.
            for prefix in [p for p in prefixes if _owner(p)]:
                print(f"lab {prefix} left alone: process {_owner(prefix)} owns it "
                      "(--force removes it anyway)")
                prefixes.remove(prefix)
    elif args.prefix:
        prefixes = [check_prefix(args.prefix)]
    else:
        prefixes = list_labs()
        if len(prefixes) > 1:
            raise StateError(f"{len(prefixes)} labs are running ({', '.join(prefixes)}): "
                             "choose with --prefix, or --all")
    if not prefixes:
        print("no lab to remove")
        return 0
    rc = 0
    for prefix in prefixes:
        if prefix not in list_labs() and not topology.lab_namespaces(prefix):
            print(f"no lab {prefix}")
            continue
        problems = topology.destroy(prefix)
        print(f"lab {prefix} removed" if not problems else f"lab {prefix}: " + "; ".join(problems))
        rc = rc or (1 if problems else 0)
    return rc


def cmd_status(args: argparse.Namespace) -> int:
    from lab import status

    prefixes = list_labs() if args.all else [_which_lab(args)]
    docs = []
    for prefix in prefixes:
        lab = topology.Lab.load(prefix)
        try:
            docs.append(status.collect(lab))
        finally:
            lab.close()
    if args.json:
        print(json.dumps(docs if args.all else docs[0], indent=2))
    else:
        print("\n".join(status.render(d) for d in docs) or "no lab is running")
    return 0


def cmd_connect(args: argparse.Namespace) -> int:
    lab = topology.Lab.load(_which_lab(args))
    c = lab.connect(args.client, fresh=args.fresh, family=6 if args.ipv6 else 4)
    g = lab.gateway(c.gateway)
    print(f"{c.name}: pinging {g.tunnel6_ip if args.ipv6 else g.tunnel4_ip} through the tunnel "
          f"to {g.name} (ping pid {c.ping_pid}, replies in {c.ping_log})")
    return 0


def cmd_disconnect(args: argparse.Namespace) -> int:
    lab = topology.Lab.load(_which_lab(args))
    c = lab.disconnect(args.client)
    print(f"{c.name}: quiet")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lab", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    default_prefix = os.environ.get("WGJIT_LAB_PREFIX")

    def with_prefix(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--prefix", default=default_prefix,
                        help="which lab (default: $WGJIT_LAB_PREFIX, or the only one running)")

    up = sub.add_parser("up", help="build a lab and leave it running")
    with_prefix(up)
    up.add_argument("-g", "--gateways", type=int, default=1, metavar="G")
    up.add_argument("-c", "--clients", type=int, default=2, metavar="C")
    up.add_argument("--mode", action="append", choices=["jit", "plain"],
                    help="gateway mode; once for all gateways, or once per gateway "
                         "(default plain: clients pre-provisioned with `wg set`)")
    up.add_argument("--no-registry", action="store_true",
                    help="no registry host (plain gateways only)")
    up.add_argument("--registries", type=int, default=1, metavar="N",
                    help="registry servers over the one database; jit gateways fail over "
                         "between them (1)")
    up.add_argument("--no-daemon", action="store_true",
                    help="jit gateways without `wgjit gateway run` (empty interfaces)")
    up.add_argument("--psk", action="store_true", help="give every client a preshared key")
    up.add_argument("--family", choices=["4", "6", "mixed"], default="4",
                    help="underlay family clients use to reach their gateway")
    up.add_argument("--idle-timeout", type=float, default=300.0, metavar="S")
    up.add_argument("--evict-interval", type=float, default=30.0, metavar="S")
    up.add_argument("--rtt", type=float, metavar="MS",
                    help="round-trip time between clients and gateways, added by a delaying "
                         "UDP relay in the internet namespace (default: none, direct)")
    up.add_argument("--client-rtt", action="append", type=_client_rtt, metavar="CLIENT=MS",
                    help="the round-trip time of one client (repeatable; brings up the relay)")
    up.add_argument("--install-mode", action="append", choices=["reinject", "invert"],
                    help="jit gateways' install mode; once for all, or once per gateway "
                         "(default: the daemon's, reinject)")
    up.add_argument("--foreground", action="store_true",
                    help="stay in the foreground and remove the lab on Ctrl-C/SIGTERM")
    up.set_defaults(func=cmd_up)

    down = sub.add_parser("down", help="remove a lab: namespaces, processes, sockets, files")
    with_prefix(down)
    down.add_argument("--all", action="store_true",
                      help="remove every lab not owned by a running test session or demo")
    down.add_argument("--force", action="store_true",
                      help="with --all: also labs whose owning process is still running")
    down.set_defaults(func=cmd_down)

    status = sub.add_parser("status", help="show a lab")
    with_prefix(status)
    status.add_argument("--all", action="store_true")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)

    for name, helptext, func in (("connect", "start a client pinging through its tunnel",
                                  cmd_connect),
                                 ("disconnect", "make a client go quiet", cmd_disconnect)):
        sp = sub.add_parser(name, help=helptext)
        with_prefix(sp)
        sp.add_argument("client", help="client name, e.g. c1")
        if name == "connect":
            sp.add_argument("--fresh", action="store_true",
                            help="start a new session (drop the client's current one first)")
            sp.add_argument("--ipv6", action="store_true", help="ping the gateway's IPv6 "
                            "tunnel address")
        sp.set_defaults(func=func)

    from lab import demo

    demo.add_arguments(sub.add_parser("demo", help="the JIT story, told with a live timeline"))
    from lab.vm import cli as vm_cli

    vm_cli.add_arguments(sub.add_parser("vm", help="the VM lab: Debian VMs with kernel "
                                        "WireGuard, the deploy's targets"))
    vbox = sub.add_parser("vagrant-box", help="build the libvirt Vagrant box wgjit/bookworm-lab "
                          "from the VM lab's package cache and add it to Vagrant")
    vbox.set_defaults(func=cmd_vagrant_box)
    return p


def cmd_vagrant_box(args: argparse.Namespace) -> int:
    from lab import vagrant_box

    try:
        return vagrant_box.main()
    except vagrant_box.VMImageError as e:
        raise LabError(str(e)) from e


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if os.geteuid() != 0:
        print("python -m lab: network namespaces need root", file=sys.stderr)
        return 1
    try:
        return int(args.func(args) or 0)
    except (LabError, StateError) as e:
        print(f"python -m lab: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("python -m lab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
