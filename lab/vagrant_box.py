"""A libvirt Vagrant box of Debian bookworm, built here: `python -m lab vagrant-box`.

No box can be downloaded on the lab machines, and the VMs cannot reach the package
mirrors reliably, so this builds one with debootstrap from the VM lab's package
cache (lab/vm/image.py: same mirror, same `debs/` directory) and installs every
package the deploy asks for, so the deploy's apt step has nothing to fetch.

Unlike the VM lab's image the box boots itself: its own kernel (Debian's cloud
flavour) and GRUB in the MBR of a one-partition disk. The host cannot read
partition tables (no `p1` from `losetup -P`), so the filesystem is made at the
partition's 1 MiB offset directly in the disk file (`mkfs.ext4 -E offset=`), and
GRUB's boot sector and core image (made by the box's own grub-mkimage) are written
into the disk file: no loop device, no mount.

The box is cached under $WGJIT_IMAGE_CACHE/boxes by a hash of its recipe and added
to Vagrant as `wgjit/bookworm-lab` with a version made from that hash, so a
changed recipe gives a new version (and vagrant-libvirt a new volume) rather than
silently reusing the old disk.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from lab.vm.image import (
    SUITE,
    _lock,
    _run,
    cache_dir,
    debian_mirror,
    debootstrap,
    image_packages,
    require_tools,
)
from lab.vm.kernel import VMImageError

BOX_NAME = "wgjit/bookworm-lab"
# Bump when the way the box is assembled changes without the inputs changing.
RECIPE_VERSION = "1"
DISK_GIB = 8
PART_OFFSET = 1 << 20  # the partition starts at sector 2048, as fdisk puts it
MBR_CODE_BYTES = 440  # then the disk signature, the partition table and 0x55aa
# What a Vagrant box needs beyond what the deploy installs (image_packages()).
BOX_PACKAGES = [
    "linux-image-cloud-amd64", "grub-pc", "systemd-resolved", "dbus", "openssh-server",
    "sudo", "rsync", "iproute2",
]
# Vagrant's well-known insecure key, replaced by a fresh one at the first `vagrant up`.
INSECURE_KEY_GLOB = "/usr/share/rubygems-integration/all/gems/vagrant-*/keys/vagrant.pub"
GRUB_MODULES = ["biosdisk", "part_msdos", "ext2", "normal", "linux", "search", "echo",
                "configfile", "test"]

# 99-: Vagrant writes 50-vagrant-<if>.network for its private networks, and networkd
# takes the first file by name that matches, so this one only catches the rest (the
# management NIC). Without a unique machine-id every VM would ask DHCP for one lease.
NETWORKD_DHCP = """[Match]
Name=en* eth*

[Network]
DHCP=ipv4
LinkLocalAddressing=no
IPv6AcceptRA=no
"""

SUDOERS = "vagrant ALL=(ALL) NOPASSWD: ALL\nDefaults:vagrant !requiretty\n"

# debootstrap made one set of host keys; each VM makes its own at first boot.
SSH_KEYGEN_UNIT = """[Unit]
Description=wgjit box: SSH host keys of this VM
Before=ssh.service
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A

[Install]
WantedBy=multi-user.target
"""


def grub_cfg(kernel: str, initrd: str, fs_uuid: str) -> str:
    # Written by hand: grub-mkconfig probes devices through udev, which a chroot lacks.
    cmdline = f"root=UUID={fs_uuid} ro net.ifnames=0 console=tty0 console=ttyS0,115200"
    return "\n".join([
        "set timeout=0",
        "set default=0",
        "menuentry 'Debian bookworm (wgjit box)' {",
        f"    search --no-floppy --fs-uuid --set=root {fs_uuid}",
        f"    linux /boot/{kernel} {cmdline}",
        f"    initrd /boot/{initrd}",
        "}",
        "",
    ])


def box_packages() -> list[str]:
    return sorted(set(image_packages()) | set(BOX_PACKAGES))


def metadata() -> dict:
    """The box's metadata.json (vagrant-libvirt reads format and virtual_size, in GiB)."""
    return {"provider": "libvirt", "format": "qcow2", "virtual_size": DISK_GIB}


def recipe_hash(mirror: str, insecure_key: str) -> str:
    h = hashlib.sha256()
    for part in (RECIPE_VERSION, SUITE, str(DISK_GIB), str(PART_OFFSET), mirror, insecure_key,
                 NETWORKD_DHCP, SUDOERS, SSH_KEYGEN_UNIT, grub_cfg("K", "I", "U"),
                 *GRUB_MODULES, *box_packages()):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:16]


def box_version(recipe: str) -> str:
    """A version Vagrant accepts, one per recipe: `0.<first 28 bits of the hash>`."""
    return f"0.{int(recipe[:7], 16)}"


def catalog(recipe: str, box_file: Path, sha256: str) -> dict:
    """The metadata document `vagrant box add` reads to add a box at a version."""
    return {"name": BOX_NAME, "description": "Debian bookworm for the wgjit lab (built here)",
            "versions": [{"version": box_version(recipe), "providers": [{
                "name": "libvirt", "url": box_file.resolve().as_uri(),
                "checksum_type": "sha256", "checksum": sha256}]}]}


def sfdisk_script(disk_bytes: int) -> str:
    """One bootable Linux partition from PART_OFFSET to the end of the disk."""
    start = PART_OFFSET // 512
    return f"label: dos\nstart={start}, size={disk_bytes // 512 - start}, type=83, bootable\n"


def added_versions(box_list: str) -> list[str]:
    """Versions of BOX_NAME for libvirt in `vagrant box list` output."""
    pat = re.compile(rf"^{re.escape(BOX_NAME)}\s+\(libvirt, ([^,)]+)")
    return [m.group(1) for line in box_list.splitlines() if (m := pat.match(line))]


def volume_prefix() -> str:
    """How vagrant-libvirt names the pool volume it uploads a version of this box to."""
    return BOX_NAME.replace("/", "-VAGRANTSLASH-") + "_vagrant_box_image_"


def stale_volumes(volumes: list[str], version: str) -> list[str]:
    """Volumes of older versions of this box: `vagrant box remove` leaves them in the pool."""
    return [v for v in volumes
            if v.startswith(volume_prefix()) and v != f"{volume_prefix()}{version}_box.img"]


@dataclasses.dataclass(frozen=True)
class Box:
    path: Path  # the .box file
    recipe: str
    version: str
    build_seconds: float  # 0 when it came from the cache
    add_seconds: float  # 0 when Vagrant already had this version


def insecure_key() -> str:
    found = sorted(glob.glob(INSECURE_KEY_GLOB))
    if not found:
        raise VMImageError(f"no Vagrant insecure key at {INSECURE_KEY_GLOB}: "
                           "apt-get install vagrant")
    return Path(found[-1]).read_text().strip()


# --- building --------------------------------------------------------------------

def _configure(root: Path, mirror: str, pubkey: str, fs_uuid: str) -> None:
    def chroot(*argv: str) -> None:
        p = subprocess.run(["chroot", str(root), *argv], capture_output=True, text=True)
        if p.returncode != 0:
            raise VMImageError(f"in the box's root: {' '.join(argv)}: {p.stderr.strip()}")

    (root / "etc/fstab").write_text(f"UUID={fs_uuid} / ext4 errors=remount-ro 0 1\n")
    (root / "etc/hostname").write_text("wgjit-box\n")
    (root / "etc/hosts").write_text("127.0.0.1 localhost\n127.0.1.1 wgjit-box\n")
    (root / "etc/apt/sources.list").write_text(f"deb {mirror} {SUITE} main\n")
    # Empty, and dbus's copy a link to it: systemd makes one per VM at first boot.
    (root / "etc/machine-id").write_text("")
    dbus_id = root / "var/lib/dbus/machine-id"
    dbus_id.parent.mkdir(parents=True, exist_ok=True)
    dbus_id.unlink(missing_ok=True)
    dbus_id.symlink_to("/etc/machine-id")
    net = root / "etc/systemd/network"
    net.mkdir(parents=True, exist_ok=True)
    (net / "99-wgjit-dhcp.network").write_text(NETWORKD_DHCP)
    (root / "etc/systemd/system/wgjit-ssh-keygen.service").write_text(SSH_KEYGEN_UNIT)
    for f in (root / "etc/ssh").glob("ssh_host_*"):
        f.unlink()
    chroot("useradd", "--create-home", "--shell", "/bin/bash", "--user-group", "vagrant")
    (root / "etc/sudoers.d/vagrant").write_text(SUDOERS)
    (root / "etc/sudoers.d/vagrant").chmod(0o440)
    ssh_dir = root / "home/vagrant/.ssh"
    ssh_dir.mkdir(mode=0o700)
    (ssh_dir / "authorized_keys").write_text(pubkey + "\n")
    (ssh_dir / "authorized_keys").chmod(0o600)
    chroot("chown", "-R", "vagrant:vagrant", "/home/vagrant/.ssh")
    chroot("systemctl", "enable", "systemd-networkd.service", "systemd-resolved.service",
           "ssh.service", "wgjit-ssh-keygen.service")
    # No network beyond the lab: apt's timers would only fail.
    chroot("systemctl", "mask", "apt-daily.timer", "apt-daily-upgrade.timer",
           "systemd-networkd-wait-online.service")
    chroot("passwd", "-l", "root")
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    initrds = sorted((root / "boot").glob("initrd.img-*"))
    if not kernels or not initrds:
        raise VMImageError("no kernel or initrd in the box's /boot (linux-image-cloud-amd64?)")
    grub = root / "boot/grub"
    grub.mkdir(parents=True, exist_ok=True)
    (grub / "grub.cfg").write_text(grub_cfg(kernels[-1].name, initrds[-1].name, fs_uuid))
    # core.img finds /boot/grub on the first partition and carries every module grub.cfg uses.
    chroot("grub-mkimage", "-O", "i386-pc", "-o", "/boot/grub/core.img",
           "-p", "(hd0,msdos1)/boot/grub", *GRUB_MODULES)
    shutil.copy2(root / "usr/lib/grub/i386-pc/boot.img", grub / "boot.img")
    for f in (root / "var/cache/apt/archives").glob("*.deb"):
        f.unlink()


def _make_disk(root: Path, disk: Path, fs_uuid: str, log: Path) -> None:
    size = DISK_GIB << 30
    with disk.open("wb") as f:
        f.truncate(size)
    p = subprocess.run(["sfdisk", "--quiet", str(disk)], input=sfdisk_script(size), text=True,
                       capture_output=True)
    if p.returncode != 0:
        raise VMImageError(f"sfdisk {disk}: {p.stderr.strip()}")
    fs_kib = (size - PART_OFFSET) // 1024
    _run(["mkfs.ext4", "-q", "-F", "-L", "wgjitbox", "-U", fs_uuid, "-E",
          f"offset={PART_OFFSET}", "-d", str(root), str(disk), f"{fs_kib}k"], log)
    write_boot_code(disk, (root / "boot/grub/boot.img").read_bytes(),
                    (root / "boot/grub/core.img").read_bytes())


def write_boot_code(disk: Path, boot_img: bytes, core_img: bytes) -> None:
    """GRUB in the MBR and the gap before the partition, as grub-bios-setup would.

    grub-bios-setup refuses a chroot without /dev; it is not needed: boot.img as
    shipped loads core.img from sector 1, and grub-mkimage already wrote core.img's
    length into its first sector. Only the boot code (the first 440 bytes) of the
    MBR is replaced; the disk signature and partition table behind it stay.
    """
    if len(boot_img) != 512 or boot_img[510:] != b"\x55\xaa":
        raise VMImageError("boot.img is not a 512-byte boot sector")
    if len(core_img) > PART_OFFSET - 512:
        raise VMImageError(f"core.img is {len(core_img)} bytes; the gap before the "
                           f"partition holds {PART_OFFSET - 512}")
    with disk.open("r+b") as f:
        f.seek(0)
        f.write(boot_img[:MBR_CODE_BYTES])
        f.seek(512)
        f.write(core_img)


def build_box(*, progress: Callable[[str], None] | None = None) -> tuple[Path, str, float]:
    """The cached .box file for this recipe, built first if needed: (path, recipe, seconds)."""
    say = progress or (lambda _m: None)
    mirror = debian_mirror()
    pubkey = insecure_key()
    recipe = recipe_hash(mirror, pubkey)
    root_dir = cache_dir()
    out = root_dir / "boxes" / f"{SUITE}-{recipe}.box"
    # The same lock as the VM image: both debootstraps share the debs/ cache.
    with _lock(root_dir / "build.lock"):
        if out.is_file():
            return out, recipe, 0.0
        require_tools({"debootstrap": "debootstrap", "mkfs.ext4": "e2fsprogs",
                       "qemu-img": "qemu-utils", "sfdisk": "fdisk", "tar": "tar"})
        t0 = time.monotonic()
        out.parent.mkdir(parents=True, exist_ok=True)
        log = out.with_suffix(".log")
        log.write_text("")
        say(f"building {out.name}: debootstrap {SUITE} from {mirror} (log {log})")
        fs_uuid = str(uuid.uuid4())
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=".build-") as tmp:
            t = Path(tmp)
            root = t / "root"
            debootstrap(root, box_packages(), mirror, log)
            say(f"debootstrap done after {time.monotonic() - t0:.0f}s; disk and box")
            _configure(root, mirror, pubkey, fs_uuid)
            _make_disk(root, t / "disk.raw", fs_uuid, log)
            _run(["qemu-img", "convert", "-c", "-O", "qcow2", str(t / "disk.raw"),
                  str(t / "box.img")], log)
            (t / "metadata.json").write_text(json.dumps(metadata()))
            (t / "wgjit-recipe").write_text(recipe + "\n")
            partial = t / "out.box"
            _run(["tar", "-C", str(t), "-cf", str(partial), "metadata.json", "box.img",
                  "wgjit-recipe"], log)
            os.replace(partial, out)
        for stale in out.parent.glob(f"{SUITE}-*.box"):
            if stale != out:
                stale.unlink()
                stale.with_suffix(".log").unlink(missing_ok=True)
        seconds = time.monotonic() - t0
        say(f"box built in {seconds:.0f}s")
        return out, recipe, seconds


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def vagrant_box_list() -> str:
    p = subprocess.run(["vagrant", "box", "list"], capture_output=True, text=True, timeout=120)
    if p.returncode != 0:
        raise VMImageError(f"vagrant box list: {p.stderr.strip()}")
    return p.stdout


def ensure_box(*, progress: Callable[[str], None] | None = None) -> Box:
    """Build the box if its recipe changed and add that version to Vagrant if missing."""
    say = progress or (lambda _m: None)
    path, recipe, build_seconds = build_box(progress=progress)
    version = box_version(recipe)
    _drop_stale_volumes(version, say)
    if version in added_versions(vagrant_box_list()):
        return Box(path, recipe, version, build_seconds, 0.0)
    t0 = time.monotonic()
    cat = path.with_suffix(".json")
    cat.write_text(json.dumps(catalog(recipe, path, _sha256(path)), indent=2))
    say(f"vagrant box add {BOX_NAME} {version}")
    p = subprocess.run(["vagrant", "box", "add", "--provider", "libvirt", str(cat)],
                       capture_output=True, text=True, timeout=900)
    if p.returncode != 0:
        raise VMImageError(f"vagrant box add: {p.stdout[-2000:]}{p.stderr[-2000:]}")
    # Older versions only take space; the Vagrantfile uses the newest.
    for old in added_versions(vagrant_box_list()):
        if old != version:
            subprocess.run(["vagrant", "box", "remove", "--force", "--provider", "libvirt",
                            "--box-version", old, BOX_NAME], capture_output=True, timeout=300)
    return Box(path, recipe, version, build_seconds, time.monotonic() - t0)


def _drop_stale_volumes(version: str, say: Callable[[str], None]) -> None:
    """Delete older versions' volumes from libvirt's default pool, when libvirtd runs."""
    from lab.libvirt_daemons import Libvirt, LibvirtError, answering

    if not answering():
        return
    lv = Libvirt(None, {})
    try:
        for vol in stale_volumes(lv.volumes(), version):
            say(f"deleting {vol} (an older version of the box) from libvirt's default pool")
            lv.virsh("vol-delete", "--pool", "default", vol)
    except LibvirtError as e:
        say(f"could not list libvirt's volumes: {e}")


def main() -> int:
    box = ensure_box(progress=print)
    print(f"{BOX_NAME} {box.version} from {box.path} (recipe {box.recipe}; "
          f"built in {box.build_seconds:.0f}s, added in {box.add_seconds:.0f}s)")
    return 0
