"""The quick VM's boot pieces: pick a kernel from /boot, build a tiny initramfs.

The initramfs holds a static busybox, the modules needed to mount the host's root
over 9p with an overlay on top (decompressed here, so busybox insmod needs no xz
support), and the two scripts in lab/vm_init/. Everything else comes from the host's
own root inside the VM: modprobe, iproute2, Python, the checkout.

It is built at run time into a cache directory, keyed by the kernel version and a
hash of everything that goes in, so a changed recipe or kernel rebuilds it; no
binary is ever committed.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import lzma
import os
import re
import shutil
import struct
import subprocess
import tempfile
import zlib
from pathlib import Path

BOOT_DIR = Path("/boot")
MODULES_DIR = Path("/lib/modules")
INIT_DIR = Path(__file__).with_name("vm_init")
CHECKOUT = Path(__file__).resolve().parent.parent
BUSYBOX_CANDIDATES = (Path("/bin/busybox"), Path("/usr/bin/busybox"))

# What the initramfs must load before it can switch root. virtio_pci is built into
# Debian's kernels but may be a module elsewhere; --show-depends says which.
ROOT_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay")
# A kernel without these is useless here. They go into the initramfs too: insmod of
# a decompressed file there takes a fraction of modprobe's time over 9p under TCG.
REQUIRED_MODULES = ("wireguard",)
INITRAMFS_MODULES = (*ROOT_MODULES, *REQUIRED_MODULES)

# Bump when the way the image is assembled changes without the inputs changing.
RECIPE_VERSION = "1"


class VMImageError(RuntimeError):
    pass


@dataclasses.dataclass(frozen=True)
class Kernel:
    version: str
    image: Path  # the bzImage in /boot

    @property
    def config(self) -> Path:
        return self.image.with_name(f"config-{self.version}")


def cache_dir() -> Path:
    """Where built images live: $WGJIT_LAB_CACHE, else .cache/wgjit-lab in the checkout."""
    env = os.environ.get("WGJIT_LAB_CACHE")
    return Path(env) if env else CHECKOUT / ".cache" / "wgjit-lab"


def _version_key(version: str) -> list[tuple[int, str]]:
    # "6.12.117+deb12-rt-amd64" sorts numerically on its numeric runs.
    return [(int(n), "") if n else (0, s) for n, s in re.findall(r"(\d+)|(\D+)", version)]


def module_files(version: str, modules: tuple[str, ...] | list[str]) -> list[Path]:
    """The .ko files (compressed or not) that load `modules`, dependencies first.

    Built-in modules contribute nothing. Raises VMImageError for a missing one.
    """
    files: list[Path] = []
    for name in modules:
        proc = subprocess.run(["modprobe", "-S", version, "--show-depends", name],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise VMImageError(f"kernel {version} has no module {name}: {proc.stderr.strip()}")
        for line in proc.stdout.splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "insmod":
                path = Path(parts[1])
                if path not in files:
                    files.append(path)
    return files


def usable_kernels() -> list[Kernel]:
    """Kernels in /boot that have their modules, 9p, overlay and WireGuard; newest first."""
    found = []
    for image in BOOT_DIR.glob("vmlinuz-*"):
        version = image.name.removeprefix("vmlinuz-")
        if not (MODULES_DIR / version / "modules.dep").is_file():
            continue
        try:
            module_files(version, INITRAMFS_MODULES)
        except VMImageError:
            continue
        found.append(Kernel(version, image))
    return sorted(found, key=lambda k: _version_key(k.version), reverse=True)


def find_kernel() -> Kernel:
    """The kernel to boot: $WGJIT_VM_KERNEL (a version) if set, else the newest usable one."""
    kernels = usable_kernels()
    wanted = os.environ.get("WGJIT_VM_KERNEL")
    if wanted:
        kernels = [k for k in kernels if k.version == wanted]
    if not kernels:
        raise VMImageError(
            "no usable kernel in /boot (need vmlinuz-<v> with /lib/modules/<v> holding "
            "9p, 9pnet_virtio, overlay and wireguard; Debian's linux-image-amd64 has them)"
            + (f"; WGJIT_VM_KERNEL={wanted} not among them" if wanted else ""))
    return kernels[0]


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
    modules = module_files(kernel.version, INITRAMFS_MODULES)
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
