"""The VM lab: Debian VMs (systemd, sshd, kernel WireGuard) on the lab's underlay.

    <prefix>-net   the internet: bridge br0 and the router, as in the namespace lab;
                   every VM's tap is a port of br0, and qemu runs in this namespace
    VMs            the fleet of lab/fleet.py: registry 192.0.2.2, gateways 192.0.2.1N,
                   booted from the cached image (lab/vm/image.py) through a qcow2 overlay
    <prefix>-cN    namespace clients (wireguard-go), added on demand, that reach the
                   gateway VMs through the router

The lab is a pyinfra target: `inventory/lab.py` reads this lab's state, and
`pyinfra(...)` runs pyinfra from the bridge namespace (the only place the VMs are
reachable from). Tokens for the deploy are made here, as an operator would, into
0600 files beside the state; SSH uses a per-lab key.

State lives in /run/wgjit-lab/vm-labs/<prefix>/ (disks under the image cache, as
/run is memory). `python -m lab vm up|down|ssh|status` drive it by hand.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from appliance.keys import generate_keypair
from appliance.secrets import write_secret
from lab import addressing, client, fleet, procs
from lab.netns import LabError, list_netns, sh, uapi_socket
from lab.registry import TENANT
from lab.state import STATE_ROOT, Client, Gateway, check_prefix
from lab.vm import image as vm_image

VM_STATE_ROOT = STATE_ROOT / "vm-labs"
STATE_FILE = "vmlab.json"
CHECKOUT = Path(__file__).resolve().parents[2]
BRIDGE = "br0"
QEMU = "qemu-system-x86_64"
# ConnectTimeout also bounds sshd's banner and key exchange: at 5 s, three deploy
# tests failed with "Connection timed out during banner exchange" while two deploy
# tiers shared the 2 cores (load 12, four TCG guests). A VM that is not up yet
# refuses the connection at once, so wait_ssh does not wait on this.
SSH_OPTIONS = ["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
               "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
               "-o", "ConnectTimeout=30"]
# The deploy's interface name on gateways (group_data/gateways.py says the same).
GATEWAY_IFNAME = "wgjit0"
POWEROFF_TIMEOUT = 180.0
_PR_SET_PDEATHSIG = 1


@dataclass
class VMHost:
    name: str
    roles: list[str]
    address4: str
    tunnel4: str
    tap: str
    mac: str
    disk: str
    console_log: str
    memory_mb: int
    pid: int = 0
    boot_seconds: float = 0.0


@dataclass
class VMLabState:
    prefix: str
    dir: str
    created: float
    owner_pid: int = 0
    ssh_key: str = ""
    admin_token_file: str = ""
    db_password_file: str = ""
    disk_dir: str = ""
    image: str = ""
    kernel: str = ""
    initrd: str = ""
    vms: list[VMHost] = field(default_factory=list)
    clients: list[Client] = field(default_factory=list)

    def save(self) -> None:
        path = Path(self.dir) / STATE_FILE
        tmp = path.with_name(f".{STATE_FILE}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, prefix: str) -> VMLabState:
        path = VM_STATE_ROOT / check_prefix(prefix) / STATE_FILE
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise LabError(f"no VM lab {prefix} ({path})") from None
        vms = [VMHost(**v) for v in d.pop("vms", [])]
        clients = [Client(**c) for c in d.pop("clients", [])]
        return cls(**d, vms=vms, clients=clients)

    def vm(self, name: str) -> VMHost:
        for v in self.vms:
            if v.name == name:
                return v
        raise LabError(f"VM lab {self.prefix} has no VM {name!r} "
                       f"(VMs: {', '.join(v.name for v in self.vms)})")


def list_vm_labs() -> list[str]:
    if not VM_STATE_ROOT.is_dir():
        return []
    return sorted(p.name for p in VM_STATE_ROOT.iterdir() if (p / STATE_FILE).is_file())


def reap_orphans() -> list[str]:
    """Remove VM labs whose owning process died (a SIGKILLed test run: its qemus died
    with it, its namespaces and disks did not), and disks no lab owns."""
    reaped = []
    for prefix in list_vm_labs():
        try:
            st = VMLabState.load(prefix)
        except (LabError, ValueError, TypeError):
            continue
        if st.owner_pid and not procs.alive(st.owner_pid):
            VMLab(st).down()
            reaped.append(prefix)
    disks = vm_image.cache_dir() / "vms"
    if disks.is_dir():
        for d in disks.iterdir():
            if not (VM_STATE_ROOT / d.name / STATE_FILE).is_file():
                shutil.rmtree(d, ignore_errors=True)
    return reaped


def net_ns(prefix: str) -> str:
    return f"{prefix}-net"


def _die_with_parent() -> None:
    # A test's VMs must not outlive a SIGKILLed pytest.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _mac(prefix: str, n: int) -> str:
    h = hashlib.sha256(prefix.encode()).digest()
    return f"52:54:00:{h[0]:02x}:{h[1]:02x}:{n:02x}"


def _ssh_pubkey_blob(key: str) -> str:
    return Path(key + ".pub").read_text().split()[1]


class VMLab:
    """A running VM lab. Build with VMLab.up(...); find one with VMLab.load(prefix)."""

    def __init__(self, state: VMLabState, progress=None) -> None:
        self.state = state
        self.say = progress or (lambda _m: None)
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def prefix(self) -> str:
        return self.state.prefix

    @property
    def net(self) -> str:
        return net_ns(self.prefix)

    # -- lifecycle --

    @classmethod
    def up(cls, *, gateways: int = 1, combined: bool = False, prefix: str | None = None,
           memory_mb: int = 1024, keep: bool = False, progress=None,
           boot_timeout: float = 300) -> VMLab:
        """Build the image if needed, make the bridge, boot the fleet, wait for SSH.

        keep=False: qemu dies with this process (tests); keep=True: the VMs outlive it
        (`python -m lab vm up`). On any failure everything made so far is removed.
        """
        reap_orphans()
        prefix = check_prefix(prefix or "wv" + secrets.token_hex(2))
        d = VM_STATE_ROOT / prefix
        VM_STATE_ROOT.mkdir(parents=True, exist_ok=True)
        try:
            d.mkdir(mode=0o700)
        except FileExistsError:
            raise LabError(f"VM lab {prefix} exists; `python -m lab vm down --prefix "
                           f"{prefix}` first") from None
        st = VMLabState(prefix=prefix, dir=str(d), created=time.time(),
                        owner_pid=0 if keep else os.getpid())
        st.save()
        lab = cls(st, progress)
        try:
            lab._build(gateways, combined, memory_mb, keep, boot_timeout)
        except BaseException:
            lab.down()
            raise
        return lab

    @classmethod
    def load(cls, prefix: str, progress=None) -> VMLab:
        return cls(VMLabState.load(prefix), progress)

    def _build(self, gateways: int, combined: bool, memory_mb: int, keep: bool,
               boot_timeout: float) -> None:
        st = self.state
        image = vm_image.build_image(progress=self.say)
        st.image, st.kernel, st.initrd = (str(image.path), str(image.kernel.image),
                                          str(image.initrd))
        d = Path(st.dir)
        st.ssh_key = str(d / "id_ed25519")
        sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"wgjit-lab-{st.prefix}",
            "-f", st.ssh_key])
        # The operator's secrets for the deploy: the admin token the registry will
        # import (the deploy makes each gateway's own, see deploy_env).
        from appliance.registry import tokens
        st.admin_token_file = str(write_secret(d / "admin.token", tokens.generate()))
        st.db_password_file = str(write_secret(d / "db.password", secrets.token_urlsafe(24)))
        disk_dir = vm_image.cache_dir() / "vms" / st.prefix
        shutil.rmtree(disk_dir, ignore_errors=True)
        disk_dir.mkdir(parents=True)
        st.disk_dir = str(disk_dir)
        st.save()
        self._make_internet()
        for n, h in enumerate(fleet.servers(gateways, combined=combined), 1):
            st.vms.append(VMHost(
                name=h.name, roles=list(h.roles), address4=h.address4, tunnel4=h.tunnel4,
                tap=f"{st.prefix}t{n}", mac=_mac(st.prefix, n),
                disk=str(vm_image.overlay(image, disk_dir / f"{h.name}.qcow2")),
                console_log=str(d / f"console-{h.name}.log"), memory_mb=memory_mb))
        st.save()
        t0 = time.monotonic()
        for v in st.vms:
            self._boot(v, keep)
        st.save()
        self.say(f"booting {', '.join(v.name for v in st.vms)} (image {image.path.name}, "
                 f"kernel {image.kernel.version})")
        for v in st.vms:
            v.boot_seconds = time.monotonic() - t0 + self.wait_ssh(v.name, t0 + boot_timeout)
            self.say(f"{v.name} ({v.address4}) answers SSH after {v.boot_seconds:.0f}s")
        st.save()

    def _make_internet(self) -> None:
        ns = self.net
        sh(["ip", "netns", "add", ns])
        lines = ["link set lo up", f"link add {BRIDGE} type bridge", f"link set {BRIDGE} up"]
        lines += [f"address add {a}/24 dev {BRIDGE}" for a in addressing.ROUTER4]
        sh(["ip", "-n", ns, "-batch", "-"], input="\n".join(lines) + "\n")
        sh(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])

    def _boot(self, v: VMHost, keep: bool) -> None:
        st = self.state
        sh(["ip", "-n", self.net, "tuntap", "add", "dev", v.tap, "mode", "tap"])
        sh(["ip", "-n", self.net, "link", "set", v.tap, "master", BRIDGE, "up"])
        append = " ".join([
            # quiet: every line on the emulated serial port costs; mitigations cost
            # more under TCG than they protect in a throwaway lab VM.
            "root=/dev/vda", "rw", "console=ttyS0", "panic=-1", "quiet", "mitigations=off",
            f"wgjit.addr={v.address4}/{fleet.prefix_len()}",
            f"wgjit.gw={addressing.ROUTER4[0]}", f"wgjit.hostname={v.name}",
            f"wgjit.sshkey={_ssh_pubkey_blob(st.ssh_key)}",
        ])
        argv = ["ip", "netns", "exec", self.net, QEMU, "-accel", "tcg", "-cpu", "max",
                "-m", str(v.memory_mb), "-smp", "1", "-nodefaults", "-no-user-config",
                "-display", "none", "-no-reboot",
                "-kernel", st.kernel, "-initrd", st.initrd, "-append", append,
                "-drive", f"file={v.disk},if=virtio,format=qcow2,cache=unsafe",
                "-netdev", f"tap,id=n0,ifname={v.tap},script=no,downscript=no",
                "-device", f"virtio-net-pci,netdev=n0,mac={v.mac}",
                "-serial", f"file:{v.console_log}",
                "-device", "virtio-rng-pci"]
        log = open(Path(st.dir) / f"qemu-{v.name}.log", "ab")  # noqa: SIM115 - handed to qemu
        with log:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    preexec_fn=None if keep else _die_with_parent)
        self._procs[v.name] = proc
        v.pid = proc.pid

    def wait_ssh(self, name: str, deadline: float) -> float:
        """Seconds from now until `ssh true` works; fails early if qemu died."""
        v = self.state.vm(name)
        t0 = time.monotonic()
        while True:
            if not self._alive(v):
                raise LabError(f"VM {name}: qemu exited; console:\n"
                               f"{procs.tail(v.console_log, 25)}")
            try:
                if self.ssh(name, ["true"], timeout=20).returncode == 0:
                    return time.monotonic() - t0
            except subprocess.TimeoutExpired:
                pass
            if time.monotonic() > deadline:
                raise LabError(f"VM {name}: no SSH in time; console:\n"
                               f"{procs.tail(v.console_log, 25)}")
            time.sleep(2)

    def _alive(self, v: VMHost) -> bool:
        proc = self._procs.get(v.name)
        if proc is not None:
            return proc.poll() is None
        return bool(v.pid) and procs.alive(v.pid)

    def down(self) -> list[str]:
        """Power the VMs off cleanly (kill what does not stop), remove everything."""
        st = self.state
        problems: list[str] = []
        for v in st.vms:
            if v.pid and self._alive(v):
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.ssh(v.name, ["systemctl", "poweroff", "--no-block"], timeout=20)
        # systemd stops every service first; under TCG on a busy machine that takes a while.
        deadline = time.monotonic() + POWEROFF_TIMEOUT
        for v in st.vms:
            while v.pid and self._alive(v) and time.monotonic() < deadline:
                time.sleep(0.5)
            if v.pid and self._alive(v):
                problems.append(f"{v.name}: did not power off in time, killed")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(v.pid, signal.SIGKILL)
            proc = self._procs.pop(v.name, None)
            if proc is not None:
                proc.wait()
        for c in st.clients:
            self._stop_client(c)
        for ns in [c.ns for c in st.clients] + [self.net]:
            if ns in list_netns():
                procs.stop([(pid, signal.SIGKILL) for pid in procs.netns_pids(ns)], grace=2)
                p = sh(["ip", "netns", "del", ns], check=False)
                if p.returncode != 0:
                    problems.append(f"ip netns del {ns}: {p.stderr.strip()}")
        if st.disk_dir:
            shutil.rmtree(st.disk_dir, ignore_errors=True)
        shutil.rmtree(st.dir, ignore_errors=True)
        return problems

    # -- using it --

    def ssh_argv(self, name: str, argv: list[str] | None = None, *,
                 quote: bool = True) -> list[str]:
        v = self.state.vm(name)
        cmd = ["ip", "netns", "exec", self.net, "ssh", *SSH_OPTIONS, "-i", self.state.ssh_key,
               f"root@{v.address4}"]
        # ssh hands the remote shell one string: quote, so each element stays one word
        # (shell syntax goes through ["sh", "-c", "..."]).
        # quote=False: words joined as ssh(1) itself does, for a person at a prompt.
        if not argv:
            return cmd
        return [*cmd, "--", shlex.join(argv) if quote else " ".join(argv)]

    def ssh(self, name: str, argv: list[str], *, timeout: float = 120,
            check: bool = False, input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run argv on a VM as root; for pipes and redirections, argv = ["sh", "-c", "..."]."""
        p = subprocess.run(self.ssh_argv(name, argv), capture_output=True, text=True,
                           timeout=timeout, input=input)
        if check and p.returncode != 0:
            raise LabError(f"{name}: {' '.join(argv)} failed ({p.returncode}): "
                           f"{(p.stderr or p.stdout).strip()[-1000:]}")
        return p

    def deploy_env(self) -> dict[str, str]:
        """What an operator has in their environment for deploy.py against this lab."""
        return {"WGJIT_VM_LAB": self.prefix,
                "WGJIT_ADMIN_TOKEN_FILE": self.state.admin_token_file,
                # Each gateway's own token, made by the first deploy, gone with the lab.
                "WGJIT_GATEWAY_TOKEN_DIR": str(Path(self.state.dir) / "gateway-tokens"),
                "WGJIT_DB_PASSWORD_FILE": self.state.db_password_file,
                "WGJIT_PUBKEY_DIR": str(Path(self.state.dir) / "pubkeys"),
                # The lab's fleet CA: made by the first deploy, gone with the lab.
                "WGJIT_CA_DIR": str(Path(self.state.dir) / "ca")}

    @property
    def ca_file(self) -> str:
        """The fleet CA's certificate, what an operator's `--registry-ca` names."""
        return str(Path(self.deploy_env()["WGJIT_CA_DIR"]) / "ca.pem")

    def pyinfra(self, args: list[str], *, env: dict[str, str] | None = None,
                timeout: float = 1800,
                inventory: str = "inventory/lab.py") -> subprocess.CompletedProcess[str]:
        """`pyinfra INVENTORY ARGS` from the bridge namespace, in the checkout."""
        # The bridge namespace has no route to the package index: the wheels the deploy
        # uploads are built (or found in the cache) out here first.
        from wgjit_deploy.wheels import wheelhouse
        wheelhouse()
        pyinfra = Path(sys.executable).with_name("pyinfra")
        full_env = {**os.environ, **self.deploy_env(), **(env or {}), "PYINFRA_PROGRESS": "off"}
        return subprocess.run(["ip", "netns", "exec", self.net, str(pyinfra),
                               inventory, *args], cwd=CHECKOUT, capture_output=True,
                              text=True, timeout=timeout, env=full_env)

    def gateway_public_key(self, name: str) -> str:
        path = Path(self.deploy_env()["WGJIT_PUBKEY_DIR"]) / f"{name}.pub"
        return path.read_text().strip()

    # -- namespace clients --

    def add_client(self, n: int, gateway_name: str) -> Client:
        """A namespace client cN with wireguard-go, configured for gateway VM gateway_name.

        Its peer is not registered anywhere: `register_client` does that.
        """
        st = self.state
        g = self.gateway(gateway_name)
        u4, r4, u6, _r6 = addressing.client_underlay(n)
        t4, t6 = addressing.client_tunnel(n)
        ns = f"{st.prefix}-c{n}"
        d = Path(st.dir)
        c = Client(name=f"c{n}", ns=ns, ifname=f"{st.prefix}c{n}", gateway=gateway_name,
                   underlay4=u4, underlay6=u6, tunnel4=t4, tunnel6=t6,
                   wg_log=str(d / f"wg-c{n}.log"), ping_log=str(d / f"ping-c{n}.log"))
        priv, c.public_key = generate_keypair()
        c.private_key_file = str(write_secret(d / f"c{n}.key", priv))
        st.clients.append(c)
        st.save()
        sh(["ip", "netns", "add", ns])
        leg = f"{st.prefix}v{n}"
        sh(["ip", "link", "add", addressing.UNDERLAY_IF, "netns", ns, "type", "veth", "peer",
            "name", leg, "netns", self.net])
        sh(["ip", "-n", self.net, "link", "set", leg, "master", BRIDGE, "up"])
        sh(["ip", "-n", ns, "-batch", "-"], input="\n".join([
            "link set lo up", f"link set {addressing.UNDERLAY_IF} up",
            f"address add {u4}/24 dev {addressing.UNDERLAY_IF}",
            f"route add default via {r4}"]) + "\n")
        if uapi_socket(c.ifname).exists():
            raise LabError(f"{uapi_socket(c.ifname)} exists: interface name in use")
        c.wg_pid = procs.spawn_wireguard_go(ns, c.ifname, c.wg_log)
        deadline = time.monotonic() + 10
        while not uapi_socket(c.ifname).exists():
            if not procs.alive(c.wg_pid) or time.monotonic() > deadline:
                raise LabError(f"wireguard-go {c.ifname} did not start: {procs.tail(c.wg_log)}")
            time.sleep(0.02)
        client.configure_interface(c, g, client.gateway_endpoint(c, g))
        st.save()
        return c

    def gateway(self, name: str) -> Gateway:
        """The lab's description of a gateway VM, as the namespace lab's client code wants it."""
        v = self.state.vm(name)
        t4, t6 = addressing.gateway_tunnel(
            1 + [x.name for x in self.state.vms if "gateway" in x.roles].index(name))
        return Gateway(name=name, ns="", ifname=GATEWAY_IFNAME, mode="jit",
                       underlay4=v.address4, underlay6="", tunnel4=v.tunnel4 or t4, tunnel6=t6,
                       listen_port=addressing.WG_PORT, public_key=self.gateway_public_key(name))

    def client(self, name: str) -> Client:
        for c in self.state.clients:
            if c.name == name:
                return c
        raise LabError(f"no client {name}")

    def _stop_client(self, c: Client) -> None:
        client.stop_ping(c)
        if c.wg_pid and procs.alive(c.wg_pid):
            procs.stop([(c.wg_pid, signal.SIGTERM)], grace=3)
        with contextlib.suppress(FileNotFoundError):
            uapi_socket(c.ifname).unlink()


def main_status(prefix: str) -> str:
    st = VMLabState.load(prefix)
    lines = [f"VM lab {st.prefix} ({st.dir})"]
    for v in st.vms:
        alive = "running" if v.pid and procs.alive(v.pid) else "stopped"
        lines.append(f"  {v.name:10} {v.address4:15} {','.join(v.roles):16} {alive} "
                     f"(pid {v.pid}, console {v.console_log})")
    return "\n".join(lines)


POSTGRES_URL = "postgresql://wgjit@127.0.0.1:5432/wgjit"
# The tenant the lab's clients are registered in (as in the namespace lab).
LAB_TENANT = TENANT


def inventory_groups(prefix: str | None = None) -> dict[str, list[tuple[str, dict]]]:
    """pyinfra inventory groups for a running VM lab ($WGJIT_VM_LAB, or the only one).

    Hosts are named as in the fleet (registry, gw1, ...); SSH goes to their lab
    address as root with the lab's key, from the bridge namespace.
    """
    prefix = prefix or os.environ.get("WGJIT_VM_LAB")
    if not prefix:
        labs = list_vm_labs()
        if len(labs) != 1:
            raise LabError("set WGJIT_VM_LAB to the VM lab's prefix "
                           f"(running: {', '.join(labs) or 'none'})")
        prefix = labs[0]
    st = VMLabState.load(prefix)
    hosts = [fleet.FleetHost(v.name, tuple(v.roles), v.address4, v.tunnel4) for v in st.vms]
    groups: dict[str, list[tuple[str, dict]]] = {}
    gateways = [v for v in st.vms if "gateway" in v.roles]
    for v in st.vms:
        data: dict = {
            "ssh_hostname": v.address4, "ssh_user": "root", "ssh_key": st.ssh_key,
            "ssh_known_hosts_file": "/dev/null", "ssh_strict_host_key_checking": "off",
            "ssh_allow_agent": False, "ssh_look_for_keys": False,
            # An emulated sshd on a busy machine can miss pyinfra's 10 s connect timeout.
            "ssh_connect_retries": 3, "ssh_connect_retry_min_delay": 2,
            "ssh_connect_retry_max_delay": 5,
            # The image has every package; the VMs have no route to a mirror.
            "apt_update": False,
            "registry_url": fleet.registry_url(hosts),
        }
        if "gateway" in v.roles:
            n = 1 + gateways.index(v)
            data["wg_address"] = list(addressing.gateway_tunnel(n))
            # Quick eviction, so tests see it within minutes (the README's "Defaults
            # that matter" says why production keeps it above 180 s).
            data.update(idle_timeout=20, evict_interval=5)
            # Each gateway's token limited to the lab clients' tenant: the JIT path
            # runs through a pool-limited token.
            data["gateway_tenants"] = [LAB_TENANT]
        if "registry" in v.roles:
            # The registry's database in PostgreSQL on the same VM (the fleet engine;
            # a registry host outside the postgres group keeps its SQLite file).
            data["registry_db"] = POSTGRES_URL
            groups.setdefault("postgres", []).append((v.name, data))
        for group in fleet.FleetHost(v.name, tuple(v.roles), v.address4).groups:
            groups.setdefault(group, []).append((v.name, data))
    return groups
