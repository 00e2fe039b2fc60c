"""`python -m lab vm up|down|ssh|status`: the VM lab by hand (see lab/vm/lab.py)."""

from __future__ import annotations

import argparse
import os
import sys
import time

from lab.netns import LabError
from lab.vm.lab import VMLab, list_vm_labs


def _which(args: argparse.Namespace) -> str:
    if args.prefix:
        return args.prefix
    labs = list_vm_labs()
    if len(labs) == 1:
        return labs[0]
    if not labs:
        raise LabError("no VM lab is running; `python -m lab vm up` starts one")
    raise LabError(f"{len(labs)} VM labs are running ({', '.join(labs)}): choose with --prefix")


def cmd_up(args: argparse.Namespace) -> int:
    t0 = time.monotonic()

    def say(msg: str) -> None:
        print(f"[{time.monotonic() - t0:6.1f} s] {msg}", flush=True)

    lab = VMLab.up(gateways=args.gateways, combined=args.combined, prefix=args.prefix,
                   memory_mb=args.memory, keep=True, progress=say)
    env = " ".join(f"{k}={v}" for k, v in lab.deploy_env().items())
    print(f"VM lab {lab.prefix} is up. Deploy with:\n"
          f"  {env} \\\n    ip netns exec {lab.net} .venv/bin/pyinfra -y inventory/lab.py "
          "deploy.py\n"
          f"`python -m lab vm ssh NAME` logs in; `python -m lab vm down` powers it off.")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    prefixes = list_vm_labs() if args.all else [_which(args)]
    rc = 0
    for prefix in prefixes:
        problems = VMLab.load(prefix).down()
        print(f"VM lab {prefix} removed" + "".join(f"\n  {p}" for p in problems))
        rc = rc or (1 if problems else 0)
    return rc


def cmd_ssh(args: argparse.Namespace) -> int:
    lab = VMLab.load(_which(args))
    argv = lab.ssh_argv(args.name, args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd,
                        quote=False)
    sys.stdout.flush()
    os.execvp(argv[0], argv)


def cmd_status(args: argparse.Namespace) -> int:
    from lab.vm.lab import main_status

    labs = list_vm_labs()
    print("\n".join(main_status(p) for p in labs) or "no VM lab is running")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="vm_command", required=True, metavar="VM_COMMAND")
    default_prefix = os.environ.get("WGJIT_VM_LAB")

    up = sub.add_parser("up", help="build the image if needed, boot the fleet, wait for SSH")
    up.add_argument("--prefix", default=default_prefix)
    up.add_argument("-g", "--gateways", type=int, default=1, metavar="G")
    up.add_argument("--combined", action="store_true",
                    help="one VM is both the registry and gateway gw1 (for small machines)")
    up.add_argument("--memory", type=int, default=1024, metavar="MB")
    up.set_defaults(func=cmd_up)

    down = sub.add_parser("down", help="power the VMs off and remove the lab")
    down.add_argument("--prefix", default=default_prefix)
    down.add_argument("--all", action="store_true")
    down.set_defaults(func=cmd_down)

    ssh = sub.add_parser("ssh", help="log in to a VM as root, or run CMD there")
    ssh.add_argument("--prefix", default=default_prefix)
    ssh.add_argument("name", help="registry, gw1, ...")
    ssh.add_argument("cmd", nargs=argparse.REMAINDER)
    ssh.set_defaults(func=cmd_ssh)

    status = sub.add_parser("status", help="list VM labs and their VMs")
    status.set_defaults(func=cmd_status)
