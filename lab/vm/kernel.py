"""Which Debian kernel a VM boots, and which of its drivers must be loaded by hand.

Both VM flavours (the quick harness in lab/vm/quick.py and the full Debian VMs of the VM
lab) boot a kernel from /boot with an initramfs of ours that loads only what it
needs. What it needs depends on the kernel, not on us: Debian 12's stock kernel
(`linux-image-amd64`, 6.1) builds `virtio_pci`, `virtio_console`, `virtio_blk`
and `virtio_net` as modules, while other flavours build some of them in. An
initramfs that assumed built-ins stopped the guest at "no virtio-serial port" on
the stock kernel, so the list to load is read off each kernel's own
`modules.builtin` and config rather than written down here.

Preference: $WGJIT_VM_KERNEL (a version) if set, else the running Debian release's
stock kernel (the one `linux-image-amd64` depends on), else the newest one.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path

BOOT_DIR = Path("/boot")
MODULES_DIR = Path("/lib/modules")
# Debian's metapackage for the stock kernel of the running release.
STOCK_METAPACKAGE = "linux-image-amd64"

# The config symbol behind each driver we may need: it names the option in an
# error, and says "built in" when a kernel's modules.builtin is missing.
CONFIG_SYMBOLS = {
    "virtio_pci": "CONFIG_VIRTIO_PCI",
    "virtio_console": "CONFIG_VIRTIO_CONSOLE",
    "virtio_blk": "CONFIG_VIRTIO_BLK",
    "virtio_net": "CONFIG_VIRTIO_NET",
    "9pnet_virtio": "CONFIG_NET_9P_VIRTIO",
    "9p": "CONFIG_9P_FS",
    "overlay": "CONFIG_OVERLAY_FS",
    "ext4": "CONFIG_EXT4_FS",
    "wireguard": "CONFIG_WIREGUARD",
}


class VMImageError(RuntimeError):
    pass


@dataclasses.dataclass(frozen=True)
class Kernel:
    version: str
    image: Path  # the bzImage in /boot

    @property
    def config(self) -> Path:
        return self.image.with_name(f"config-{self.version}")


def _module_name(path: str) -> str:
    # modules.dep and modules.builtin name files; the kernel names modules with "_".
    name = Path(path).name
    for suffix in (".xz", ".gz", ".zst"):
        name = name.removesuffix(suffix)
    return name.removesuffix(".ko").replace("-", "_")


def builtin_modules(version: str) -> set[str]:
    path = MODULES_DIR / version / "modules.builtin"
    try:
        return {_module_name(line) for line in path.read_text().split()}
    except FileNotFoundError:
        return set()


def loadable_modules(version: str) -> set[str]:
    path = MODULES_DIR / version / "modules.dep"
    try:
        return {_module_name(line.split(":", 1)[0]) for line in path.read_text().splitlines()
                if ":" in line}
    except FileNotFoundError:
        return set()


def kernel_config(version: str) -> dict[str, str]:
    """CONFIG_* -> 'y'/'m'/... from /boot/config-<version> (empty if absent)."""
    try:
        text = (BOOT_DIR / f"config-{version}").read_text()
    except FileNotFoundError:
        return {}
    return dict(m.groups() for m in re.finditer(r"^(CONFIG_\w+)=(\S+)$", text, re.M))


def missing_drivers(version: str, needed: Mapping[str, str]) -> dict[str, str]:
    """The drivers of `needed` this kernel has neither built in nor as a module.

    name -> what needs it and the state of its config option, for an error.
    """
    builtin = builtin_modules(version)
    modules = loadable_modules(version)
    config = kernel_config(version)
    missing = {}
    for name, why in needed.items():
        symbol = CONFIG_SYMBOLS.get(name)
        if name in builtin or name in modules or (symbol and config.get(symbol) == "y"):
            continue
        state = f"{symbol}={config[symbol]}" if symbol and symbol in config else \
            f"{symbol} is not set" if symbol else "no known config option"
        missing[name] = f"{why}; {state}"
    return missing


def modules_to_load(version: str, needed: Mapping[str, str]) -> list[str]:
    """The drivers of `needed` (name -> what needs it) that this kernel has as modules.

    Built-in ones are left out. Drivers that are neither built in nor modules are a
    VMImageError naming each of them, what needs it and its config option: better
    at once on the host than a guest stopping with a vague message minutes later.
    """
    missing = missing_drivers(version, needed)
    if missing:
        raise VMImageError(
            f"kernel {version} has no " + ", no ".join(f"{n} ({why})" for n, why in
                                                      missing.items())
            + f": not in modules.builtin and no module under {MODULES_DIR / version}")
    builtin = builtin_modules(version)
    config = kernel_config(version)
    return [name for name in needed if name not in builtin
            and not (CONFIG_SYMBOLS.get(name) and config.get(CONFIG_SYMBOLS[name]) == "y")]


def module_files(version: str, modules: Iterable[str]) -> list[Path]:
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


def stock_version() -> str | None:
    """The kernel version Debian's stock metapackage depends on, if it is installed."""
    proc = subprocess.run(["dpkg-query", "-W", "-f", "${Status}\t${Depends}",
                           STOCK_METAPACKAGE], capture_output=True, text=True)
    status, _, depends = proc.stdout.partition("\t")
    if proc.returncode != 0 or not status.endswith(" installed"):
        return None
    m = re.search(r"linux-image-(\S+)", depends)
    return m.group(1) if m else None


def _version_key(version: str) -> list[tuple[int, str]]:
    # "6.12.117+deb12-rt-amd64" sorts numerically on its numeric runs.
    return [(int(n), "") if n else (0, s) for n, s in re.findall(r"(\d+)|(\D+)", version)]


def installed_kernels() -> list[Kernel]:
    """Kernels in /boot that have their modules installed, stock first, then newest."""
    found = [Kernel(img.name.removeprefix("vmlinuz-"), img) for img in BOOT_DIR.glob("vmlinuz-*")
             if (MODULES_DIR / img.name.removeprefix("vmlinuz-") / "modules.dep").is_file()]
    stock = stock_version()
    return sorted(found, key=lambda k: (k.version == stock, _version_key(k.version)),
                  reverse=True)


def survey(drivers: Mapping[str, str]) -> tuple[list[Kernel], dict[str, str]]:
    """Installed kernels that have every one of `drivers` (built in or as modules), in
    preference order; and version -> why, for each one that lacks some."""
    usable, rejected = [], {}
    for kernel in installed_kernels():
        try:
            modules_to_load(kernel.version, drivers)
        except VMImageError as e:
            rejected[kernel.version] = str(e)
            continue
        usable.append(kernel)
    return usable, rejected


def choose(kernels: list[Kernel], usable: str, rejected: Mapping[str, str] | None = None,
           ) -> Kernel:
    """The preferred kernel of `kernels` (already in preference order); $WGJIT_VM_KERNEL wins.

    `usable` says what made a kernel usable and `rejected` (version -> why) why the
    other installed ones are not, for the error when none is.
    """
    rejected = rejected or {}
    wanted = os.environ.get("WGJIT_VM_KERNEL")
    if wanted:
        if wanted in rejected:
            raise VMImageError(f"WGJIT_VM_KERNEL={wanted} cannot be used: {rejected[wanted]}")
        kernels = [k for k in kernels if k.version == wanted]
    if not kernels:
        raise VMImageError(
            f"no usable kernel in /boot (need vmlinuz-<v> with /lib/modules/<v> and {usable}; "
            f"Debian's {STOCK_METAPACKAGE} has them: apt-get install {STOCK_METAPACKAGE})"
            + (f"; WGJIT_VM_KERNEL={wanted} is not among them" if wanted else "")
            + "".join(f"; {why}" for why in rejected.values()))
    return kernels[0]
