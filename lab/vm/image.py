"""A Debian bookworm disk image for full VMs: systemd, sshd, python3, kernel WireGuard.

The quick VM (lab/vm/quick.py) shares the host's root over 9p; a deploy target must be
a machine of its own, so this builds one with debootstrap and boots it from a
disk. The kernel is one of the host's Debian kernels (lab/vm/kernel.py picks it:
the stock one unless $WGJIT_VM_KERNEL says otherwise) booted by qemu with a small
initrd of ours; its modules are copied into the image so udev and modprobe inside
the guest find WireGuard.

The image is cached under $WGJIT_IMAGE_CACHE (default /var/cache/wgjit-lab) by a
hash of its recipe (this file, the package lists, the kernel version, the mirror),
so a CI run on a fresh clone of the same machine reuses it. Each VM boots a qcow2
overlay on top of it; the cached image is never written.

Nothing per-VM is baked in: the address, hostname and SSH key come on the kernel
command line (`wgjit.*=`), and a first unit in the guest applies them before the
network and sshd start.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from lab.vm.initramfs import _busybox, _decompressed, _ko_name
from lab.vm.kernel import (
    MODULES_DIR,
    Kernel,
    VMImageError,
    choose,
    module_files,
    modules_to_load,
    survey,
)
from wgjit_deploy import packages

SUITE = "bookworm"
# Bump when the way the image is assembled changes without the inputs changing.
RECIPE_VERSION = "5"
IMAGE_SIZE = "3G"
BASE_PACKAGES = [
    "systemd-sysv", "udev", "dbus", "openssh-server", "kmod", "iproute2", "procps",
    "python3", "python3-venv", "sudo", "iputils-ping", "less",
]
APT_SOURCES = [Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d")]

# Runs in the guest before the network and sshd: reads wgjit.* from the kernel
# command line (the lab's per-VM settings) and writes them where systemd looks.
GUEST_SETUP = r"""#!/bin/sh
# wgjit lab: apply wgjit.addr= wgjit.gw= wgjit.hostname= wgjit.sshkey= from /proc/cmdline.
set -eu
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        wgjit.addr=*) addr=${arg#wgjit.addr=} ;;
        wgjit.gw=*) gw=${arg#wgjit.gw=} ;;
        wgjit.hostname=*) name=${arg#wgjit.hostname=} ;;
        wgjit.sshkey=*) key=${arg#wgjit.sshkey=} ;;
    esac
done
if [ -n "${name:-}" ]; then
    echo "$name" > /etc/hostname
    hostname "$name"
    printf '127.0.0.1 localhost\n127.0.1.1 %s\n' "$name" > /etc/hosts
fi
if [ -n "${addr:-}" ]; then
    mkdir -p /etc/systemd/network
    {
        printf '[Match]\nName=en* eth*\n\n[Network]\nAddress=%s\n' "$addr"
        [ -n "${gw:-}" ] && printf 'Gateway=%s\n' "$gw"
        printf 'LinkLocalAddressing=no\nIPv6AcceptRA=no\n'
    } > /etc/systemd/network/10-lab.network
fi
if [ -n "${key:-}" ]; then
    install -d -m 0700 /root/.ssh
    echo "ssh-ed25519 $key wgjit-lab" > /root/.ssh/authorized_keys
    chmod 0600 /root/.ssh/authorized_keys
fi
"""

GUEST_UNIT = """[Unit]
Description=wgjit lab: per-VM settings from the kernel command line
DefaultDependencies=no
After=local-fs.target
Before=network-pre.target systemd-networkd.service ssh.service
Wants=network-pre.target

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/wgjit-lab-guest
RemainAfterExit=yes

[Install]
WantedBy=multi-user.target
"""


# The host's initrd (initramfs-tools, every driver) takes over a minute to unpack
# and probe under TCG on a busy machine; this one loads what the kernel lacks of
# these (lab/vm/kernel.py reads which) and mounts /dev/vda.
ROOT_DRIVERS = {
    "virtio_pci": "the PCI transport of every virtio device",
    "virtio_blk": "the root disk, /dev/vda",
    "ext4": "the root filesystem",
    # udev would load it from the image too, later; networkd and sshd wait for it.
    "virtio_net": "the lab NIC, a virtio-net-pci device",
}
# Not needed to boot, but a VM lab kernel without it is useless.
REQUIRED_DRIVERS = {"wireguard": "kernel WireGuard, what the VM lab is for"}
DISK_DRIVERS = {**ROOT_DRIVERS, **REQUIRED_DRIVERS}
INITRD_INIT = r"""#!/bin/busybox sh
export PATH=/bin
busybox mkdir -p /proc /sys /dev /newroot
busybox mount -t proc proc /proc
busybox mount -t devtmpfs dev /dev
for m in $(busybox cat /lib/wgjit/modules.order); do
    busybox insmod /lib/wgjit/$m || echo "wgjit initrd: insmod $m failed"
done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 600 ]; do busybox sleep 0.1; i=$((i + 1)); done
if ! busybox mount -t ext4 -o rw,noatime /dev/vda /newroot; then
    echo "wgjit initrd: cannot mount /dev/vda"
    busybox poweroff -f
fi
busybox mount --move /dev /newroot/dev
busybox umount /proc
exec busybox switch_root /newroot /sbin/init
"""


@dataclasses.dataclass(frozen=True)
class Image:
    path: Path
    initrd: Path  # small, ours (see INITRD_INIT), built with the image
    kernel: Kernel
    recipe: str
    build_seconds: float  # 0 when it came from the cache


def cache_dir() -> Path:
    return Path(os.environ.get("WGJIT_IMAGE_CACHE", "/var/cache/wgjit-lab"))


def image_packages() -> list[str]:
    return sorted(set(BASE_PACKAGES) | set(packages.all_roles()))


# --- where things come from ------------------------------------------------------

def _deb822_entries(text: str) -> Iterator[dict[str, str]]:
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line or line[:1].isspace():
                continue
            key, _, value = line.partition(":")
            fields[key.strip().lower()] = value.strip()
        if fields:
            yield fields


def _one_line_entries(text: str) -> Iterator[dict[str, str]]:
    for line in text.splitlines():
        line = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()  # type: ignore[assignment]
        if len(line) >= 4 and line[0] == "deb":
            yield {"types": "deb", "uris": line[1], "suites": line[2],
                   "components": " ".join(line[3:])}


def debian_mirror(suite: str = SUITE) -> str:
    """The Debian mirror this machine's apt uses for `suite` main ($WGJIT_DEBIAN_MIRROR wins)."""
    override = os.environ.get("WGJIT_DEBIAN_MIRROR")
    if override:
        return override
    files: list[Path] = []
    for p in APT_SOURCES:
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.suffix in (".list", ".sources"))
        elif p.is_file():
            files.append(p)
    for f in files:
        text = f.read_text(errors="replace")
        entries = _deb822_entries(text) if f.suffix == ".sources" else _one_line_entries(text)
        for e in entries:
            if e.get("enabled", "yes").lower() == "no" or "deb" not in e.get("types", "").split():
                continue
            if suite in e.get("suites", "").split() and "main" in e.get("components", "").split():
                for uri in e.get("uris", "").split():
                    if uri.startswith(("http://", "https://")):
                        return uri
    raise VMImageError(f"no Debian {suite} main source in /etc/apt/sources.list*; "
                       "set WGJIT_DEBIAN_MIRROR")


def find_disk_kernel() -> Kernel:
    """The kernel the VM lab boots: $WGJIT_VM_KERNEL if set, else the stock one.

    A disk root needs no 9p, so Debian's cloud kernel serves as well as the full one.
    """
    usable, rejected = survey(DISK_DRIVERS)
    return choose(usable, ", ".join(DISK_DRIVERS) + " built in or as modules", rejected)


def recipe_hash(kernel: Kernel, mirror: str) -> str:
    h = hashlib.sha256()
    for part in (RECIPE_VERSION, SUITE, IMAGE_SIZE, mirror, kernel.version, GUEST_SETUP,
                 GUEST_UNIT, INITRD_INIT, *ROOT_DRIVERS, *image_packages()):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:16]


# --- building --------------------------------------------------------------------

@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """One builder at a time per cache (two test sessions may start together)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _run(argv: list[str], log: Path, timeout: float = 900) -> None:
    with log.open("a") as out:
        out.write(f"$ {' '.join(argv)}\n")
        out.flush()
        p = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
    if p.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        raise VMImageError(f"{argv[0]} failed ({p.returncode}); log {log}:\n{tail}")


def require_tools(tools: dict[str, str]) -> None:
    """tools: command -> the Debian package that has it; a missing one names both."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise VMImageError(f"{', '.join(missing)} not found: apt-get install "
                           + " ".join(sorted({tools[t] for t in missing})))


def debootstrap(root: Path, packages: list[str], mirror: str, log: Path) -> None:
    """A minbase SUITE in `root`, through the .deb cache every image built here shares."""
    debs = cache_dir() / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    _run(["debootstrap", "--variant=minbase", f"--cache-dir={debs}",
          "--include=" + ",".join(packages), SUITE, str(root), mirror], log)


def _configure(root: Path, kernel: Kernel, mirror: str) -> None:
    shutil.copytree(MODULES_DIR / kernel.version, root / "lib/modules" / kernel.version,
                    symlinks=True, dirs_exist_ok=True)
    (root / "etc/fstab").write_text("/dev/vda / ext4 rw,noatime 0 1\n")
    (root / "etc/hostname").write_text("wgjit-vm\n")
    (root / "etc/apt/sources.list").write_text(f"deb {mirror} {SUITE} main\n")
    # Blank: systemd makes a fresh one at first boot, so VMs differ (networkd's DUIDs).
    (root / "etc/machine-id").write_text("")
    script = root / "usr/local/sbin/wgjit-lab-guest"
    script.write_text(GUEST_SETUP)
    script.chmod(0o755)
    (root / "etc/systemd/system/wgjit-lab-guest.service").write_text(GUEST_UNIT)
    # No network beyond the lab: apt's timers would only fail; the console getty
    # on ttyS0 comes from systemd's generator.
    chroot = ["chroot", str(root)]
    subprocess.run([*chroot, "systemctl", "enable", "wgjit-lab-guest.service",
                    "systemd-networkd.service", "ssh.service"], check=True,
                   capture_output=True)
    subprocess.run([*chroot, "systemctl", "mask", "apt-daily.timer",
                    "apt-daily-upgrade.timer", "systemd-networkd-wait-online.service",
                    "e2scrub_reap.service", "e2scrub_all.timer"],
                   check=True, capture_output=True)
    subprocess.run([*chroot, "passwd", "-l", "root"], check=True, capture_output=True)
    for f in (root / "var/cache/apt/archives").glob("*.deb"):
        f.unlink()


def build_image(*, progress: Callable[[str], None] | None = None) -> Image:
    """The cached image for this machine's kernel and mirror, built first if needed."""
    say = progress or (lambda _m: None)
    kernel = find_disk_kernel()
    mirror = debian_mirror()
    recipe = recipe_hash(kernel, mirror)
    root_dir = cache_dir()
    out = root_dir / "images" / f"{SUITE}-{recipe}.raw"
    with _lock(root_dir / "build.lock"):
        initrd = out.with_suffix(".initrd")
        if out.is_file() and initrd.is_file():
            return Image(out, initrd, kernel, recipe, 0.0)
        require_tools({"debootstrap": "debootstrap", "mkfs.ext4": "e2fsprogs",
                       "qemu-img": "qemu-utils"})
        t0 = time.monotonic()
        out.parent.mkdir(parents=True, exist_ok=True)
        log = out.with_suffix(".log")
        log.write_text("")
        say(f"building {out.name}: debootstrap {SUITE} from {mirror} (log {log})")
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=".build-") as tmp:
            root = Path(tmp) / "root"
            debootstrap(root, image_packages(), mirror, log)
            _configure(root, kernel, mirror)
            _build_initrd(kernel, Path(tmp) / "initrd")
            partial = Path(tmp) / "disk.raw"
            _run(["mkfs.ext4", "-q", "-F", "-L", "wgjitroot", "-d", str(root), str(partial),
                  IMAGE_SIZE], log)
            os.replace(Path(tmp) / "initrd", initrd)
            os.replace(partial, out)
        (out.with_suffix(".json")).write_text(json.dumps({
            "suite": SUITE, "kernel": kernel.version, "mirror": mirror,
            "packages": image_packages(), "built": time.time()}, indent=2))
        for stale in out.parent.glob(f"{SUITE}-*.raw"):
            if stale != out:
                for suffix in (".raw", ".json", ".log", ".initrd"):
                    stale.with_suffix(suffix).unlink(missing_ok=True)
        seconds = time.monotonic() - t0
        say(f"image built in {seconds:.0f}s")
        return Image(out, initrd, kernel, recipe, seconds)


def _build_initrd(kernel: Kernel, out: Path) -> None:
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".initrd-") as tmp:
        root = Path(tmp) / "root"
        (root / "bin").mkdir(parents=True)
        (root / "lib/wgjit").mkdir(parents=True)
        shutil.copy2(_busybox(), root / "bin/busybox")
        (root / "init").write_text(INITRD_INIT)
        (root / "init").chmod(0o755)
        order = []
        for path in module_files(kernel.version, modules_to_load(kernel.version, ROOT_DRIVERS)):
            (root / "lib/wgjit" / _ko_name(path)).write_bytes(_decompressed(path))
            order.append(_ko_name(path))
        (root / "lib/wgjit/modules.order").write_text("\n".join(order) + "\n")
        names = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
        with out.open("wb") as f:
            subprocess.run(["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0"], cwd=root,
                           input="\n".join(names).encode(), stdout=f, check=True)


def overlay(image: Image, path: Path) -> Path:
    """A qcow2 disk at `path` whose writes stay there; the cached image is its backing file."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b",
                    str(image.path), str(path)], check=True, capture_output=True)
    return path


def main() -> int:
    img = build_image(progress=print)
    print(f"{img.path} (kernel {img.kernel.version}, recipe {img.recipe})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
