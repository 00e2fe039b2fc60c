"""The quick VM's boot pieces: a tiny initramfs for a kernel from /boot.

The initramfs holds a static busybox, the modules the chosen kernel lacks to reach
its control port and mount the host's root over 9p with an overlay on top
(decompressed here, so busybox insmod needs no xz support), and the two scripts in
lab/vm/init/. Everything else comes from the host's
own root inside the VM: modprobe, iproute2, Python, the checkout.

It is built at run time into a cache directory, keyed by the kernel version and a
hash of everything that goes in, so a changed recipe or kernel rebuilds it; no
binary is ever committed.
"""

from __future__ import annotations

import gzip
import hashlib
import lzma
import os
import shutil
import struct
import subprocess
import tempfile
import zlib
from pathlib import Path

from lab.vm.kernel import (
    Kernel,
    VMImageError,
    choose,
    module_files,
    modules_to_load,
    survey,
)

__all__ = ["CHECKOUT", "Kernel", "VMImageError", "boot_image", "cache_dir", "find_kernel",
           "initramfs", "module_files", "rejected_kernels", "usable_kernels"]

INIT_DIR = Path(__file__).with_name("init")
CHECKOUT = Path(__file__).resolve().parents[2]
BUSYBOX_CANDIDATES = (Path("/bin/busybox"), Path("/usr/bin/busybox"))

# What must work before the initramfs can switch root, and why. Which of these are
# loaded is read off each kernel (lab/vm/kernel.py); wireguard goes in too because
# insmod of a decompressed file here takes a fraction of modprobe's time over 9p
# under TCG.
BOOT_DRIVERS = {
    "virtio_pci": "the PCI transport of every virtio device",
    "virtio_console": "the agent's control port, a virtio-serial-pci port",
    "9pnet_virtio": "the host's root over 9p",
    "9p": "the host's root over 9p",
    "overlay": "the VM's writable root",
    "wireguard": "kernel WireGuard, what the VM is for",
}

# Bump when the way the image is assembled changes without the inputs changing.
RECIPE_VERSION = "2"


def cache_dir() -> Path:
    """Where built images live: $WGJIT_LAB_CACHE, else .cache/wgjit-lab in the checkout."""
    env = os.environ.get("WGJIT_LAB_CACHE")
    return Path(env) if env else CHECKOUT / ".cache" / "wgjit-lab"


def boot_modules(version: str) -> list[Path]:
    """The module files this kernel needs in the initramfs, dependencies first."""
    return module_files(version, modules_to_load(version, BOOT_DRIVERS))


def usable_kernels() -> list[Kernel]:
    """Kernels in /boot that can boot a quick VM, in preference order (stock first)."""
    return survey(BOOT_DRIVERS)[0]


def rejected_kernels() -> dict[str, str]:
    """Installed kernels that cannot boot a quick VM: version -> the drivers they lack.

    Debian 12's cloud kernel is one: no 9p (CONFIG_NET_9P is not set).
    """
    return survey(BOOT_DRIVERS)[1]


def find_kernel() -> Kernel:
    """The kernel to boot: $WGJIT_VM_KERNEL (a version) if set, else the stock one."""
    usable, rejected = survey(BOOT_DRIVERS)
    return choose(usable, ", ".join(BOOT_DRIVERS) + " built in or as modules", rejected)


def _bzimage_payload(data: bytes) -> bytes:
    """The compressed vmlinux inside a bzImage (x86 boot protocol >= 2.08 header)."""
    if data[0x202:0x206] != b"HdrS" or struct.unpack_from("<H", data, 0x206)[0] < 0x208:
        raise VMImageError("not a bzImage with a payload header")
    setup_sects = data[0x1F1] or 4
    offset, length = struct.unpack_from("<II", data, 0x248)
    start = (setup_sects + 1) * 512 + offset
    # The build appends the uncompressed size (4 bytes) to the compressed stream.
    return data[start:start + length - 4]


def _decompress_payload(payload: bytes) -> bytes:
    if payload.startswith(b"\x28\xb5\x2f\xfd"):
        return subprocess.run(["zstd", "-dcq"], input=payload, capture_output=True,
                              check=True).stdout
    if payload.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMADecompressor().decompress(payload)
    if payload.startswith(b"\x1f\x8b"):
        return zlib.decompressobj(wbits=31).decompress(payload)
    raise VMImageError(f"unknown kernel compression {payload[:6].hex()}")


def boot_image(kernel: Kernel) -> Path:
    """What qemu's -kernel gets: the uncompressed vmlinux if the kernel has a PVH entry.

    qemu boots an ELF vmlinux through its PVH note, which skips the firmware's real
    mode setup and the kernel decompressing itself: well over a second under TCG.
    Extracted once into the cache; the bzImage is the fallback (no CONFIG_PVH, an
    unknown compression, no zstd tool).
    """
    try:
        if "CONFIG_PVH=y" not in kernel.config.read_text().splitlines():
            return kernel.image
        st = kernel.image.stat()
        out = cache_dir() / f"vmlinux-{kernel.version}-{st.st_size}-{st.st_mtime_ns}"
        if out.is_file():
            return out
        elf = _decompress_payload(_bzimage_payload(kernel.image.read_bytes()))
        if not elf.startswith(b"\x7fELF"):
            raise VMImageError("payload is not an ELF vmlinux")
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out.parent, prefix=".vmlinux-", delete=False) as f:
            f.write(elf)
        os.replace(f.name, out)
        for stale in out.parent.glob(f"vmlinux-{kernel.version}-*"):
            if stale != out:
                stale.unlink(missing_ok=True)
        return out
    except (OSError, VMImageError, subprocess.CalledProcessError, lzma.LZMAError, zlib.error):
        return kernel.image


def _busybox() -> Path:
    for path in BUSYBOX_CANDIDATES:
        # A dynamic binary names its loader in .interp, near the start of the file;
        # the initramfs has no libc for it.
        if path.is_file() and b"/ld-linux" not in path.read_bytes()[:4096]:
            return path
    raise VMImageError("need a static busybox: apt-get install busybox-static")


def _decompressed(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix == ".xz":
        return lzma.decompress(data)
    if path.suffix == ".gz":
        return gzip.decompress(data)
    if path.suffix == ".zst":
        return subprocess.run(["zstd", "-dc", str(path)], capture_output=True,
                              check=True).stdout
    return data


def _ko_name(path: Path) -> str:
    name = path.name
    for suffix in (".xz", ".gz", ".zst"):
        name = name.removesuffix(suffix)
    return name


def _recipe_hash(kernel: Kernel, modules: list[Path], busybox: Path) -> str:
    h = hashlib.sha256(RECIPE_VERSION.encode())
    for script in sorted(INIT_DIR.iterdir()):
        h.update(script.name.encode() + b"\0" + script.read_bytes())
    for path in [busybox, *modules]:
        st = path.stat()
        h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    h.update(kernel.version.encode())
    return h.hexdigest()[:16]


def initramfs(kernel: Kernel) -> Path:
    """Path of the cached initramfs for `kernel`, building it first if needed."""
    modules = boot_modules(kernel.version)
    busybox = _busybox()
    out = cache_dir() / f"initramfs-{kernel.version}-{_recipe_hash(kernel, modules, busybox)}.cpio"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".build-") as tmp:
        root = Path(tmp) / "root"
        for d in ("bin", "lib/wgjit"):
            (root / d).mkdir(parents=True)
        shutil.copy2(busybox, root / "bin" / "busybox")
        shutil.copy2(INIT_DIR / "init", root / "init")
        (root / "init").chmod(0o755)
        shutil.copy2(INIT_DIR / "agent.sh", root / "lib" / "wgjit" / "agent.sh")
        order = []
        for path in modules:
            name = _ko_name(path)
            (root / "lib" / "wgjit" / name).write_bytes(_decompressed(path))
            order.append(name)
        (root / "lib" / "wgjit" / "modules.order").write_text("\n".join(order) + "\n")
        names = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
        partial = Path(tmp) / "initramfs.cpio"
        with partial.open("wb") as f:
            subprocess.run(["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0"], cwd=root,
                           input="\n".join(names).encode(), stdout=f, check=True)
        os.replace(partial, out)  # atomic: concurrent builders both end with a whole file
    for stale in out.parent.glob(f"initramfs-{kernel.version}-*.cpio"):
        if stale != out:
            stale.unlink(missing_ok=True)
    return out
