"""A real `vagrant up`: libvirt VMs from the local box, provisioned by deploy.py.

The Vagrantfile's fleet in its reduced form, the one the default run takes: a
registry VM that is the gateway too, and a client VM (WGJIT_VAGRANT_COMBINED=0:
one registry, one gateway and one client VM, 2-3 times as long here) boots
under libvirt (software emulation: WGJIT_LIBVIRT_DRIVER=qemu unless set), its
trigger runs `pyinfra @vagrant deploy.py`, and then the client VM connects just in
time through the gateway VM: after the gateway evicted it, the client's next ping
brings its peer back from the registry. `vagrant destroy -f` must leave no
domain, network, volume (but the box's) or process behind.

libvirtd is used if it runs; else this starts it in a network namespace of its
own and stops it after (lab/libvirt_daemons.py). Timings go to stderr.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from appliance.registry import tokens
from appliance.secrets import write_secret
from lab import libvirt_daemons, vagrant_box
from wgjit_deploy.wheels import wheelhouse

pytestmark = [pytest.mark.vagrant, pytest.mark.slow, pytest.mark.timeout(5400)]

ROOT = Path(__file__).resolve().parents[2]
COMBINED = os.environ.get("WGJIT_VAGRANT_COMBINED", "1") == "1"
REGISTRY, CLIENT = "registry", "c1"
GATEWAY = REGISTRY if COMBINED else "gw1"
MACHINES = sorted({REGISTRY, GATEWAY, CLIENT})
GATEWAY_TUNNEL_IP = "198.18.0.1"
GATEWAY_IF, CLIENT_IF = "wgjit0", "wgjit"  # the deploy's defaults
CLIENT_UNIT = f"wg-quick@{CLIENT_IF}.service"
# Short enough to watch an idle client go and come back within a test.
IDLE_TIMEOUT, EVICT_INTERVAL = 20, 5
TIMINGS: dict[str, float] = {}


def _say(msg: str) -> None:
    print(f"[vagrant] {msg}", file=sys.stderr, flush=True)


def _timed(name: str, t0: float) -> None:
    TIMINGS[name] = time.monotonic() - t0
    _say(f"{name}: {TIMINGS[name]:.0f}s")


def _qemu_pids() -> list[int]:
    p = subprocess.run(["pgrep", "-f", "^/usr/bin/qemu-system-x86_64 .*-name guest="],
                       capture_output=True, text=True)
    return [int(x) for x in p.stdout.split()]


class Vagrant:
    """vagrant (and `vagrant ssh`) run where libvirt's networks are, with the test's env."""

    def __init__(self, libvirt: libvirt_daemons.Libvirt, env: dict[str, str]) -> None:
        self.libvirt = libvirt
        self.env = env

    def run(self, *args: str, timeout: float = 600, check: bool = True,
            log: Path | None = None) -> subprocess.CompletedProcess[str]:
        """`vagrant ARGS`; with `log`, its output goes there as it comes (and is returned)."""
        argv = self.libvirt.argv(["vagrant", *args])
        if log is None:
            p = subprocess.run(argv, cwd=ROOT, env=self.env, capture_output=True, text=True,
                               timeout=timeout)
        else:
            with log.open("w") as out:
                p = subprocess.run(argv, cwd=ROOT, env=self.env, stdout=out,
                                   stderr=subprocess.STDOUT, text=True, timeout=timeout)
            p.stdout, p.stderr = log.read_text(errors="replace"), ""
        if check and p.returncode != 0:
            raise AssertionError(f"vagrant {' '.join(args)} failed ({p.returncode}):\n"
                                 f"{p.stdout[-6000:]}\n{p.stderr[-3000:]}")
        return p

    def sh(self, machine: str, command: str, check: bool = True, timeout: float = 300
           ) -> subprocess.CompletedProcess[str]:
        return self.run("ssh", machine, "-c", command, "--", "-q", check=check,
                        timeout=timeout)


@pytest.fixture(scope="module")
def libvirt():
    t0 = time.monotonic()
    with libvirt_daemons.running(progress=_say) as lv:
        _timed("libvirtd", t0)
        before = {"domains": set(lv.names("list", "--all", "--name")),
                  "networks": set(lv.names("net-list", "--all", "--name")),
                  "volumes": set(lv.volumes()), "qemu": set(_qemu_pids())}
        yield lv, before
    for daemon, pid in lv.started.items():
        assert not libvirt_daemons.alive(pid), f"{daemon} ({pid}) still running"
    if lv.netns:
        assert lv.netns not in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                              text=True).stdout.split()


@pytest.fixture(scope="module")
def fleet(libvirt, tmp_path_factory):
    lv, before = libvirt
    t0 = time.monotonic()
    box = vagrant_box.ensure_box(progress=_say)
    _timed("box (build and add; 0 when cached)", t0)
    # libvirt's namespace has no route to the package index: the wheels the deploy
    # uploads are built (or found in the cache) out here first.
    wheelhouse()
    secrets_dir = tmp_path_factory.mktemp("vagrant-secrets")
    env = {
        **os.environ,
        # The Vagrantfile's trigger runs `pyinfra`: this checkout's.
        "PATH": f"{ROOT / '.venv/bin'}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "VAGRANT_DEFAULT_PROVIDER": "libvirt", "PYINFRA_PROGRESS": "off",
        "WGJIT_VAGRANT_BOX": vagrant_box.BOX_NAME,
        # /dev/kvm exists on the lab machines but guests never start with it.
        "WGJIT_LIBVIRT_DRIVER": os.environ.get("WGJIT_LIBVIRT_DRIVER", "qemu"),
        "WGJIT_GATEWAYS": "1", "WGJIT_CLIENTS": "1",
        "WGJIT_VAGRANT_COMBINED": "1" if COMBINED else "0",
        "WGJIT_IDLE_TIMEOUT": str(IDLE_TIMEOUT), "WGJIT_EVICT_INTERVAL": str(EVICT_INTERVAL),
        "WGJIT_ADMIN_TOKEN_FILE": str(write_secret(secrets_dir / "admin.token",
                                                   tokens.generate())),
        # Each gateway's own token: made by the deploy, kept beside the admin token.
        "WGJIT_GATEWAY_TOKEN_DIR": str(secrets_dir / "gateway-tokens"),
    }
    env.pop("WGJIT_PUBKEY_DIR", None)
    vagrant = Vagrant(lv, env)
    status = vagrant.run("status", "--machine-readable").stdout
    assert ",state,not_created" in status and ",state,running" not in status, \
        f"this checkout already has Vagrant machines:\n{status}"
    t0 = time.monotonic()
    try:
        up_log = tmp_path_factory.mktemp("vagrant-up") / "vagrant-up.log"
        _say(f"vagrant up: output in {up_log}")
        up = vagrant.run("up", "--no-parallel", "--provider", "libvirt", timeout=4800,
                         log=up_log)
        _timed(f"vagrant up ({len(MACHINES)} VMs) + deploy", t0)
        # The Vagrantfile's trigger says how long pyinfra took; the rest is booting.
        took = re.search(r"wgjit: deploy\.py took (\d+) s", up.stdout)
        assert took, f"no deploy in vagrant up's output:\n{up.stdout[-3000:]}"
        TIMINGS["  of which deploy.py"] = float(took.group(1))
        yield vagrant, up, box
    finally:
        t0 = time.monotonic()
        destroy = vagrant.run("destroy", "-f", timeout=900, check=False)
        _timed("vagrant destroy", t0)
        _say(f"timings: {', '.join(f'{k} {v:.0f}s' for k, v in TIMINGS.items())}")
        assert destroy.returncode == 0, destroy.stdout[-3000:] + destroy.stderr[-3000:]
        # Nothing of this fleet is left in libvirt or on the host but the box's volume.
        assert set(lv.names("list", "--all", "--name")) == before["domains"]
        assert set(lv.names("net-list", "--all", "--name")) == before["networks"]
        new_volumes = set(lv.volumes()) - before["volumes"]
        assert {v for v in new_volumes if "_vagrant_box_image_" not in v} == set()
        assert set(_qemu_pids()) <= before["qemu"]
        assert set(lv.netns_pids()) <= set(lv.started.values())


def _wg_peers(vagrant: Vagrant) -> list[str]:
    out = vagrant.sh(GATEWAY, f"sudo wg show {GATEWAY_IF} peers").stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


def _installs(vagrant: Vagrant, key: str) -> list[dict]:
    """The gateway daemon's peer_installed events for `key`, from its journal."""
    out = vagrant.sh(GATEWAY, "sudo journalctl -u wgjit-gateway -o cat --no-pager").stdout
    events = []
    for line in out.splitlines():
        if line.startswith("{"):
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if ev.get("event") == "peer_installed" and ev.get("public_key") == key:
                events.append(ev)
    return events


def test_vagrant_up_provisions_every_vm_with_deploy_py(fleet):
    vagrant, up, box = fleet
    assert "pyinfra -y @vagrant deploy.py" in up.stdout
    assert re.search(r"wgjit: deploy\.py took \d+ s", up.stdout)
    status = vagrant.run("status", "--machine-readable").stdout
    for machine in MACHINES:
        assert f"{machine},state,running" in status
    # The box is ours (every package inside): the deploy fetched nothing.
    assert vagrant.sh(REGISTRY, "cat /etc/hostname").stdout.strip() == REGISTRY
    assert vagrant.sh(REGISTRY, "systemctl is-active wgjit-registry").stdout.strip() == "active"
    assert vagrant.sh(GATEWAY, "systemctl is-active wgjit-gateway").stdout.strip() == "active"
    assert vagrant.sh(CLIENT, f"systemctl is-active {CLIENT_UNIT}").stdout.strip() == "active"
    assert box.version in vagrant_box.added_versions(vagrant_box.vagrant_box_list())


def test_client_vm_connects_just_in_time_through_the_gateway_vm(fleet):
    vagrant, _, _ = fleet
    key = vagrant.sh(CLIENT, f"sudo wg show {CLIENT_IF} public-key").stdout.strip()
    assert re.fullmatch(r"[A-Za-z0-9+/]{43}=", key), key
    # The deploy never gives a gateway its clients: the client's first packets,
    # sent when wg-quick came up during the deploy, made the gateway pull it.
    first = _installs(vagrant, key)
    assert first, "the gateway never installed the client's peer"
    # Quiet client: the gateway evicts it.
    vagrant.sh(CLIENT, f"sudo systemctl stop {CLIENT_UNIT}")
    t0 = time.monotonic()
    deadline = t0 + 300
    while key in _wg_peers(vagrant):
        assert time.monotonic() < deadline, "the gateway did not evict the idle client"
        time.sleep(5)
    _timed("eviction of the quiet client", t0)
    assert key not in _wg_peers(vagrant)
    # Its next ping brings the peer back from the registry, just in time.
    t0 = time.monotonic()
    vagrant.sh(CLIENT, f"sudo systemctl start {CLIENT_UNIT}")
    ping = vagrant.sh(CLIENT, f"ping -c 3 -W 10 {GATEWAY_TUNNEL_IP}", check=False)
    _timed("client VM start + ping through the tunnel", t0)
    assert ping.returncode == 0, ping.stdout + ping.stderr
    assert " 0% packet loss" in ping.stdout or re.search(r"\b[1-3] received", ping.stdout)
    assert key in _wg_peers(vagrant)
    again = _installs(vagrant, key)
    assert len(again) > len(first), "no new install after the eviction"
    assert again[-1]["ts"] > again[len(first) - 1]["ts"]
    endpoint = vagrant.sh(GATEWAY, f"sudo wg show {GATEWAY_IF} endpoints").stdout
    assert re.search(rf"{re.escape(key)}\s+192\.0\.2\.101:\d+", endpoint), endpoint  # c1
