"""The quick-VM harness: a real qemu guest booting the Debian kernel from /boot."""

from __future__ import annotations

import io
import os
import re
import secrets
import subprocess
import warnings
from pathlib import Path

import pytest

from lab.vm import VM, VMError, VMTimeout, run_in_vm
from lab.vm.image import DISK_DRIVERS, find_disk_kernel
from lab.vm.initramfs import (
    BOOT_DRIVERS,
    CHECKOUT,
    boot_modules,
    find_kernel,
    rejected_kernels,
    usable_kernels,
)
from lab.vm.kernel import (
    CONFIG_SYMBOLS,
    VMImageError,
    builtin_modules,
    installed_kernels,
    kernel_config,
    stock_version,
    survey,
)

pytestmark = pytest.mark.vm

VENV_PYTHON = CHECKOUT / ".venv" / "bin" / "python"


def _qemu_pids_for(path: Path) -> list[int]:
    out = subprocess.run(["pgrep", "-f", str(path)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


@pytest.fixture(scope="module")
def vm():
    with VM() as machine:
        rundir = machine.shared_dir.parent
        yield machine
    # A clean power-off leaves no qemu and no temporary files.
    assert not rundir.exists()
    assert _qemu_pids_for(rundir) == []


def test_guest_runs_the_kernel_from_boot(vm):
    result = vm.run(["uname", "-r"], check=True)
    assert result.output.strip() == find_kernel().version == vm.kernel_version
    assert Path(f"/boot/vmlinuz-{vm.kernel_version}").is_file()


def test_the_stock_kernel_is_installed_and_preferred():
    # ./run installs Debian's stock kernel: the one users have, with virtio as modules.
    # Both VM kinds boot it whatever else /boot holds (a newer or cloud flavour).
    stock = stock_version()
    assert stock, "linux-image-amd64 is not installed (./run setup installs it)"
    if "WGJIT_VM_KERNEL" not in os.environ:
        assert find_kernel().version == stock
        assert find_disk_kernel().version == stock


def _lacking(version: str, drivers: dict[str, str]) -> list[str]:
    # Read off the config alone, apart from the modules.builtin/modules.dep path the
    # lab takes: what a kernel's build leaves out entirely.
    config = kernel_config(version)
    return [d for d in drivers if config.get(CONFIG_SYMBOLS[d]) not in ("y", "m")]


# Every kernel in /boot with its modules boots a quick VM once. One that cannot
# (Debian 12's cloud kernel has no 9p) is never chosen for it, is refused naming
# exactly the drivers its config leaves out, and is reported as a warning saying
# which VM can still use it: the suite does not fail for a kernel the lab does not
# choose, nor pass over it in silence.
@pytest.mark.parametrize("kernel", installed_kernels(), ids=lambda k: k.version)
def test_every_installed_kernel_boots(kernel, tmp_path):
    lacking = _lacking(kernel.version, BOOT_DRIVERS)
    if kernel not in usable_kernels():
        why = rejected_kernels()[kernel.version]
        assert lacking and re.findall(r"\bno (\S+) \(", why) == lacking, why
        with pytest.raises(VMImageError, match=rf"kernel {re.escape(kernel.version)} has no "
                                               rf"{lacking[0]} \("):
            boot_modules(kernel.version)
        assert find_kernel() != kernel
        disk_usable, disk_rejected = survey(DISK_DRIVERS)
        assert (kernel in disk_usable) == (not _lacking(kernel.version, DISK_DRIVERS))
        warnings.warn(
            f"kernel {kernel.version} cannot boot the quick VM (lab/vm/quick.py): {why}. "
            + (f"The VM lab's disk VMs can use it (WGJIT_VM_KERNEL={kernel.version}); "
               f"they boot {find_disk_kernel().version}." if kernel in disk_usable else
               f"Nor can the VM lab's disk VMs: {disk_rejected[kernel.version]}."),
            stacklevel=1)
        return
    assert lacking == []
    with VM(kernel=kernel, log_dir=tmp_path) as machine:
        assert machine.kernel_version == kernel.version
        # Whatever the kernel builds in, the initramfs loaded what it lacked: the
        # agent answers over virtio-serial and kernel WireGuard works.
        machine.run(["ip", "link", "add", "wgk0", "type", "wireguard"], check=True)
        loaded = machine.run(["cat", "/proc/modules"], check=True).output.split()
        for name in ("virtio_console", "virtio_pci"):
            assert (name in loaded) != (name in builtin_modules(kernel.version)), name


def test_exit_code_output_env_and_cwd(vm):
    result = vm.run(["sh", "-c", 'echo "out $FOO $(pwd)"; echo err >&2; exit 7'],
                    cwd="/usr", env={"FOO": "it's ok"})
    assert result.returncode == 7
    assert result.output == "out it's ok /usr\nerr\n"
    assert vm.run(["false"]).returncode == 1
    assert vm.run(["/nonexistent/command"]).returncode == 127
    # Output without a trailing newline comes back exactly, and echo streams it.
    seen = io.StringIO()
    assert vm.run(["printf", "a\\nb"], echo=seen).output == "a\nb"
    assert seen.getvalue() == "a\nb"


def test_venv_python_imports_the_project(vm):
    result = vm.run([str(VENV_PYTHON), "-c",
                     "import pyroute2, appliance, os; print('imported', os.getuid())"])
    assert result.returncode == 0, result.output
    assert result.output.strip().endswith("imported 0")


def test_writes_stay_in_the_guest_except_the_shared_dir(vm):
    probe = CHECKOUT / ".cache" / f"vm-probe-{secrets.token_hex(4)}"
    (vm.shared_dir / "to-guest.txt").write_text("from host\n")
    shared = vm.shared_dir / "from-guest.txt"
    result = vm.run(["sh", "-c", f"echo x > {probe} && echo hello > {shared} && "
                                 f"cat {vm.shared_dir}/to-guest.txt"], check=True)
    assert result.output == "from host\n"
    assert not probe.exists()
    assert shared.read_text() == "hello\n"


def test_one_shot_timeout_kills_the_vm_and_leaves_only_logs(tmp_path):
    with pytest.raises(VMTimeout) as info:
        run_in_vm(["sh", "-c", "echo started; sleep 60"], timeout=5, log_dir=tmp_path)
    assert "started" in info.value.output
    booted = (tmp_path / "commands.log").read_text().splitlines()[0]
    rundir = Path(booted.rsplit("run dir ", 1)[1])
    assert not rundir.exists()
    assert _qemu_pids_for(rundir) == []
    assert "started" in (tmp_path / "commands.log").read_text()


def test_a_failed_boot_says_why_at_once():
    machine = VM(modules=["wireguard", "no_such_module_wgjit"])
    with pytest.raises(VMError, match="modprobe no_such_module_wgjit failed") as info:
        machine.start()
    assert "no_such_module_wgjit" in str(info.value).split("console.log")[-1]
    assert not machine.alive
